"""eval's uncertainty sections: prediction-set coverage and calibration on a held-out split.

`prediction_sets` is the classifier's (what `prediction.set` shows), with the
neighbour vote's under `knn_vote`; `calibration` is the expected calibration
error of the classifier before and after the bundle's temperature, and the
reliability-diagram tables (and a PNG when asked for).
"""

from __future__ import annotations

import numpy as np

from retrieval.service import calibration as cal
from retrieval.service import conformal


def uncertainty_sections(
    r, qs, coverage: float | None = None, knn: bool = True
) -> tuple[dict, dict]:
    """(prediction_sets, calibration) for an embedded QuerySet of a CaseRetriever.

    knn: also the neighbour vote's sets (needs qs.hits of at least the calibrated k).
    """
    classes = list(r.classes)
    code = {c: i for i, c in enumerate(classes)}
    y_all = np.array([code.get(str(v), -1) for v in qs.cases["label"]], np.int64)
    known = y_all >= 0
    y, probs = y_all[known], np.asarray(qs.probabilities, np.float64)[known]
    unknown = int((~known).sum())
    calib = r.conformal
    if calib is None or not len(y):
        note = conformal.NO_SETS_NOTE if calib is None else "no query with a known class"
        sets = {
            "target_coverage": None,
            "coverage": None,
            "mean_size": None,
            "by_class": {},
            "note": note,
        }
        before = cal.reliability(probs, y) if len(y) else None
        calibration = {
            "ece_before": None if before is None else before.ece,
            "ece_after": None,
            "temperature": None,
            "note": note,
            "reliability": {"before": None if before is None else before.to_json()},
        }
        return sets, calibration
    cov = conformal.check_coverage(calib.coverage if coverage is None else coverage)
    p_t = cal.apply_temperature(probs, calib.temperature)
    attr = calib.group_attribute or ("site" if "site" in qs.cases else None)
    groups = qs.cases[attr].to_numpy().astype(str)[known] if attr in qs.cases else None
    sets = conformal.set_report(calib.heads["classifier"], p_t, y, classes, cov, groups, attr)
    votes = None
    if knn:
        hits = [h for h, ok in zip(qs.hits, known, strict=True) if ok]
        k = calib.knn_k
        sims = np.array([[s for s, _ in h[:k]] + [0.0] * (k - len(h[:k])) for h in hits])
        labs = np.array(
            [
                [code.get(r.cases.at[row, "label"], -1) for _, row in h[:k]]
                + [-1] * (k - len(h[:k]))
                for h in hits
            ]
        )
        votes = conformal.vote_probabilities(
            sims.reshape(len(hits), k), labs.reshape(len(hits), k), len(classes)
        )
        sets["knn_vote"] = conformal.set_report(
            calib.heads["knn_vote"], votes, y, classes, cov, groups, attr, seed=1
        )
    sets["calibrated_on"] = calib.calibrated_on
    sets["n_calibration"] = calib.n
    if unknown:
        sets["skipped_unknown_label"] = unknown
    before, after = cal.reliability(probs, y), cal.reliability(p_t, y)
    logits = cal.as_logits(probs)
    calibration = {
        "ece_before": before.ece,
        "ece_after": after.ece,
        "temperature": calib.temperature,
        "nll_before": cal.nll(logits, y),
        "nll_after": cal.nll(logits, y, calib.temperature),
        "knn_vote_ece": None if votes is None else cal.ece(votes, y),
        "n": int(len(y)),
        "reliability": {"before": before.to_json(), "after": after.to_json()},
    }
    if calib.temperature_note:  # T = 1 kept: the calibration cases could not pin it down
        calibration["temperature_note"] = calib.temperature_note
    note = cal.ece_note(before.ece, after.ece, calib.temperature, int(len(y)), calib.calibrated_on)
    if note is not None:  # the test ECE rose after T: say why, so it is not read as a bug
        calibration["ece_note"] = note
    return sets, calibration


def reliability_plot(calibration: dict, title: str = "") -> bytes | None:
    """PNG of the before/after reliability diagram of a `calibration` section (None without)."""
    rel = calibration.get("reliability") or {}
    curves = {name: cal.Reliability(**d) for name, d in rel.items() if d is not None}
    if not curves:
        return None
    if "after" in curves:
        curves = {
            "softmax": curves["before"],
            f"temperature {calibration['temperature']:.2f}": curves["after"],
        }
    return cal.reliability_png(curves, title)
