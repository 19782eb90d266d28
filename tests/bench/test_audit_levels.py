"""bench/audit_levels.py: the cut-off grid re-decides stored runs, and names the gate that stops
each run the loosest cell still misses."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from audit_levels import cell, misses, n_test_queries  # noqa: E402


def _attr(p, probe_margin, lift=1.3, assoc=0.9):
    return {
        "p_value": p,
        "p_value_query": 1.0,
        "lift": lift,
        "lift_query": 1.0,
        "probe_balanced_accuracy": 0.5 + probe_margin,
        "chance": 0.5,
        "label_association": assoc,
        "label_association_p": 1e-20,
    }


def _runs():
    """ruler seed 0 used, strong; seed 1 used, weak probe (0.04); seed 2 used, p 0.03;
    marker seed 0 ignored but with a weak probe (0.04); tag seed 0 clean."""
    return [
        {"condition": "ruler", "seed": 0, "used": True, "intervention": {"pull": 0.6},
         "attributes": {"ruler": _attr(0.001, 0.3)}},
        {"condition": "ruler", "seed": 1, "used": True, "intervention": {"pull": 0.1},
         "attributes": {"ruler": _attr(0.001, 0.04)}},
        {"condition": "ruler", "seed": 2, "used": True, "intervention": {"pull": 0.08},
         "attributes": {"ruler": _attr(0.03, 0.3)}},
        {"condition": "marker", "seed": 0, "used": False, "intervention": {"pull": 0.0},
         "attributes": {"site": _attr(0.001, 0.04)}},
        {"condition": "tag", "seed": 0, "used": None,
         "attributes": {"tag": _attr(0.5, 0.0, lift=1.0)}},
    ]  # fmt: skip


def test_frozen_cell_flags_only_the_strong_run():
    c = cell(_runs(), 0.01, 0.10)
    assert (c["power_where_used"]["k"], c["power_where_used"]["n"]) == (1, 3)
    assert c["flagged_where_ignored"]["k"] == 0 and c["false_flags"]["k"] == 0
    assert c["meets_goal"] is False


def test_looser_cutoffs_catch_more_and_flag_the_ignored_letter():
    c = cell(_runs(), 0.05, 0.03)
    assert c["power_where_used"]["k"] == 3
    assert c["flagged_where_ignored"]["k"] == 1  # the weak-probe letter the model ignores
    assert c["meets_goal"] is False  # 1/1 ignored flagged > 5 %


def test_misses_name_the_gate_that_stops_each_run():
    out = {(m["condition"], m["seed"]): m["fails"] for m in misses(_runs(), 0.01, 0.10)}
    assert out == {("ruler", 1): ["probe"], ("ruler", 2): ["concordance"]}
    assert misses(_runs(), 0.05, 0.03) == []


def test_test_queries_follow_the_phantom_split():
    assert n_test_queries(300) == 45 and n_test_queries(600) == 90
