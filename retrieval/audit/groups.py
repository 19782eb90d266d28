"""Does retrieval serve one group (site, sex, age band, …) worse than another?

For each attribute and each of its groups (by the *query's* value): the number
of queries ``n`` and ``precision_at_5``, the share of their top-5 neighbours
(query's own patient excluded) with the query's label, with a 95 % bootstrap
interval over the group's queries. Queries whose value is missing are left
out.
"""

from __future__ import annotations

import numpy as np

from retrieval.audit.attributes import CodedAttribute

N_BOOTSTRAP = 500


def label_precision(
    neighbor_labels: np.ndarray, valid: np.ndarray, query_labels: np.ndarray
) -> np.ndarray:
    """(nq,) share of each query's valid neighbours that carry its label (NaN if it has none)."""
    hit = (neighbor_labels == np.asarray(query_labels)[:, None]) & valid
    cnt = valid.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, hit.sum(1) / np.maximum(cnt, 1), np.nan)


def _interval(values: np.ndarray, rng: np.random.Generator) -> list[float]:
    if len(values) < 2:
        return [float("nan"), float("nan")]
    means = values[rng.integers(0, len(values), size=(N_BOOTSTRAP, len(values)))].mean(1)
    return [float(x) for x in np.percentile(means, [2.5, 97.5])]


def group_precision(attr: CodedAttribute, precision: np.ndarray, seed: int = 0) -> dict[str, dict]:
    """{group: {"n", "precision_at_5", "interval"}} for one attribute."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict] = {}
    ok = np.isfinite(precision)
    for code, name in enumerate(attr.groups):
        m = (attr.query_codes == code) & ok
        n = int(m.sum())
        if n == 0:
            out[name] = {"n": 0, "precision_at_5": None, "interval": [None, None]}
            continue
        vals = precision[m]
        out[name] = {"n": n, "precision_at_5": float(vals.mean()), "interval": _interval(vals, rng)}
    return out


def spread(groups: dict[str, dict], min_n: int = 5) -> float | None:
    """Best minus worst group precision@5 among groups with at least ``min_n`` queries."""
    vals = [
        g["precision_at_5"]
        for g in groups.values()
        if g["n"] >= min_n and g["precision_at_5"] is not None
    ]
    return float(max(vals) - min(vals)) if len(vals) >= 2 else None
