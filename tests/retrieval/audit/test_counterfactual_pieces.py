"""The counterfactual's building blocks: mask → feature grid, lesion / background removal."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.audit.counterfactual import (
    cell_fractions,
    interpret,
    positive_mass,
    remove_background,
    remove_lesion,
)


def _image_with_lesion(size=64):
    yy, xx = np.mgrid[0:size, 0:size]
    img = 0.3 + 0.2 * xx / size  # a smooth background gradient
    lesion = (yy - 30) ** 2 + (xx - 20) ** 2 < 8**2
    img = np.where(lesion, 0.9, img)
    return img[:, :, None].astype(np.float32), lesion


def test_cell_fractions():
    mask = np.zeros((64, 64), bool)
    mask[:32, :32] = True  # exactly the top-left quarter
    f = cell_fractions(mask, (4, 4)).reshape(4, 4)
    assert f[:2, :2] == pytest.approx(np.ones((2, 2)))
    assert f[2:, :].sum() == 0 and f[:, 2:].sum() == 0
    g = cell_fractions(mask, (3, 3))  # cells straddling the edge get partial fractions
    assert g.mean() == pytest.approx(0.25, abs=0.02)


def test_positive_mass():
    terms = np.array([[0.5, -0.2], [0.1, 0.3]])
    q, c = positive_mass(terms)
    assert q.tolist() == pytest.approx([0.5, 0.4])
    assert c.tolist() == pytest.approx([0.6, 0.3])


def test_remove_lesion_fills_with_background():
    img, lesion = _image_with_lesion()
    out = remove_lesion(img, lesion)
    assert out.shape == img.shape and out.dtype == np.float32
    assert out[lesion].max() < 0.6  # the bright lesion is gone
    assert abs(float(out[lesion].mean()) - 0.3 - 0.2 * 20 / 64) < 0.08  # ~ the local background
    far = np.ones_like(lesion)
    far[10:50, 0:40] = False
    assert np.array_equal(out[far], img[far])  # nothing away from the lesion changes
    assert np.array_equal(remove_lesion(img, np.zeros_like(lesion)), img)


def test_remove_background_keeps_only_the_lesion():
    img, lesion = _image_with_lesion()
    out = remove_background(img, lesion)
    assert np.array_equal(out[lesion], img[lesion])
    outside = out[~np.pad(lesion, 0)][:, 0]
    corner = out[:5, -5:, 0]
    assert np.ptp(corner) == 0  # a constant fill
    assert outside.min() >= 0 and outside.max() <= 1


def test_interpret():
    sim = {"query": 0.4, "lesion_area_query": 0.05, "enrichment_query": 8.0}
    masked = {
        "chance_precision_at_5": 0.33,
        "original": {"precision_at_5": 0.9},
        "lesion_removed": {"precision_at_5": 0.85},
        "background_removed": {"precision_at_5": 0.5},
    }
    assert "matches on context" in interpret(sim, masked)
    masked["lesion_removed"]["precision_at_5"] = 0.35
    assert "drops precision@5" in interpret(sim, masked)
