"""The "I don't know" flag: how far a query's embedding lies from every indexed case.

score = 1 − mean cosine similarity to the k nearest indexed cases (k = 5).

Deep-kNN distance on the normalised embedding (Sun et al., 2022) rather than
the classifier's confidence: a softmax is confidently wrong far from the
training data, while an image unlike every indexed case is far from all of
them whatever class the head would pick. The threshold is calibrated at build
time on held-out in-distribution cases (the val split searched against the
train split; without a val split, leave-one-patient-out over the index) at a
stated false-flag rate, and stored in the bundle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OOD_K = 5
FALSE_FLAG_RATE = 0.05


@dataclass
class OODCalibration:
    k: int
    threshold: float
    false_flag_rate: float
    n_calibration: int
    method: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def knn_score(similarities: np.ndarray) -> np.ndarray:
    """(Q, k) neighbour similarities -> (Q,) OOD scores (higher = less familiar)."""
    sims = np.atleast_2d(similarities).astype(np.float64)
    return (1.0 - sims.mean(axis=1)).astype(np.float32)


def _topk_excluding(vectors, rows, ref, patients, k, chunk=64):
    """Mean top-k similarity of vectors[rows] against vectors[ref], skipping own case and patient."""
    out = []
    ref_vecs, ref_pat = vectors[ref], patients[ref]
    for start in range(0, len(rows), chunk):
        r = rows[start : start + chunk]
        sims = vectors[r] @ ref_vecs.T
        same = (patients[r][:, None] == ref_pat[None, :]) & (patients[r][:, None] != "")
        same |= r[:, None] == ref[None, :]
        sims = np.where(same, -np.inf, sims)
        kk = min(k, sims.shape[1])
        top = -np.partition(-sims, kk - 1, axis=1)[:, :kk]
        out.append(knn_score(np.where(np.isfinite(top), top, -1.0)))
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def calibrate(
    vectors: np.ndarray,
    splits: np.ndarray,
    patients: np.ndarray,
    k: int = OOD_K,
    false_flag_rate: float = FALSE_FLAG_RATE,
    max_cases: int = 2000,
    seed: int = 0,
) -> OODCalibration:
    """Pick the threshold that flags `false_flag_rate` of held-out in-distribution cases."""
    vectors = np.asarray(vectors, np.float32)
    splits, patients = np.asarray(splits).astype(str), np.asarray(patients).astype(str)
    held = np.flatnonzero(splits == "val")
    ref = np.flatnonzero(splits == "train")
    if len(held) >= 10 and len(ref) > k:
        method = "val split searched against the train split"
    else:
        held = ref = np.arange(len(vectors))
        method = "leave-one-patient-out over the indexed cases"
    if len(held) > max_cases:
        held = np.sort(np.random.default_rng(seed).choice(held, max_cases, replace=False))
    scores = _topk_excluding(vectors, held, ref, patients, k)
    threshold = float(np.quantile(scores, 1.0 - false_flag_rate)) if len(scores) else 1.0
    return OODCalibration(min(k, len(ref)), threshold, false_flag_rate, int(len(scores)), method)
