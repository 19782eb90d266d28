"""write_concept_images: the marker / ruler on the background alone, a control like the data."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from retrieval.data.imageio import read_image
from retrieval.data.phantom import _marker_slot, render_marker, write_concept_images
from retrieval.errors import CasebaseError


def test_marker_on_background_alone(tmp_path):
    paths = write_concept_images(tmp_path / "m", "marker", "xray", n=3, size=64, site="B")
    paths += write_concept_images(
        tmp_path / "b", "marker", "xray", n=2, size=64, site="B", background_only=True
    )
    assert len(paths) == 5 and all(p.suffix == ".dcm" for p in paths)
    glyph = render_marker("B", 64)
    r0, c0 = _marker_slot(64, glyph.shape)
    for p in paths:
        px = read_image(p).pixels[..., 0]
        patch = px[r0 : r0 + glyph.shape[0], c0 : c0 + glyph.shape[1]]
        assert patch[glyph].mean() > patch[~glyph].mean() + 0.3  # the letter is burned in


def test_ruler_photo_and_control(tmp_path):
    ruler = write_concept_images(tmp_path / "r", "ruler", "photo", n=2, size=64)
    ruler += write_concept_images(
        tmp_path / "rb", "ruler", "photo", n=1, size=64, background_only=True
    )
    px = read_image(ruler[0]).pixels
    pale = np.isclose(px[-2], [0.93, 0.92, 0.85], atol=0.01).all(-1)
    assert pale.mean() > 0.6  # the ruler's pale strip along the bottom edge
    ctl = write_concept_images(tmp_path / "c", "control", "photo", n=4, size=64)
    assert len(ctl) == 4 and len({p.read_bytes() for p in ctl}) == 4
    with pytest.raises(CasebaseError, match="photo"):
        write_concept_images(tmp_path / "x", "ruler", "xray", n=2)
    with pytest.raises(CasebaseError, match="unknown concept kind"):
        write_concept_images(tmp_path / "x", "text", "xray", n=2)


def test_marker_background_has_no_lesion(tmp_path):
    """The same case drawn with and without its lesion differs only inside the lesion."""
    from retrieval.data import phantom as ph

    cases, patients = ph._plan(12, 5, "none", 0.9, ph.XRAY_CLASSES, ph.SCANNERS)
    c = cases[0]
    with_l, mask, _ = ph._xray_image(np.random.default_rng(1), c, patients[c.patient], 64)
    without, _, _ = ph._xray_image(np.random.default_rng(1), c, patients[c.patient], 64, False)
    diff = np.abs(with_l - without) > 0.02
    near = ndimage.binary_dilation(mask, iterations=3)  # the lesion's soft edge
    assert diff.sum() > 20 and not (diff & ~near).any()


def test_device_concept_is_the_plain_cases_with_one_device(tmp_path):
    """A device concept draws the very cases `plain` draws, each taken with the one device:
    where the planner already chose that device the pixels are identical, elsewhere the colour
    cast differs (so a pair measures what the device alone does to a model)."""
    from retrieval.data import phantom as ph

    n = 12
    plain = write_concept_images(tmp_path / "p", "plain", "photo", n=n, size=64)
    heine = write_concept_images(tmp_path / "h", "device", "photo", n=n, size=64, vendor="Heine")
    cases, _ = ph._plan(n, 1000, "none", 0.9, ph.PHOTO_CLASSES, ph.DEVICES)
    same = [c.scanner == "Heine" for c in cases[:n]]
    assert any(same) and not all(same)
    for p, h, s in zip(plain, heine, same, strict=True):
        a, b = read_image(p).pixels, read_image(h).pixels
        assert np.array_equal(a, b) == s
    # the Heine's cast (1.03, 0.99, 0.93): red over blue rises against every other device
    ratio = [
        read_image(h).pixels[..., 0].mean() / read_image(h).pixels[..., 2].mean() for h in heine
    ]
    other = [read_image(p).pixels[..., 0].mean() / read_image(p).pixels[..., 2].mean()
             for p, s in zip(plain, same, strict=True) if not s]  # fmt: skip
    assert np.mean(ratio) > np.mean(other)
    with pytest.raises(CasebaseError, match="vendor"):
        write_concept_images(tmp_path / "x", "device", "photo", n=2, vendor="Acme")
    xray = write_concept_images(tmp_path / "s", "device", "xray", n=2, size=64, vendor="Cygnus")
    assert all(p.suffix == ".dcm" for p in xray)
