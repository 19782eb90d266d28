"""bench/depth.py's measures: label precision, factor agreement of neighbours, cosine spread."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
from depth import depth_metrics  # noqa: E402


def _unit(v):
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _set(n, size_weight, rng):
    """Two classes on two axes; within a class the direction turns with lesion size."""
    label = np.arange(n) % 2
    size = rng.uniform(0.07, 0.13, n)
    t = (size - 0.1) * size_weight
    vec = np.zeros((n, 3))
    vec[np.arange(n), label] = 1.0
    vec[:, 2] = t
    return _unit(vec), label, size


def test_neighbours_ordered_by_size_give_a_small_ratio_and_random_ones_about_one():
    rng = np.random.default_rng(0)
    g_vec, g_lab, g_size = _set(200, 20.0, rng)
    q_vec, q_lab, q_size = _set(40, 20.0, rng)
    q_pat = np.array([f"q{i}" for i in range(40)])
    g_pat = np.array([f"g{i}" for i in range(200)])
    m = depth_metrics(
        q_vec, q_lab, q_pat, {"lesion_size": q_size}, g_vec, g_lab, g_pat, {"lesion_size": g_size}
    )
    assert m["precision_at_1"] == m["precision_at_5"] == m["map_at_r"] == 1.0
    assert m["size_ratio"] < 0.2 and m["raw_gap_top1_top10_median"] > 0
    # a direction that ignores size: neighbours no closer in size than random same-label cases
    g_rand = _unit(np.c_[g_vec[:, :2], rng.normal(0, 0.3, 200)])
    q_rand = _unit(np.c_[q_vec[:, :2], rng.normal(0, 0.3, 40)])
    m = depth_metrics(
        q_rand, q_lab, q_pat, {"lesion_size": q_size}, g_rand, g_lab, g_pat, {"lesion_size": g_size}
    )
    assert 0.7 < m["size_ratio"] < 1.3


def test_own_patient_is_excluded():
    vec = _unit(np.array([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.1, 1.0]]))
    lab = np.array([0, 0, 1, 1])
    # the query's only same-label gallery case is its own patient's: excluded, so P@1 is 0
    m = depth_metrics(
        vec[:1], lab[:1], np.array(["p"]), {}, vec[1:], lab[1:], np.array(["p", "x", "y"]), {}
    )
    assert m["precision_at_1"] == 0.0 and m["map_at_r"] is None
    m = depth_metrics(
        vec[:1], lab[:1], np.array(["p"]), {}, vec[1:], lab[1:], np.array(["z", "x", "y"]), {}
    )
    assert m["precision_at_1"] == pytest.approx(1.0)
