"""Temperature scaling on perfectly separated held-out cases: the NLL has no minimum (it falls
towards 0 as T -> 0), so no temperature is fitted, T = 1 is kept and the build says why; and the
headline confidence quotes the same (calibrated) numbers as the probabilities line."""

from __future__ import annotations

import json

import numpy as np
from scipy.special import softmax

from index.vector_index import VectorIndex
from retrieval.commands.query import probabilities_line
from retrieval.service import calibration as cal
from retrieval.service import conformal
from retrieval.service.results import Prediction


def _separable(rng, n=20, k=2):
    """Every case's true class on top, with a healthy margin (a small, easy val split)."""
    y = np.arange(n) % k
    z = rng.normal(0, 0.3, (n, k))
    z[np.arange(n), y] += 4.0
    return softmax(z, 1), y


def test_separable_cases_keep_t_at_one_with_a_note():
    probs, y = _separable(np.random.default_rng(0))
    logits = cal.as_logits(probs)
    assert cal.separable(logits, y)
    # the trap: the NLL keeps falling as T shrinks, down to the search bound
    assert cal.nll(logits, y, cal.T_BOUNDS[0]) < cal.nll(logits, y, 0.5) < cal.nll(logits, y)
    assert cal.fit_temperature(logits, y) == 1.0
    note = cal.temperature_note(logits, y)
    assert note is not None and "perfectly separated" in note and "T = 1 kept" in note


def test_nll_minimum_on_the_bound_is_not_an_estimate():
    # 20 cases right by a margin of 1, one wrong by 1e-9: the NLL minimum lies below T = 0.05
    m = np.zeros((21, 2))
    m[:20, 0] = 1.0
    m[20, 1] = 1e-9
    y = np.zeros(21, np.int64)
    assert not cal.separable(m, y)
    assert cal.fit_temperature(m, y) == 1.0
    assert "search bound" in cal.temperature_note(m, y)


def test_overlapping_cases_are_still_fitted():
    rng = np.random.default_rng(1)
    z = 1.5 * rng.normal(size=(400, 3))
    y = (softmax(z, 1).cumsum(1) > rng.uniform(size=(400, 1))).argmax(1)
    probs = softmax(3.0 * z, 1)  # over-confident by a factor 3
    logits = cal.as_logits(probs)
    assert cal.temperature_note(logits, y) is None
    assert 2.0 < cal.fit_temperature(logits, y) < 4.0


def test_build_on_separable_val_keeps_t_one_and_records_why():
    rng = np.random.default_rng(2)
    n = 40
    probs, y = _separable(rng, n)
    vecs = rng.normal(size=(n, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    out = conformal.calibrate_at_build(
        classes=["blob", "ring"],
        labels=np.array(["blob", "ring"])[y],
        splits=np.array(["val"] * n),
        patients=np.array([""] * n),
        case_ids=np.array([f"c{i}" for i in range(n)]),
        probabilities=probs,
        vectors=vecs,
        vindex=VectorIndex.build(vecs, "Flat"),
    )
    assert out.meta["temperature"] == 1.0 and out.conformal.temperature == 1.0
    assert "perfectly separated" in out.meta["temperature_note"]
    assert "temperature_rejected" not in out.meta  # T = 1 is not "rejected" by float noise
    assert out.meta["nll_after"] == out.meta["nll_before"] > 0
    back = conformal.ConformalCalibration.from_json(out.conformal.to_json())
    assert back.temperature_note == out.meta["temperature_note"]
    assert json.loads(out.conformal.to_json())["temperature_note"]


def test_headline_and_probabilities_line_quote_the_same_numbers():
    p = Prediction("blob", {"blob": 0.61, "ring": 0.39})
    p.calibrated_probabilities = {"blob": 0.84, "ring": 0.16}
    p.temperature = 0.5
    p.set, p.set_coverage = ["blob"], 0.9
    head = conformal.describe_set(p)
    assert "Predicted blob (0.84 calibrated)" in head
    line = probabilities_line(p)
    assert line.startswith("probabilities (calibrated, T = 0.5): blob 0.84, ring 0.16")
    assert "model softmax: blob 0.61, ring 0.39" in line
    # without calibration both say the softmax, unlabelled as calibrated
    q = Prediction("blob", {"blob": 0.61, "ring": 0.39})
    assert "(0.61)" in conformal.describe_set(q)
    assert probabilities_line(q) == "probabilities (model softmax): blob 0.61, ring 0.39"
