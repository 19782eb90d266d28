"""Split-conformal prediction sets: labels that hold the true one with a stated probability.

Adaptive prediction sets (APS, Romano et al. 2020) and their regularised form
(RAPS, Angelopoulos et al. 2021). A calibration case's score is the
probability mass ranked above its true label plus a uniform share ``U·p`` of
its own (plus ``λ·(rank − k_reg)⁺`` for RAPS). With n exchangeable
calibration scores, the threshold

    q̂ = the ⌈(n + 1)(1 − α)⌉-th smallest score   (+∞ when that exceeds n)

gives sets {y : score(x, y) ≤ q̂} that contain the true label with probability
≥ 1 − α for any model (and ≤ 1 − α + 1/(n + 1) for the randomised sets).

Two kinds of set, both from the same q̂:

* ``randomize=True``: the exact-coverage sets of the theory (a draw of U per
  case; a set can be empty when the model is more accurate than the target).
  eval reports them as the measure of calibration.
* ``randomize=False`` (what a query shows): U = 0, so each set is the
  randomised one's superset, never empty and reproducible; coverage is
  ≥ 1 − α but can exceed it (never below the classifier's top-1 accuracy).

Mondrian (group-conditional) calibration keeps one q̂ per group (e.g. per
site), so coverage holds within each group; a query from an unseen or unnamed
group falls back to the pooled q̂.

Why hand-written: MAPIE, crepes and TorchCP wrap a fitted estimator and
persist it by pickling, which a bundle forbids; here the calibration scores
are plain numbers in ``conformal.json`` and any coverage is one sort away at
query time.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from retrieval.errors import BundleError, CasebaseError

CONFORMAL_FILE = "conformal.json"
DEFAULT_COVERAGE = 0.9
METHODS = ("aps", "raps")
RAPS_LAMBDA = 0.01
RAPS_K_REG = 1


def check_coverage(coverage: float) -> float:
    c = float(coverage)
    if not 0.0 < c < 1.0:
        raise CasebaseError(f"coverage {coverage!r}: must lie strictly between 0 and 1, e.g. 0.9")
    return c


def quantile_rank(n: int, coverage: float) -> int:
    """1-based rank of q̂ among n sorted scores: ⌈(n + 1)·coverage⌉ (may exceed n)."""
    # the epsilon stops (n + 1)·coverage = 9.000000000000002 from rounding up to 10
    return int(math.ceil((n + 1) * coverage - 1e-9))


def min_calibration(coverage: float) -> int:
    """Fewest calibration cases with a finite q̂ at this coverage (9 for 90 %, 19 for 95 %):
    with fewer, ⌈(n + 1)·coverage⌉ > n and every set holds every class."""
    c = check_coverage(coverage)
    n = max(1, int(math.floor(c / (1 - c))) - 1)
    while quantile_rank(n, c) > n:
        n += 1
    return n


def too_few_note(n: int, coverage: float) -> str | None:
    """Why a set holds every class when n calibration cases cannot support the coverage."""
    need = min_calibration(coverage)
    if n >= need:
        return None
    return (
        f"only {n} calibration case{'s' if n != 1 else ''}: a {coverage:.0%} set needs at "
        f"least {need}, so it holds every class"
    )


def conformal_quantile(scores: np.ndarray, coverage: float) -> float:
    """q̂ with the finite-sample correction; +inf when n is too small for the coverage."""
    scores = np.sort(np.asarray(scores, np.float64).ravel())
    k = quantile_rank(len(scores), check_coverage(coverage))
    return float(scores[k - 1]) if 1 <= k <= len(scores) else math.inf


def _ranked(probs: np.ndarray, lam: float, k_reg: int):
    """Per (case, label): mass ranked strictly above it, and the RAPS penalty at its rank."""
    probs = np.atleast_2d(np.asarray(probs, np.float64))
    order = np.argsort(-probs, axis=1, kind="stable")
    sorted_p = np.take_along_axis(probs, order, axis=1)
    above_sorted = np.cumsum(sorted_p, axis=1) - sorted_p
    rank = np.arange(1, probs.shape[1] + 1)
    pen_sorted = np.broadcast_to(lam * np.maximum(0, rank - k_reg), probs.shape)
    above, pen = np.empty_like(probs), np.empty_like(probs)
    np.put_along_axis(above, order, above_sorted, axis=1)
    np.put_along_axis(pen, order, pen_sorted, axis=1)
    return probs, above, pen


def label_scores(
    probs: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator | None,
    lam: float = 0.0,
    k_reg: int = RAPS_K_REG,
) -> np.ndarray:
    """Nonconformity of each case's true label (randomised when rng is given)."""
    probs, above, pen = _ranked(probs, lam, k_reg)
    idx = np.arange(len(probs)), np.asarray(labels, np.int64)
    u = rng.uniform(size=len(probs)) if rng is not None else np.ones(len(probs))
    return above[idx] + u * probs[idx] + pen[idx]


def prediction_sets(
    probs: np.ndarray,
    qhat: np.ndarray | float,
    lam: float = 0.0,
    k_reg: int = RAPS_K_REG,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """(N, K) boolean membership; qhat is a scalar or one threshold per case."""
    probs, above, pen = _ranked(probs, lam, k_reg)
    u = rng.uniform(size=(len(probs), 1)) if rng is not None else 0.0
    q = np.asarray(qhat, np.float64).reshape(-1, 1) if np.ndim(qhat) else qhat
    return above + u * probs + pen <= q + 1e-12


@dataclass
class ConformalHead:
    """Calibration scores of one predictor (the classifier or the neighbour vote)."""

    method: str
    scores: np.ndarray  # randomised APS/RAPS scores of the calibration cases' true labels
    groups: np.ndarray | None = None  # each score's Mondrian group, when calibrated per group
    lam: float = 0.0
    k_reg: int = RAPS_K_REG

    @classmethod
    def calibrate(
        cls,
        probs: np.ndarray,
        labels: np.ndarray,
        method: str = "aps",
        groups: np.ndarray | None = None,
        seed: int = 0,
    ) -> ConformalHead:
        if method not in METHODS:
            raise CasebaseError(f"conformal method {method!r}: use one of {', '.join(METHODS)}")
        lam = RAPS_LAMBDA if method == "raps" else 0.0
        scores = label_scores(probs, labels, np.random.default_rng(seed), lam, RAPS_K_REG)
        g = None if groups is None else np.asarray(groups).astype(str)
        return cls(method, scores, g, lam, RAPS_K_REG)

    def qhat(self, coverage: float, group: str | None = None) -> float:
        if self.groups is not None and group is not None and (self.groups == str(group)).any():
            return conformal_quantile(self.scores[self.groups == str(group)], coverage)
        return conformal_quantile(self.scores, coverage)

    def n_scores(self, group: str | None = None) -> int:
        """Calibration cases behind qhat(coverage, group): the group's, or all of them."""
        if self.groups is not None and group is not None and (self.groups == str(group)).any():
            return int((self.groups == str(group)).sum())
        return int(len(self.scores))

    def sets(
        self,
        probs: np.ndarray,
        coverage: float,
        groups=None,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """Membership (N, K); groups: None or one group value per row (Mondrian)."""
        probs = np.atleast_2d(probs)
        if groups is None or self.groups is None:
            q = self.qhat(coverage)
        else:
            q = np.array([self.qhat(coverage, g) for g in groups])
        return prediction_sets(probs, q, self.lam, self.k_reg, rng)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "lambda": self.lam,
            "k_reg": self.k_reg,
            "scores": [round(float(s), 9) for s in self.scores],
            "groups": None if self.groups is None else [str(g) for g in self.groups],
        }

    @classmethod
    def from_dict(cls, d: dict) -> ConformalHead:
        groups = d.get("groups")
        return cls(
            str(d["method"]),
            np.asarray(d["scores"], np.float64),
            None if groups is None else np.asarray(groups, dtype=str),
            float(d.get("lambda", 0.0)),
            int(d.get("k_reg", RAPS_K_REG)),
        )


@dataclass
class ConformalCalibration:
    """What the bundle stores: default coverage, temperature, one head per predictor."""

    coverage: float
    calibrated_on: str  # which cases, in words (val split, or a held-out part of train)
    n: int
    temperature: float = 1.0  # applied to the classifier's probabilities before its head
    knn_k: int = 10  # neighbours in the calibrated vote
    group_attribute: str | None = None  # Mondrian: the case attribute defining the groups
    heads: dict[str, ConformalHead] = field(default_factory=dict)
    temperature_note: str | None = None  # why T = 1 was kept rather than fitted

    def to_json(self) -> bytes:
        body = {
            **({"temperature_note": self.temperature_note} if self.temperature_note else {}),
            "version": 1,
            "coverage": self.coverage,
            "calibrated_on": self.calibrated_on,
            "n": self.n,
            "temperature": self.temperature,
            "knn_k": self.knn_k,
            "group_attribute": self.group_attribute,
            "heads": {k: h.to_dict() for k, h in self.heads.items()},
        }
        return (json.dumps(body, sort_keys=True) + "\n").encode()

    def summary(self) -> dict:
        """The small part that goes into bundle.json (no scores)."""
        return {
            "coverage": self.coverage,
            "calibrated_on": self.calibrated_on,
            "n": self.n,
            "temperature": self.temperature,
            "knn_k": self.knn_k,
            "group_attribute": self.group_attribute,
            "methods": {k: h.method for k, h in self.heads.items()},
            "file": CONFORMAL_FILE,
            **({"temperature_note": self.temperature_note} if self.temperature_note else {}),
        }

    @classmethod
    def from_json(cls, raw: bytes | str, where: str = CONFORMAL_FILE) -> ConformalCalibration:
        try:
            d = json.loads(raw)
            return cls(
                float(d["coverage"]),
                str(d["calibrated_on"]),
                int(d["n"]),
                float(d.get("temperature", 1.0)),
                int(d.get("knn_k", 10)),
                d.get("group_attribute"),
                {k: ConformalHead.from_dict(h) for k, h in d["heads"].items()},
                d.get("temperature_note"),
            )
        except (ValueError, KeyError, TypeError) as err:
            raise BundleError(f"{where}: not a valid conformal calibration ({err})") from None


# ------------------------------------------------------------------ build time
MIN_CALIBRATION = 20  # fewer val cases than this: hold out part of train instead
HELD_OUT_SHARE = 0.15  # as retrieval.model.train._split_val
KNN_K = 10


def vote_probabilities(sims: np.ndarray, label_idx: np.ndarray, n_classes: int) -> np.ndarray:
    """Similarity-weighted neighbour vote (weights clipped at 0), as CaseRetriever.knn_vote.

    sims, label_idx: (N, k); label_idx −1 marks a neighbour whose label is no class.
    """
    sims, label_idx = np.atleast_2d(sims), np.atleast_2d(label_idx)
    out = np.zeros((len(sims), n_classes))
    w = np.where(label_idx >= 0, np.maximum(np.asarray(sims, np.float64), 0.0), 0.0)
    rows = np.repeat(np.arange(len(sims)), sims.shape[1])
    np.add.at(out, (rows, np.maximum(label_idx, 0).ravel()), w.ravel())
    total = out.sum(1, keepdims=True)
    return np.where(total > 0, out / np.where(total > 0, total, 1.0), 1.0 / n_classes)


def _neighbours_excluding(vindex, vectors, rows, patients, case_ids, k):
    """Top-k (sims, ids) of index rows `rows` in the index, skipping their own patient (or case).

    vectors, patients, case_ids: one per index row, in id order.
    """
    own = np.where(patients != "", patients, case_ids)
    sims_out = np.full((len(rows), k), -1.0)
    ids_out = np.full((len(rows), k), -1, np.int64)
    kk = min(vindex.ntotal, k + 16)
    todo = np.arange(len(rows))
    while len(todo):
        sims, ids = vindex.search(vectors[rows[todo]], kk)
        retry = []
        for j, qi in enumerate(todo):
            ok = (ids[j] >= 0) & (own[np.maximum(ids[j], 0)] != own[rows[qi]])
            s, i = sims[j][ok][:k], ids[j][ok][:k]
            if len(s) < k and kk < vindex.ntotal:
                retry.append(qi)
                continue
            sims_out[qi, : len(s)], ids_out[qi, : len(i)] = s, i
        todo = np.array(retry, np.int64)
        kk = min(vindex.ntotal, kk * 4)
    return sims_out, ids_out


def calibration_rows(
    splits: np.ndarray,
    patients: np.ndarray,
    case_ids: np.ndarray | None = None,
    n_classes: int = 2,
    train_seed: int = 0,
):
    """(rows, in words): cases no training step saw, to calibrate on.

    The val split when it has MIN_CALIBRATION cases. With a smaller one, training
    (retrieval.model.train._split_val) either used it (6+ cases and 2 per class: so do we) or
    held out ~15 % of the train patients instead: the same patients, drawn the same way
    with the model's training seed, plus the unused val cases.
    """
    splits = np.asarray(splits).astype(str)
    val = np.flatnonzero(splits == "val")
    if len(val) >= MIN_CALIBRATION:
        return val, f"the val split ({len(val)} cases)"
    train = np.flatnonzero(splits == "train")
    if len(val) >= max(6, 2 * n_classes) or not len(train):
        return val, f"the val split ({len(val)} cases: few, so the sets are coarse)"
    pats = np.asarray(patients).astype(str)[train]
    ids = np.asarray(case_ids).astype(str)[train] if case_ids is not None else train.astype(str)
    groups = pats if (pats != "").all() else ids
    uniq = sorted(set(groups.tolist()))
    rng = np.random.default_rng(train_seed)
    held = set(rng.choice(uniq, size=max(1, int(round(HELD_OUT_SHARE * len(uniq)))), replace=False))
    rows = np.sort(np.concatenate([train[np.isin(groups, list(held))], val]))
    return rows, (
        f"{len(rows)} held-out cases: the {len(held)} train patients that training held out for "
        f"validation (no val split of {MIN_CALIBRATION}+ cases; drawn as training draws them, "
        f"seed {train_seed}, so exact only when the index holds the training manifest's cases)"
        + (f" and {len(val)} val cases" if len(val) else "")
    )


@dataclass
class BuildCalibration:
    conformal: ConformalCalibration | None
    meta: dict  # bundle.json "calibration" (temperature, ECE before/after) or why none


def calibrate_at_build(
    classes: list[str],
    labels: np.ndarray,
    splits: np.ndarray,
    patients: np.ndarray,
    case_ids: np.ndarray,
    probabilities: np.ndarray,
    vectors: np.ndarray,
    vindex,
    coverage: float = DEFAULT_COVERAGE,
    method: str = "aps",
    group_values: np.ndarray | None = None,
    group_attribute: str | None = None,
    seed: int = 0,
    train_seed: int = 0,
) -> BuildCalibration:
    """Temperature, and conformal heads for the classifier and the neighbour vote."""
    from retrieval.service import calibration as cal

    coverage = check_coverage(coverage)
    code = {c: i for i, c in enumerate(classes)}
    y_all = np.array([code.get(str(v), -1) for v in labels])
    rows, where = calibration_rows(splits, patients, case_ids, len(classes), train_seed)
    rows = rows[y_all[rows] >= 0]
    if len(rows) < 2:
        why = "too few held-out cases with a known class to calibrate prediction sets"
        return BuildCalibration(None, {"available": False, "reason": why})
    y = y_all[rows]
    logits = cal.as_logits(probabilities[rows])
    t = cal.fit_temperature(logits, y)
    t_note = cal.temperature_note(logits, y)  # why T = 1 was kept (separated cases), or None
    rejected = None
    if t != 1.0 and cal.ece(cal.apply_temperature(probabilities[rows], t), y) > cal.ece(
        probabilities[rows], y
    ):
        # the NLL optimum made the reliability worse on these very cases (e.g. a model near
        # chance): keep the softmax as it is rather than ship a calibration that decalibrates
        rejected, t = t, 1.0
    p_t = cal.apply_temperature(probabilities[rows], t)
    meta = {
        "available": True,
        "calibrated_on": where,
        "n": int(len(rows)),
        "temperature": t,
        "ece_before": cal.ece(probabilities[rows], y),
        "ece_after": cal.ece(p_t, y),
        "nll_before": cal.nll(logits, y),
        "nll_after": cal.nll(logits, y, t),
        "note": "on the calibration cases themselves (T is fitted there); eval reports test ECE",
    }
    if t_note is not None and t == 1.0:
        meta["temperature_note"] = t_note
    if rejected is not None:
        meta["temperature_rejected"] = {
            "fitted": rejected,
            "why": "it lowered the NLL but raised the ECE on the calibration cases; T = 1 kept",
        }
    k = min(KNN_K, max(1, vindex.ntotal - 1))
    sims, ids = _neighbours_excluding(
        vindex,
        np.asarray(vectors, np.float32),
        rows,
        np.asarray(patients).astype(str),
        np.asarray(case_ids).astype(str),
        k,
    )
    votes = vote_probabilities(
        sims, np.where(ids >= 0, y_all[np.maximum(ids, 0)], -1), len(classes)
    )
    groups = None if group_values is None else np.asarray(group_values).astype(str)[rows]
    conf = ConformalCalibration(
        coverage,
        where,
        int(len(rows)),
        t,
        k,
        group_attribute if groups is not None else None,
        {
            "classifier": ConformalHead.calibrate(p_t, y, method, groups, seed),
            "knn_vote": ConformalHead.calibrate(votes, y, method, groups, seed + 1),
        },
        meta.get("temperature_note"),
    )
    if not math.isfinite(conf.heads["classifier"].qhat(coverage)):
        meta["warning"] = (
            f"{len(rows)} calibration cases are too few for {coverage:.0%} sets: "
            "every set holds every label"
        )
    return BuildCalibration(conf, meta)


def calibrate_table(
    config,
    kept,
    probabilities: np.ndarray,
    vectors: np.ndarray,
    vindex,
    coverage: float = DEFAULT_COVERAGE,
    method: str = "aps",
    group_attribute: str | None = None,
) -> BuildCalibration:
    """calibrate_at_build on the bundle's case table; config: the model's ModelConfig."""
    if group_attribute and group_attribute not in kept.columns:
        raise CasebaseError(
            f"--mondrian {group_attribute}: no such column in the manifest "
            f"(columns: {', '.join(map(str, kept.columns))})"
        )
    attempts = (getattr(config, "training", None) or {}).get("attempts") or [{}]
    return calibrate_at_build(
        list(config.classes),
        kept["label"].to_numpy(),
        kept["split"].to_numpy(),
        kept["patient_id"].to_numpy(),
        kept["case_id"].to_numpy(),
        probabilities,
        vectors,
        vindex,
        coverage,
        method,
        kept[group_attribute].to_numpy() if group_attribute else None,
        group_attribute or None,
        train_seed=int(attempts[0].get("seed", 0)),
    )


def load(index_dir) -> ConformalCalibration | None:
    """The bundle's calibration, or None for a bundle built before prediction sets existed."""
    from pathlib import Path

    path = Path(index_dir) / CONFORMAL_FILE
    if not path.is_file():
        return None
    return ConformalCalibration.from_json(path.read_bytes(), str(path))


NO_SETS_NOTE = (
    "no prediction set: this index was built before calibrated sets existed "
    "(rebuild it with casebase index build to get them)"
)


def join_or(labels: list[str]) -> str:
    return " or ".join(labels)


def join_and(labels: list[str]) -> str:
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]


def describe_set(pred, ood_flag: bool = False) -> str:
    """The plain sentence for a Prediction's set: "mass or nodule: 90% set" and what it means."""
    conf = pred.confidence_text
    if pred.set is None:
        return f"Predicted {pred.label} ({conf}); {pred.set_note or NO_SETS_NOTE}."
    cov = f"{pred.set_coverage:.0%}"
    too_few = getattr(pred, "set_uninformative", None)
    why = f"; {too_few}" if too_few else ""
    knn = ""
    if pred.knn_set is not None and sorted(pred.knn_set) != sorted(pred.set):
        knn = f" The neighbour vote's {cov} set: {join_or(pred.knn_set)}."
    if ood_flag:
        return (
            f" Its {cov} set ({join_or(pred.set)}{why}) is not to be relied on: the coverage "
            "holds only for images like the indexed cases."
        )
    if len(pred.set) == 1:
        return f"Predicted {pred.label} ({conf}); {pred.label}: {cov} set, a single label.{knn}"
    return (
        f"Ambiguous between {join_and(pred.set)} ({join_or(pred.set)}: {cov} set{why}); "
        f"the model leans to {pred.label} ({conf}).{knn}"
    )


# ------------------------------------------------------------------ evaluation
def clopper_pearson(k: int, n: int, level: float = 0.95) -> list[float]:
    """Exact binomial confidence interval of a coverage k / n."""
    from scipy.stats import beta

    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return [lo, hi]


def _summary(member: np.ndarray, y: np.ndarray) -> dict:
    hit = member[np.arange(len(y)), y]
    size = member.sum(1)
    return {
        "n": int(len(y)),
        "coverage": float(hit.mean()) if len(y) else None,
        "mean_size": float(size.mean()) if len(y) else None,
    }


def set_report(
    head: ConformalHead,
    probs: np.ndarray,
    y: np.ndarray,
    classes: list[str],
    coverage: float,
    groups: np.ndarray | None = None,
    group_attribute: str | None = None,
    seed: int = 0,
) -> dict:
    """Test-split coverage and size of a head's sets: shown (U = 0) and randomised (exact)."""
    probs, y = np.atleast_2d(probs), np.asarray(y, np.int64)
    use_groups = groups if head.groups is not None else None
    member = head.sets(probs, coverage, use_groups)
    rand = head.sets(probs, coverage, use_groups, np.random.default_rng(seed))
    out = _summary(member, y)
    hits = int(member[np.arange(len(y)), y].sum())
    out.update(
        {
            "target_coverage": coverage,
            "coverage_ci95": clopper_pearson(hits, len(y)) if len(y) else None,
            "singleton_share": float((member.sum(1) == 1).mean()) if len(y) else None,
            "qhat": head.qhat(coverage),
            "method": head.method,
            "by_class": {c: _summary(member[y == i], y[y == i]) for i, c in enumerate(classes)},
            "randomized": {
                **_summary(rand, y),
                "empty_share": float((rand.sum(1) == 0).mean()) if len(y) else None,
                "note": "exact-coverage sets of the theory (one uniform draw per case); "
                "they can be empty, so queries show the never-empty U = 0 sets above",
            },
        }
    )
    if not math.isfinite(out["qhat"]):
        out["qhat"] = None  # every set holds every label (too few calibration cases)
    if groups is not None:
        g = np.asarray(groups).astype(str)
        out["by_group"] = {
            "attribute": group_attribute,
            "mondrian": head.groups is not None,
            "groups": {v: _summary(member[g == v], y[g == v]) for v in sorted(set(g))},
        }
    return out
