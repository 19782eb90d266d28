"""bench/depth.py's size probe: high within-class R² when the vectors carry size, ~0 when not."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from depth import size_probe  # noqa: E402


def _frame(n, rng):
    label = np.where(np.arange(n) % 2, "a", "b")
    size = rng.uniform(0.07, 0.13, n)
    df = pd.DataFrame({"label": label, "lesion_size": [f"{s:.4f}" for s in size]})
    return df, size, label


def test_size_probe_finds_size_only_where_the_vectors_hold_it():
    rng = np.random.default_rng(0)
    g_df, g_size, g_lab = _frame(300, rng)
    q_df, q_size, q_lab = _frame(100, rng)

    def vectors(size, lab, weight):
        v = rng.normal(size=(len(size), 16))
        v[:, 0] += 10.0 * (lab == "a")  # the label direction
        v[:, 1] = weight * (size - 0.1) / 0.02 + 0.3 * rng.normal(size=len(size))
        return v

    r2_with = size_probe(g_df, vectors(g_size, g_lab, 1.0), q_df, vectors(q_size, q_lab, 1.0))
    r2_without = size_probe(g_df, vectors(g_size, g_lab, 0.0), q_df, vectors(q_size, q_lab, 0.0))
    assert r2_with > 0.8
    assert r2_without < 0.1
