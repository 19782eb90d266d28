"""The "I don't know" flag: how far a query lies from every indexed case.

score = 1 − mean cosine similarity of the query's unit-norm average-pooled
feature map to its k = 5 nearest reference cases (deep k-NN, Sun et al. 2022).

Why these features and not the classifier's confidence or the embedding: a
softmax is confidently wrong far from the training data, and the triplet-
trained embedding is deliberately collapsed onto a few class directions, so an
image unlike every case can still land on one of them (measured on the
phantom: a street photo's embedding sat at similarity 0.999 to a class). The
pooled features before the projection keep what the image looks like: there
the same photos score 4–10× above the threshold while 2% of test cases do.
The threshold is calibrated at build time on held-out in-distribution cases
(the val split searched against the train split; without a val split,
leave-one-patient-out over the index) at a stated false-flag rate (5%), and
stored in the bundle with the reference features (at most 20,000 cases,
sampled, as `ood_reference.npy`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OOD_K = 5
OOD_REFERENCE = "ood_reference.npy"
FALSE_FLAG_RATE = 0.05


@dataclass
class OODCalibration:
    k: int
    threshold: float
    false_flag_rate: float
    n_calibration: int
    method: str
    reference_rows: np.ndarray | None = None  # which vectors form the stored reference

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "reference_rows"}


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
    max_reference: int = 20_000,
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
    rng = np.random.default_rng(seed)
    if len(ref) > max_reference:
        ref = np.sort(rng.choice(ref, max_reference, replace=False))
    if len(held) > max_cases:
        held = np.sort(rng.choice(held, max_cases, replace=False))
    scores = _topk_excluding(vectors, held, ref, patients, k)
    threshold = float(np.quantile(scores, 1.0 - false_flag_rate)) if len(scores) else 1.0
    return OODCalibration(
        min(k, len(ref)), threshold, false_flag_rate, int(len(scores)), method, ref
    )


def score(query_features: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
    """OOD scores of (Q, C) unit-norm features against the stored reference."""
    sims = np.atleast_2d(query_features).astype(np.float32) @ reference.T
    kk = max(1, min(k, sims.shape[1]))
    return knn_score(-np.partition(-sims, kk - 1, axis=1)[:, :kk])
