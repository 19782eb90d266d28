"""Attribute concordance of retrieval, against a null that keeps the labels fixed.

For each query with a known attribute value, its *share* is the fraction of
its top-k neighbours (k = 5) whose value equals the query's; the
**concordance** is the mean share over queries.

Retrieval that works by label (the point of the model) makes neighbours
share the attribute whenever the attribute is associated with the label in
the index. That is not a shortcut, so the null hypothesis keeps every indexed
case's label and neighbour list fixed and **permutes the attribute among the
indexed cases within each label**. Under it

* **expected** = E[concordance] is exact, no sampling: a neighbour with
  label L shares the query's value v with probability P(v | L) among the
  indexed cases;
* the permutation **p_value** = (1 + #{null ≥ observed}) / (1 + B) comes from
  B permuted attribute arrays scored against the fixed (queries × k)
  neighbour-row matrix (vectorised: one gather and compare per permutation);
* **lift** = concordance / expected.

Plotting intervals: ``interval`` is a 95 % bootstrap interval of the observed
concordance, resampling query *patients* (queries of one patient share their
attributes and look alike, so they are not independent); ``null_interval`` is
the central 95 % of the permutation null.

A second, **query-side** null (`query_permutation_test`) permutes the
*queries'* values among queries of the same label instead. It also sees a
shortcut that acts as a label proxy: a site marker pulling neighbours to the
class that site stands for gives neighbours whose site is just what their
(wrong) label predicts, invisible to the index-side null, but it makes the
query's site change which labels it retrieves. The audit reports both tests.

The nulls permute single cases. When an attribute is constant within a
patient and one index patient fills several neighbour slots, the true null
varies more than the case-level one and p-values are somewhat optimistic;
the audit therefore never flags on a p-value alone (see ``verdict``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

N_BOOTSTRAP = 1000
_MAX_BLOCK_ELEMENTS = 20_000_000  # permuted codes held at once (int16 -> 40 MB)


@dataclass
class ConcordanceResult:
    concordance: float
    expected: float
    lift: float | None
    p_value: float
    n_queries: int  # queries with a known value and at least one neighbour
    interval: tuple[float, float]  # bootstrap 95 % of the observed concordance
    null_interval: tuple[float, float]  # central 95 % of the permutation null
    permutations: int
    null: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)  # not in JSON

    def to_json(self) -> dict:
        return {
            "concordance": self.concordance,
            "expected": self.expected,
            "lift": self.lift,
            "p_value": self.p_value,
            "n_queries": self.n_queries,
            "interval": list(self.interval),
            "null_interval": list(self.null_interval),
            "permutations": self.permutations,
        }


def permute_within(
    codes: np.ndarray, strata: np.ndarray, n_perm: int, rng: np.random.Generator
) -> np.ndarray:
    """(n_perm, n) copies of ``codes``, each shuffled independently within every stratum."""
    out = np.tile(codes, (n_perm, 1))
    for s in np.unique(strata):
        idx = np.flatnonzero(strata == s)
        if len(idx) > 1:
            out[:, idx] = rng.permuted(out[:, idx], axis=1)
    return out


def _shares(
    nbr_codes: np.ndarray, qcodes: np.ndarray, valid: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    """Per-query share of neighbours with the query's code; works on (..., nq, k) codes."""
    return ((nbr_codes == qcodes[:, None]) & valid).sum(-1) / counts


def _stratum_frequencies(
    codes: np.ndarray, strata: np.ndarray, n_codes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(stratum ids, (n_strata, n_codes) P(code | stratum)) over all cases of each stratum."""
    ids, inv = np.unique(strata, return_inverse=True)
    freq = np.zeros((len(ids), n_codes))
    known = codes >= 0
    np.add.at(freq, (inv[known], codes[known]), 1.0)
    sizes = np.bincount(inv, minlength=len(ids)).astype(float)
    return inv, freq / np.maximum(sizes, 1.0)[:, None]


def cluster_bootstrap(
    shares: np.ndarray, clusters: np.ndarray | None, n_boot: int, rng: np.random.Generator
) -> tuple[float, float]:
    """95 % percentile interval of mean(shares), resampling clusters (or single queries)."""
    if len(shares) == 0:
        return (float("nan"), float("nan"))
    if clusters is None:
        clusters = np.arange(len(shares))
    _, inv = np.unique(clusters, return_inverse=True)
    sums = np.bincount(inv, weights=shares)
    counts = np.bincount(inv).astype(float)
    pick = rng.integers(0, len(sums), size=(n_boot, len(sums)))
    means = sums[pick].sum(1) / counts[pick].sum(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return (float(lo), float(hi))


def concordance_test(
    neighbors: np.ndarray,
    valid: np.ndarray,
    query_codes: np.ndarray,
    index_codes: np.ndarray,
    strata: np.ndarray,
    n_perm: int = 1000,
    rng: np.random.Generator | None = None,
    query_clusters: np.ndarray | None = None,
) -> ConcordanceResult:
    """Concordance, exact expected, lift, permutation p-value and intervals.

    neighbors: (nq, k) index rows (any value where ``valid`` is False);
    valid: (nq, k) bool; query_codes: (nq,) ints, -1 = missing;
    index_codes: (n,) ints, -1 = missing; strata: (n,) label of each indexed case;
    query_clusters: (nq,) patient of each query, for the bootstrap (None: queries independent).
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    neighbors = np.asarray(neighbors, dtype=np.int64)
    valid = np.asarray(valid, dtype=bool)
    qcodes = np.asarray(query_codes, dtype=np.int64)
    icodes = np.asarray(index_codes, dtype=np.int16)
    counts_all = valid.sum(1)
    use = (qcodes >= 0) & (counts_all > 0)
    nan = float("nan")
    if not use.any():
        return ConcordanceResult(nan, nan, None, 1.0, 0, (nan, nan), (nan, nan), 0)
    nb, v, q, cnt = neighbors[use], valid[use], qcodes[use], counts_all[use].astype(float)
    nb = np.where(v, nb, 0)
    obs_shares = _shares(icodes[nb], q, v, cnt)
    observed = float(obs_shares.mean())

    n_codes = int(max(icodes.max(initial=-1), q.max(initial=-1))) + 1
    inv, freq = _stratum_frequencies(icodes, np.asarray(strata), n_codes)
    slot_p = freq[inv[nb], q[:, None]]  # P(neighbour slot shares the query's value) under the null
    expected = float(((slot_p * v).sum(1) / cnt).mean())

    null = np.empty(max(n_perm, 0))
    block = max(1, min(n_perm, _MAX_BLOCK_ELEMENTS // max(len(icodes), 1)))
    done = 0
    while done < n_perm:
        b = min(block, n_perm - done)
        perm = permute_within(icodes, np.asarray(strata), b, rng)
        null[done : done + b] = _shares(perm[:, nb], q, v, cnt).mean(1)
        done += b
    tol = 1e-12
    p_value = float((1 + np.sum(null >= observed - tol)) / (1 + n_perm)) if n_perm > 0 else 1.0
    null_iv = (
        tuple(float(x) for x in np.percentile(null, [2.5, 97.5])) if n_perm > 0 else (nan, nan)
    )
    clusters = None if query_clusters is None else np.asarray(query_clusters)[use]
    interval = cluster_bootstrap(obs_shares, clusters, N_BOOTSTRAP, rng)
    lift = observed / expected if expected > 0 else None
    return ConcordanceResult(
        observed, expected, lift, p_value, int(use.sum()), interval, null_iv, n_perm, null
    )


@dataclass
class QueryNullResult:
    expected: float
    lift: float | None
    p_value: float
    null_interval: tuple[float, float]
    permutations: int
    null: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)  # not in JSON

    def to_json(self) -> dict:
        return {
            "expected": self.expected,
            "lift": self.lift,
            "p_value": self.p_value,
            "null_interval": list(self.null_interval),
            "permutations": self.permutations,
        }


def query_permutation_test(
    neighbors: np.ndarray,
    valid: np.ndarray,
    query_codes: np.ndarray,
    index_codes: np.ndarray,
    query_strata: np.ndarray,
    n_perm: int = 1000,
    rng: np.random.Generator | None = None,
) -> QueryNullResult:
    """The same concordance against a *query-side* null: the queries' attribute values are
    permuted among queries of the same label, neighbour lists and the index kept as they are.

    It asks whether a query's attribute changes *which* cases it retrieves, beyond what its
    label explains, and so also sees a shortcut that works as a label proxy (a site marker
    pulling neighbours towards the class that site stands for), which the index-side null
    cannot: those neighbours carry the site their label predicts. It needs queries whose
    attribute varies within a label, as in a test split where site and label are independent.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    neighbors = np.asarray(neighbors, dtype=np.int64)
    valid = np.asarray(valid, dtype=bool)
    qcodes = np.asarray(query_codes, dtype=np.int64)
    icodes = np.asarray(index_codes, dtype=np.int64)
    counts = valid.sum(1)
    use = (qcodes >= 0) & (counts > 0)
    nan = float("nan")
    if not use.any() or n_perm <= 0:
        return QueryNullResult(nan, None, 1.0, (nan, nan), 0)
    nb_codes = icodes[np.where(valid, neighbors, 0)][use]
    v, q, cnt = valid[use], qcodes[use], counts[use].astype(float)
    observed = float(_shares(nb_codes, q, v, cnt).mean())
    # the share of each query's neighbours holding each value: (nq, n_codes); a permuted
    # assignment just reads other columns of it
    n_codes = int(max(icodes.max(initial=-1), q.max(initial=-1))) + 1
    table = np.stack([((nb_codes == c) & v).sum(1) / cnt for c in range(n_codes)], axis=1)
    strata = np.asarray(query_strata)[use]
    inv, freq = _stratum_frequencies(q, strata, n_codes)
    expected = float(
        (table * freq[inv]).sum(1).mean()
    )  # exact: each query's value drawn from its label's
    perms = permute_within(q, strata, n_perm, rng)
    null = table[np.arange(len(q))[None, :], perms].mean(1)
    p_value = float((1 + np.sum(null >= observed - 1e-12)) / (1 + n_perm))
    iv = tuple(float(x) for x in np.percentile(null, [2.5, 97.5]))
    return QueryNullResult(
        expected, observed / expected if expected > 0 else None, p_value, iv, n_perm, null
    )


def detectable_lift(null: np.ndarray, expected: float, level: float) -> float | None:
    """The smallest lift this test, on these queries, could call significant at ``level``:
    the concordance that no more than level·(B+1) − 1 of the B permuted values reach, over the
    null's expectation. It is what the audit *can* see: a shortcut whose lift stays below it
    goes unflagged however real, and more queries bring it down. None when even the largest
    lift could not reach ``level`` (too few permutations) or nothing was permuted."""
    null = np.asarray(null, dtype=float)
    if len(null) == 0 or not np.isfinite(expected) or expected <= 0:
        return None
    # p = (1 + c) / (1 + B) < level  <=>  c < level (1 + B) - 1, c = #{null >= observed}
    c_max = int(np.ceil(level * (1 + len(null)) - 1)) - 1
    if c_max < 0:
        return None
    return float(np.sort(null)[::-1][min(c_max, len(null) - 1)] / expected)


def holm(p_values: list[float]) -> list[float]:
    """Holm–Bonferroni step-down adjusted p-values (same order as given)."""
    m = len(p_values)
    order = np.argsort(p_values, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return [float(x) for x in adjusted]
