"""eval's calibration section says why when the test ECE is higher after temperature scaling
(T is fitted on the calibration split), and says nothing otherwise."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd

from retrieval.commands.evaluate import _print_uncertainty
from retrieval.service import calibration as cal
from retrieval.service.conformal import ConformalCalibration, ConformalHead
from retrieval.service.uncertainty import uncertainty_sections

CLASSES = ["a", "b", "c"]


def _probs(n: int, conf: float, acc: float, seed: int = 0):
    """n cases whose top class has probability ``conf``, right a share ``acc`` of the time."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    top = np.where(rng.random(n) < acc, y, (y + 1) % 3)
    p = np.full((n, 3), (1 - conf) / 2)
    p[np.arange(n), top] = conf
    return p, y


def _sections(probs, y, temperature):
    calib = ConformalCalibration(
        0.9,
        "the val split (40 cases)",
        40,
        temperature,
        heads={"classifier": ConformalHead.calibrate(probs, y)},
    )
    r = SimpleNamespace(classes=CLASSES, conformal=calib)
    qs = SimpleNamespace(
        cases=pd.DataFrame({"label": [CLASSES[i] for i in y]}), probabilities=probs, hits=[]
    )
    return uncertainty_sections(r, qs, knn=False)[1]


def test_a_higher_test_ece_after_temperature_carries_a_note(capsys):
    probs, y = _probs(200, 0.8, 0.8)  # already calibrated: a T of 3 flattens it, ECE rises
    c = _sections(probs, y, 3.0)
    assert c["ece_after"] > c["ece_before"]
    note = c["ece_note"]
    assert "fitted on the val split (40 cases)" in note and "not on this test split" in note
    assert "does not improve ECE" in note and "T = 3.00" in note
    _print_uncertainty(
        SimpleNamespace(prediction_sets={"note": "x", "coverage": None}, calibration=c)
    )
    out = capsys.readouterr().out
    assert "calibration: ECE" in out and "note: temperature scaling raised the test ECE" in out


def test_no_note_when_temperature_helps_or_changes_nothing():
    probs, y = _probs(200, 0.99, 0.6)  # over-confident: T = 3 lowers the ECE
    c = _sections(probs, y, 3.0)
    assert c["ece_after"] < c["ece_before"] and "ece_note" not in c
    c = _sections(*_probs(200, 0.8, 0.8), 1.0)  # T = 1: the same ECE
    assert c["ece_after"] == c["ece_before"] and "ece_note" not in c


def test_ece_note_rule():
    assert cal.ece_note(0.05, 0.08, 1.3, 30, "the val split (20 cases)").startswith(
        "temperature scaling raised the test ECE (0.050 -> 0.080): T = 1.30 was fitted on "
        "the val split (20 cases), not on this test split (30 cases)"
    )
    assert cal.ece_note(0.08, 0.05, 1.3) is None
    assert cal.ece_note(0.05, 0.05, 1.0) is None
    assert cal.ece_note(None, 0.05, 1.0) is None and cal.ece_note(0.05, None, None) is None
