"""bench/audit_heldout.py's own logic: the label-tied tag column, exact intervals, the summary."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from audit_heldout import add_label_tag, rate_ci, summarize  # noqa: E402


def _manifest(tmp_path, n=600):
    labels = ["a", "b", "c"]
    split = ["train"] * (n // 2) + ["test"] * (n - n // 2)
    df = pd.DataFrame(
        {"case_id": range(n), "label": [labels[i % 3] for i in range(n)], "split": split}
    )
    p = tmp_path / "manifest.csv"
    df.to_csv(p, index=False)
    return p


def test_tag_is_tied_to_the_label_on_train_only_and_added_once(tmp_path):
    p = _manifest(tmp_path)
    add_label_tag(p, seed=3, strength=0.9)
    df = pd.read_csv(p)
    code = df["label"].map({"a": "t0", "b": "t1", "c": "t2"})
    agree = df["tag"] == code
    train, test = df["split"] == "train", df["split"] == "test"
    # 0.9 tied + 0.1 * 1/3 random hits: ~0.93 on train, ~1/3 on test
    assert agree[train].mean() > 0.85
    assert 0.2 < agree[test].mean() < 0.47
    before = p.read_text()
    add_label_tag(p, seed=4)
    assert p.read_text() == before


def test_rate_ci_is_the_exact_interval():
    r = rate_ci(0, 10)
    assert r["rate"] == 0 and r["ci95"][0] == 0
    assert r["ci95"][1] == pytest.approx(1 - 0.025 ** (1 / 10))  # Clopper-Pearson for 0/n
    r = rate_ci(10, 10)
    assert r["ci95"][0] == pytest.approx(0.025 ** (1 / 10)) and r["ci95"][1] == 1
    assert rate_ci(0, 0)["rate"] is None


def _run(cond, seed, flags, learned=None):
    return {
        "condition": cond,
        "seed": seed,
        "learned": learned,
        "attributes": {k: {"flagged": v} for k, v in flags.items()},
    }


def test_summary_counts_power_false_flags_and_the_hard_case():
    runs = [_run("ruler", s, {"ruler": True, "site": False}, learned=True) for s in range(10)]
    runs += [_run("marker", s, {"site": s != 0, "ruler": False}, learned=s != 0) for s in range(10)]
    runs += [_run("tag", s, {"tag": s == 0, "site": s == 1}) for s in range(10)]
    out = summarize(runs)
    c = out["conditions"]
    assert (c["ruler"]["k"], c["marker"]["k"], c["tag"]["k"], c["none"]["k"]) == (10, 9, 1, 1)
    assert out["power"]["rate"] == pytest.approx(19 / 20)
    assert out["power_where_learned"]["rate"] == 1.0 and out["learned"]["k"] == 19
    assert out["false_flags"]["rate"] == pytest.approx(2 / 20)
    assert out["cutoffs_held"] is False  # 0.10 false flags > 0.05
    runs[-10] = _run("tag", 0, {"tag": False})
    runs[-9] = _run("tag", 1, {"tag": False})
    assert summarize(runs)["cutoffs_held"] is True
