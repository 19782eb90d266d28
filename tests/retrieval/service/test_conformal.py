"""Split-conformal sets: the finite-sample guarantee, exactly, on synthetic scores."""

import math

import numpy as np
import pytest

from retrieval.errors import CasebaseError
from retrieval.service import conformal
from retrieval.service.conformal import (
    ConformalCalibration,
    ConformalHead,
    conformal_quantile,
    label_scores,
    prediction_sets,
    quantile_rank,
    vote_probabilities,
)


def _synthetic(rng, n, k=3, sharp=2.0):
    """A calibrated synthetic model: labels drawn from its own probabilities."""
    logits = sharp * rng.normal(size=(n, k))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = (p.cumsum(1) > rng.uniform(size=(n, 1))).argmax(1)
    return p, y


def test_quantile_rank_is_the_ceiling_of_n_plus_one_times_coverage():
    assert quantile_rank(9, 0.9) == 9  # (9 + 1)·0.9 = 9 exactly: not 10 from float fuzz
    assert quantile_rank(10, 0.9) == 10  # 9.9 -> 10
    assert quantile_rank(19, 0.9) == 18
    assert quantile_rank(99, 0.95) == 95
    assert conformal_quantile(np.arange(8.0), 0.9) == math.inf  # n = 8 < 9: all labels
    assert conformal_quantile(np.arange(1.0, 11.0), 0.9) == 10.0
    with pytest.raises(CasebaseError):
        conformal_quantile(np.arange(5.0), 1.0)


def _mean_coverage(n, coverage, rank_shift=0, draws=4000, n_test=40):
    """Mean coverage over many calibration draws of randomised APS sets, through the public API.

    rank_shift moves q̂ by that many order statistics (an off-by-one quantile)."""
    rng = np.random.default_rng(12345)
    covered = []
    for _ in range(draws):
        p, y = _synthetic(rng, n + n_test)
        head = ConformalHead.calibrate(p[:n], y[:n], "aps", seed=int(rng.integers(1 << 30)))
        if rank_shift:
            s = np.sort(head.scores)
            r = quantile_rank(n, coverage) + rank_shift
            q = s[r - 1] if 1 <= r <= n else math.inf
            member = prediction_sets(p[n:], q, rng=rng)
        else:
            member = head.sets(p[n:], coverage, rng=rng)
        covered.append(member[np.arange(n_test), y[n:]].mean())
    return float(np.mean(covered)), float(np.std(covered) / math.sqrt(draws))


@pytest.mark.parametrize("n,coverage", [(10, 0.9), (19, 0.9), (13, 0.8)])
def test_finite_sample_guarantee_and_off_by_one_fails(n, coverage):
    # continuous scores: P(covered) = ⌈(n + 1)(1 − α)⌉ / (n + 1) exactly
    exact = quantile_rank(n, coverage) / (n + 1)
    assert coverage <= exact < coverage + 1 / (n + 1)
    got, se = _mean_coverage(n, coverage)  # se: standard error over the draws
    assert got >= coverage - 2 * se
    assert abs(got - exact) < 4 * se, (got, exact, se)
    # one order statistic lower misses the target; one higher over-covers past the exact value
    low, se = _mean_coverage(n, coverage, rank_shift=-1)
    assert low < coverage - 4 * se, (low, coverage, se)
    high, se = _mean_coverage(n, coverage, rank_shift=+1)
    assert high > exact + 4 * se, (high, exact, se)


def test_shown_sets_are_never_empty_supersets_of_the_randomised_ones():
    rng = np.random.default_rng(0)
    p, y = _synthetic(rng, 400, sharp=4.0)
    head = ConformalHead.calibrate(p[:200], y[:200])
    shown = head.sets(p[200:], 0.9)
    rand = head.sets(p[200:], 0.9, rng=np.random.default_rng(1))
    assert shown.sum(1).min() >= 1
    assert (shown >= rand).all()
    assert shown[np.arange(200), p[200:].argmax(1)].all()  # the top label is always in
    # sets grow with the coverage asked for
    assert (head.sets(p[200:], 0.99) >= head.sets(p[200:], 0.5)).all()


def test_scores_and_sets_agree():
    """A label is in its randomised set exactly when its score (same U) is at most q̂."""
    rng = np.random.default_rng(3)
    p, y = _synthetic(rng, 300)
    for lam in (0.0, 0.05):
        s = label_scores(p, y, np.random.default_rng(7), lam, 1)
        member = prediction_sets(p, 0.7, lam, 1, np.random.default_rng(7))
        assert ((s <= 0.7 + 1e-12) == member[np.arange(300), y]).all()


def test_mondrian_covers_each_group():
    """Two sites, one much harder: pooled sets under-cover it, per-site sets do not."""
    rng = np.random.default_rng(5)
    n = 4000
    p, _ = _synthetic(rng, n, sharp=3.0)
    g = np.where(rng.uniform(size=n) < 0.5, "A", "B")
    # site B's labels ignore the model half the time: the model is overconfident there
    y = (p.cumsum(1) > rng.uniform(size=(n, 1))).argmax(1)
    noisy = (g == "B") & (rng.uniform(size=n) < 0.5)
    y[noisy] = rng.integers(0, 3, noisy.sum())
    cal, test = slice(0, 2000), slice(2000, n)
    pooled = ConformalHead.calibrate(p[cal], y[cal])
    mondrian = ConformalHead.calibrate(p[cal], y[cal], groups=g[cal])
    rows = np.arange(2000)
    cov_pooled = pooled.sets(p[test], 0.9)[rows, y[test]]
    cov_m = mondrian.sets(p[test], 0.9, g[test], rng=np.random.default_rng(2))[rows, y[test]]
    b = g[test] == "B"
    assert cov_pooled[b].mean() < 0.87  # pooled q̂ is set mostly by the easy site
    assert cov_m[b].mean() > 0.88 and cov_m[~b].mean() > 0.88
    assert mondrian.qhat(0.9, "B") > mondrian.qhat(0.9, "A")
    assert mondrian.qhat(0.9, "unseen") == mondrian.qhat(0.9)  # falls back to pooled


def test_vote_probabilities_match_the_retriever_formula():
    sims = np.array([[0.9, 0.5, -0.2, 0.1], [-0.1, -0.3, -0.5, -0.9]])
    lab = np.array([[0, 1, 1, 2], [0, 1, 2, 2]])
    v = vote_probabilities(sims, lab, 3)
    assert np.allclose(v[0], [0.9 / 1.5, 0.5 / 1.5, 0.1 / 1.5])  # negative weight clipped
    assert np.allclose(v[1], 1 / 3)  # nothing positive: uniform


def test_calibration_round_trips_through_json():
    rng = np.random.default_rng(0)
    p, y = _synthetic(rng, 50)
    c = ConformalCalibration(
        0.9,
        "the val split (50 cases)",
        50,
        1.7,
        10,
        "site",
        {"classifier": ConformalHead.calibrate(p, y, "raps", np.array(["A", "B"] * 25))},
    )
    back = ConformalCalibration.from_json(c.to_json())
    h0, h1 = c.heads["classifier"], back.heads["classifier"]
    assert back.temperature == 1.7 and back.group_attribute == "site"
    assert h1.method == "raps" and h1.lam > 0
    assert np.allclose(h0.scores, h1.scores) and (h0.groups == h1.groups).all()
    assert (h0.sets(p, 0.8) == h1.sets(p, 0.8)).all()
    with pytest.raises(Exception, match="not a valid conformal calibration"):
        ConformalCalibration.from_json(b"{}")


def test_calibration_rows_are_the_cases_training_held_out():
    import pandas as pd

    from retrieval.model.train import _split_val

    n = 80
    df = pd.DataFrame(
        {
            "split": ["train"] * 76 + ["val"] * 4,  # 4 val cases: too few, training holds out
            "patient_id": [f"p{i // 3}" for i in range(n)],
            "case_id": [f"c{i}" for i in range(n)],
            "label": ["a", "b", "c", "d"] * 20,
        }
    )
    for seed in (0, 7):
        _, held, note = _split_val(df, seed)
        assert "4 val case(s) stay unseen" in note
        rows, where = conformal.calibration_rows(
            df["split"], df["patient_id"], df["case_id"], 4, seed
        )
        unseen = set(held.index) | set(np.flatnonzero(df["split"] == "val"))
        assert set(rows) == unseen, seed
        assert "held out" in where and f"seed {seed}" in where
    splits = df["split"].to_numpy().copy()
    splits[:30] = "val"
    rows, where = conformal.calibration_rows(splits, df["patient_id"], df["case_id"], 4)
    assert set(splits[rows]) == {"val"} and where.startswith("the val split")


def _build_inputs(rng, n=120, k=3):
    from index.vector_index import VectorIndex

    p, y = _synthetic(rng, n, k)
    vecs = rng.normal(size=(n, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    classes = ["a", "b", "c"]
    splits = np.array(["train"] * 60 + ["val"] * 60)
    patients = np.array([f"p{i // 2}" for i in range(n)])
    return dict(
        classes=classes,
        labels=np.array(classes)[y],
        splits=splits,
        patients=patients,
        case_ids=np.array([f"c{i}" for i in range(n)]),
        probabilities=p,
        vectors=vecs,
        vindex=VectorIndex.build(vecs, "Flat"),
    )


def test_build_calibration_records_both_heads_and_rejects_a_decalibrating_temperature(monkeypatch):
    from retrieval.service import calibration as cal

    rng = np.random.default_rng(4)
    args = _build_inputs(rng)
    out = conformal.calibrate_at_build(**args)
    assert out.meta["calibrated_on"].startswith("the val split (60")
    assert set(out.conformal.heads) == {"classifier", "knn_vote"}
    assert len(out.conformal.heads["knn_vote"].scores) == 60
    # a calibrated synthetic model: a forced sharp temperature would raise the ECE -> kept at 1
    monkeypatch.setattr(cal, "fit_temperature", lambda logits, y: 0.2)
    out = conformal.calibrate_at_build(**args)
    assert out.conformal.temperature == 1.0 and out.meta["temperature"] == 1.0
    assert out.meta["temperature_rejected"]["fitted"] == 0.2
    assert abs(out.meta["ece_after"] - out.meta["ece_before"]) < 1e-12
