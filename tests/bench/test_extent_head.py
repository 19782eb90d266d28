"""bench/extent_head.py on a tiny index whose model has an extent head."""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from extent_head import score_index  # noqa: E402


def test_scores_the_head_and_its_code(tiny_index, phantom_dir):
    out = score_index(str(tiny_index), str(phantom_dir / "manifest.csv"))
    from retrieval.model.train import EXTENT_WEIGHT

    assert out["extent_weight"] == EXTENT_WEIGHT and out["n_queries"] > 0
    assert set(out["code_weight"]) == {"c0", "c0_5", "c1", "c2"}
    for m in out["code_weight"].values():
        assert 0.0 <= m["precision_at_5"] <= 1.0 and math.isfinite(m["size_ratio"])
    rho = out["spearman"]["with_true_area"]
    assert all(-1.0 <= v <= 1.0 for v in rho.values())  # classes of >= 5 queries only
    assert math.isfinite(out["area_log_error_median"])
    # a code made from the true areas orders same-label neighbours by size: far below chance
    assert out["oracle"]["size_ratio"] < 0.6
    assert out["oracle"]["size_ratio"] < out["code_weight"]["c0"]["size_ratio"]
