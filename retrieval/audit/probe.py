"""Linear probe: how well can the attribute be read off the indexed embeddings?

A scikit-learn ``LogisticRegression`` (standardised inputs, class-balanced
weights) predicts the attribute's group from the embedding of every indexed
case, cross-validated with ``StratifiedGroupKFold`` grouped by patient (so a
patient's other images never help predict it; plain stratified folds when the
index has no patient ids), scored by balanced accuracy of the out-of-fold
predictions.

**Residualised on the label.** An attribute associated with the label (the
site of a hospital that sees more masses) is decodable from any good
embedding simply because the label is. The probe is therefore run *within each
label*: it is fitted and scored on the cases of one label at a time, and the
reported ``balanced_accuracy`` is the average over labels weighted by each
label's number of cases. Its ``chance`` is the same weighted average of
1 / (number of groups probed in that label), which is the expected balanced
accuracy of any predictor that ignores the embedding. Within a label, groups
with fewer than 2 cases cannot be cross-validated and are left out; a label
with fewer than 2 groups left is skipped. ``chance_permuted`` is the mean
balanced accuracy of the same probe after shuffling the attribute within
each label (a few shuffles): chance as this finite-sample procedure sees it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

MAX_FOLDS = 5
N_SHUFFLES = 3
MAX_PER_STRATUM = 3000  # cases per label the probe uses at most (subsampled, for speed)


@dataclass
class ProbeResult:
    balanced_accuracy: float | None
    chance: float | None
    chance_permuted: float | None
    n_cases: int
    per_label: dict[str, dict] = field(default_factory=dict)

    @property
    def margin(self) -> float | None:
        if self.balanced_accuracy is None or self.chance is None:
            return None
        return self.balanced_accuracy - self.chance

    def to_json(self) -> dict:
        return {
            "balanced_accuracy": self.balanced_accuracy,
            "chance": self.chance,
            "chance_permuted": self.chance_permuted,
            "margin": self.margin,
            "n_cases": self.n_cases,
            "per_label": self.per_label,
            "method": "logistic regression within each label, StratifiedGroupKFold by patient",
        }


def _classifier(seed: int):
    return make_pipeline(
        StandardScaler(),
        LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced", random_state=seed),
    )


def cv_balanced_accuracy(
    x: np.ndarray, y: np.ndarray, groups: np.ndarray | None, seed: int = 0
) -> float | None:
    """Out-of-fold balanced accuracy of the probe on (x, y); None if it cannot be cross-validated."""
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2 or counts.min() < 2:
        return None
    n_groups = len(np.unique(groups)) if groups is not None else len(y)
    n_splits = int(min(MAX_FOLDS, counts.min(), n_groups))
    if n_splits < 2:
        return None
    if groups is not None:
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        splits = splitter.split(x, y, groups)
    else:
        splits = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(x, y)
    pred = np.empty_like(y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence / single-class-fold warnings
        for train, test in splits:
            seen = np.unique(y[train])
            if len(seen) < 2:
                pred[test] = seen[0]
                continue
            clf = _classifier(seed).fit(x[train], y[train])
            pred[test] = clf.predict(x[test])
    return float(balanced_accuracy_score(y, pred))


def probe_attribute(
    vectors: np.ndarray,
    codes: np.ndarray,
    labels: np.ndarray,
    patients: np.ndarray | None = None,
    seed: int = 0,
    shuffles: int = N_SHUFFLES,
) -> ProbeResult:
    """Within-label probe of ``codes`` (-1 = missing) from ``vectors``; see the module docstring."""
    rng = np.random.default_rng(seed)
    codes = np.asarray(codes)
    labels = np.asarray(labels)
    if patients is not None:
        patients = np.asarray(patients)
        if (patients == "").all():
            patients = None
    per_label: dict[str, dict] = {}
    acc_w = chance_w = perm_w = 0.0
    total = 0
    perm_total = 0
    for lab in sorted(set(labels.tolist())):
        idx = np.flatnonzero((labels == lab) & (codes >= 0))
        if len(idx) > MAX_PER_STRATUM:
            idx = np.sort(rng.choice(idx, MAX_PER_STRATUM, replace=False))
        y = codes[idx]
        vals, counts = np.unique(y, return_counts=True)
        keep = np.isin(y, vals[counts >= 2])
        idx, y = idx[keep], y[keep]
        k = len(np.unique(y))
        if k < 2:
            per_label[str(lab)] = {
                "n": int(len(idx)),
                "skipped": "fewer than 2 groups with 2+ cases",
            }
            continue
        g = patients[idx] if patients is not None else None
        ba = cv_balanced_accuracy(vectors[idx], y, g, seed)
        if ba is None:
            per_label[str(lab)] = {"n": int(len(idx)), "skipped": "too few cases to cross-validate"}
            continue
        shuffled = []
        for _ in range(shuffles):
            s = cv_balanced_accuracy(vectors[idx], rng.permutation(y), g, seed)
            if s is not None:
                shuffled.append(s)
        per_label[str(lab)] = {
            "n": int(len(idx)),
            "n_groups": int(k),
            "balanced_accuracy": ba,
            "chance": 1.0 / k,
            "chance_permuted": float(np.mean(shuffled)) if shuffled else None,
        }
        acc_w += ba * len(idx)
        chance_w += len(idx) / k
        total += len(idx)
        if shuffled:
            perm_w += float(np.mean(shuffled)) * len(idx)
            perm_total += len(idx)
    if total == 0:
        return ProbeResult(None, None, None, 0, per_label)
    return ProbeResult(
        acc_w / total,
        chance_w / total,
        perm_w / perm_total if perm_total else None,
        total,
        per_label,
    )
