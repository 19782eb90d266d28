"""bench/audit_heldout.py's own logic: the label-tied tag column, exact intervals, the summary."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from audit_heldout import (  # noqa: E402
    add_label_tag,
    intervention_pull,
    rate_ci,
    rejudge,
    summarize,
)


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


def _run(cond, seed, flags, used=None):
    return {
        "condition": cond,
        "seed": seed,
        "used": used,
        "attributes": {k: {"flagged": v} for k, v in flags.items()},
    }


def test_summary_counts_power_false_flags_and_the_hard_case():
    runs = [_run("ruler", s, {"ruler": True, "site": False}, used=True) for s in range(10)]
    # marker: used in seeds 1-9, flagged in 1-8; ignored (and not flagged) in seed 0
    runs += [_run("marker", s, {"site": 0 < s < 9}, used=s != 0) for s in range(10)]
    runs += [_run("tag", s, {"tag": s == 0, "site": s == 1}) for s in range(10)]
    out = summarize(runs)
    c = out["conditions"]
    assert (c["ruler"]["k"], c["marker"]["k"], c["tag"]["k"], c["none"]["k"]) == (10, 8, 1, 1)
    assert out["power"]["rate"] == pytest.approx(18 / 20)
    assert out["power_where_used"]["rate"] == pytest.approx(18 / 19)
    assert out["flagged_where_ignored"]["k"] == 0 and out["flagged_where_ignored"]["n"] == 1
    assert out["used"]["marker"]["k"] == 9 and out["used"]["ruler"]["k"] == 10
    assert out["false_flags"]["rate"] == pytest.approx(2 / 20)
    assert out["cutoffs_held"] is False  # 0.10 false flags > 0.05 (and power 18/19 < 0.95)
    runs[-10] = _run("tag", 0, {"tag": False})
    runs[-9] = _run("tag", 1, {"tag": False})
    runs[19] = _run("marker", 9, {"site": True}, used=True)
    out = summarize(runs)
    assert out["cutoffs_held"] is True and out["power_where_used"]["rate"] == 1.0
    assert out["cutoffs_held_preregistered"] is True  # 19/20 flagged
    runs[11] = _run("marker", 1, {"site": False}, used=False)  # a second ignored marker
    out = summarize(runs)
    assert out["power"]["rate"] == pytest.approx(18 / 20) and out["cutoffs_held"] is True
    assert out["cutoffs_held_preregistered"] is False  # ignored confounders count against it


class _FakeRetriever:
    """Neighbours by device: a query image's 'embedding' is its device (read from the variant's
    file name, else the manifest), or a constant when ``ignores``; search returns the indexed
    cases of that device first."""

    def __init__(self, manifest, ignores):
        df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
        self.by_path = {
            str(manifest.parent / p): d for p, d in zip(df["image"], df["device"], strict=True)
        }
        self.cases = df[df["split"] != "test"].reset_index(drop=True)
        self.ignores = ignores
        self.devices = sorted(set(df["device"]))

    def encode_many(self, paths):
        import numpy as np
        import torch

        out = []
        for p in paths:
            name = Path(p).stem
            dev = name.split("_device_")[1] if "_device_" in name else self.by_path[str(p)]
            vec = np.zeros(len(self.devices), np.float32)
            vec[0 if self.ignores else self.devices.index(dev)] = 1.0
            out.append(type("C", (), {"embedding": torch.from_numpy(vec)})())
        return out

    def search(self, vectors, k, exclude_patients=None):
        hits = []
        for v in vectors:
            dev = self.devices[int(v.argmax())]
            same = [i for i, d in enumerate(self.cases["device"]) if d == dev or self.ignores]
            hits.append([(1.0, i) for i in same[:k]])
        return hits


@pytest.mark.parametrize("ignores", [False, True])
def test_intervention_pull_measures_how_neighbours_follow_the_changed_confounder(tmp_path, ignores):
    from retrieval.data.phantom import make_phantom

    phantom = dict(n=30, size=32, seed=1, confounder="scanner", strength=0.9, modality="photo")
    man = make_phantom(tmp_path / "data", **phantom)
    out = intervention_pull(_FakeRetriever(man, ignores), tmp_path, phantom, "device")
    n_test = int((pd.read_csv(man)["split"] == "test").sum())
    assert out["attribute"] == "device" and out["n_variants"] == 2 * n_test
    if ignores:
        assert out["pull"] == 0.0 and out["label_pull"] == 0.0
    else:  # every neighbour moves to the new device: pull = 1 - its share before (0)
        assert out["pull"] == 1.0 and out["label_pull"] > 0.5
    assert intervention_pull(_FakeRetriever(man, ignores), tmp_path, phantom, "tag") is None


def _attr(p, pq, lift=1.3, probe=None, v=0.9, vp=1e-9):
    return {
        "p_value": p,
        "p_value_query": pq,
        "lift": lift,
        "lift_query": lift,
        "probe_balanced_accuracy": probe,
        "chance": None if probe is None else 0.5,
        "label_association": v,
        "label_association_p": vp,
        "flagged": None,
    }


def test_rejudge_applies_the_rule_and_a_trial_alpha_to_stored_statistics():
    from retrieval.audit import verdict

    run = {
        "condition": "marker1",
        "attributes": {
            # query-side p 0.002 among 3 attributes: Holm 0.006 -> flagged at 0.01 (probe n/a)
            "site": _attr(1.0, 0.002),
            # Holm 0.04: flagged only at alpha 0.05
            "device": _attr(1.0, 0.02, probe=0.8),
            # concordant, but not associated with the label: never flagged
        },
    }
    run["attributes"]["sex"] = _attr(0.001, 1.0, probe=0.9, v=0.02, vp=0.5)
    out = rejudge([run])[0]["attributes"]
    assert out["site"]["flagged"] and not out["device"]["flagged"]
    assert not out["sex"]["flagged"] and out["sex"]["retrieval_bias"]
    assert out["site"]["p_value_holm_query"] == pytest.approx(0.002 * 3)
    loose = rejudge([run], alpha=0.05)[0]["attributes"]
    assert loose["device"]["flagged"] and not loose["sex"]["flagged"]
    assert verdict.ALPHA == 0.01  # restored
    assert run["attributes"]["site"]["flagged"] is None  # the input is not modified
