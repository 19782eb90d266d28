"""Concordance, expected, lift and permutation p-value on synthetic neighbour matrices."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.audit.concordance import (
    cluster_bootstrap,
    concordance_test,
    holm,
    permute_within,
)

N_INDEX, N_QUERY, K = 300, 120, 5


def _world(seed=0, tie=0.0):
    """Index labels (3 classes), an attribute tied to the label with probability `tie`."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, N_INDEX)
    attr = np.where(rng.random(N_INDEX) < tie, labels, rng.integers(0, 3, N_INDEX))
    q_labels = rng.integers(0, 3, N_QUERY)
    q_attr = rng.integers(0, 3, N_QUERY)  # queries: attribute independent of label
    return rng, labels, attr, q_labels, q_attr


def _neighbours_by(rng, key_index, key_query):
    """Each query's K neighbours: random index rows whose key equals the query's key."""
    rows = np.zeros((N_QUERY, K), dtype=int)
    for i, v in enumerate(key_query):
        pool = np.flatnonzero(key_index == v)
        rows[i] = rng.choice(pool, K, replace=False)
    return rows


def test_attribute_that_is_the_neighbour_structure_is_detected():
    rng, labels, attr, _, q_attr = _world()
    rows = _neighbours_by(rng, attr, q_attr)
    valid = np.ones_like(rows, dtype=bool)
    res = concordance_test(rows, valid, q_attr, attr, labels, n_perm=199, rng=rng)
    assert res.concordance == pytest.approx(1.0)
    assert res.expected == pytest.approx(1 / 3, abs=0.06)
    assert res.lift > 2.5
    assert res.p_value == pytest.approx(1 / 200)  # nothing in the null reaches it
    assert res.n_queries == N_QUERY and res.permutations == 199
    lo, hi = res.null_interval
    assert lo <= res.expected <= hi < res.concordance


def test_random_neighbours_are_not_significant():
    ps = []
    for seed in range(8):
        rng, labels, attr, _, q_attr = _world(seed)
        rows = rng.integers(0, N_INDEX, size=(N_QUERY, K))
        res = concordance_test(rows, np.ones_like(rows, bool), q_attr, attr, labels, 199, rng)
        assert res.lift == pytest.approx(1.0, abs=0.2)
        ps.append(res.p_value)
    assert min(ps) > 0.01  # 8 draws from a (near) uniform p-value
    assert np.median(ps) > 0.1


def test_label_driven_retrieval_is_not_counted_as_attribute_matching():
    """Attribute tied to the label in the index, retrieval purely by label: the null expects it."""
    rng, labels, attr, q_labels, q_attr = _world(seed=3, tie=0.9)
    q_attr = (
        q_labels.copy()
    )  # queries whose attribute happens to equal the label -> high raw sharing
    rows = _neighbours_by(rng, labels, q_labels)
    res = concordance_test(rows, np.ones_like(rows, bool), q_attr, attr, labels, 499, rng)
    assert res.concordance > 0.8  # the raw sharing is high...
    assert res.lift == pytest.approx(1.0, abs=0.08)  # ...but entirely explained by the labels
    assert res.p_value > 0.01


def test_expected_equals_the_mean_of_the_permutation_null():
    rng, labels, attr, _, q_attr = _world(seed=5, tie=0.5)
    rows = rng.integers(0, N_INDEX, size=(N_QUERY, K))
    valid = rng.random((N_QUERY, K)) < 0.9
    perms = permute_within(attr.astype(np.int16), labels, 4000, np.random.default_rng(1))
    shares = ((perms[:, rows] == q_attr[:, None]) & valid).sum(-1) / np.maximum(valid.sum(1), 1)
    keep = valid.sum(1) > 0
    mc = shares[:, keep].mean(1).mean()
    res = concordance_test(rows, valid, q_attr, attr, labels, 0, rng)
    assert res.expected == pytest.approx(mc, abs=0.003)
    assert res.p_value == 1.0  # no permutations -> no evidence


def test_permute_within_keeps_each_stratum_multiset():
    codes = np.array([0, 1, 2, 0, 1, 2, 0, 0], dtype=np.int16)
    strata = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    perms = permute_within(codes, strata, 50, np.random.default_rng(0))
    for p in perms:
        assert sorted(p[strata == 0]) == [0, 1, 2]
        assert sorted(p[strata == 1]) == [0, 0, 0, 1, 2]
    assert len({tuple(p) for p in perms}) > 5


def test_missing_values_and_empty_neighbour_lists_are_left_out():
    attr = np.array([0, 0, 1, 1, -1, 1], dtype=np.int16)
    labels = np.zeros(6, dtype=int)
    rows = np.array([[0, 1], [2, 3], [0, 0], [4, 5]])
    valid = np.array([[True, True], [True, True], [False, False], [True, True]])
    q = np.array([0, 0, 1, -1])  # query 3 has no value, query 2 no neighbours
    res = concordance_test(rows, valid, q, attr, labels, 9, np.random.default_rng(0))
    assert res.n_queries == 2
    assert res.concordance == pytest.approx((1.0 + 0.0) / 2)
    # P(code 0 | label) = 2/6 for both queries
    assert res.expected == pytest.approx(2 / 6)


def test_no_usable_query():
    res = concordance_test(
        np.zeros((2, 3), int),
        np.ones((2, 3), bool),
        np.array([-1, -1]),
        np.zeros(4, np.int16),
        np.zeros(4),
        10,
    )
    assert res.n_queries == 0 and res.p_value == 1.0 and res.lift is None


def test_holm():
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([]) == []
    assert holm([0.6, 0.6]) == [1.0, 1.0]


def test_cluster_bootstrap_interval():
    rng = np.random.default_rng(0)
    shares = rng.random(200)
    lo, hi = cluster_bootstrap(shares, np.repeat(np.arange(50), 4), 500, rng)
    assert lo < shares.mean() < hi
    lo1, hi1 = cluster_bootstrap(shares, None, 500, rng)
    assert lo1 < shares.mean() < hi1


def test_query_side_null_sees_a_label_proxy_shortcut_the_index_side_cannot():
    """Index: site == label (fully tied). A third of the queries retrieve by their site marker
    (neighbours of the class that site stands for), the rest by label. The neighbours' sites are
    exactly what their labels predict, so the index-side null sees nothing; the query-side null
    sees that a query's site decides which labels it gets."""
    from retrieval.audit.concordance import query_permutation_test

    rng, labels, _, q_labels, q_attr = _world(seed=7)
    attr = labels.copy()
    proxy = rng.random(N_QUERY) < 0.33
    key = np.where(proxy, q_attr, q_labels)
    rows = _neighbours_by(rng, labels, key)
    valid = np.ones_like(rows, dtype=bool)
    idx_side = concordance_test(rows, valid, q_attr, attr, labels, 499, rng)
    assert idx_side.lift == pytest.approx(1.0) and idx_side.p_value > 0.5
    q_side = query_permutation_test(rows, valid, q_attr, attr, q_labels, 499, rng)
    assert q_side.lift > 1.5 and q_side.p_value == pytest.approx(1 / 500)
    lo, hi = q_side.null_interval
    assert lo <= q_side.expected <= hi


def test_query_side_null_is_quiet_for_label_driven_and_random_retrieval():
    from retrieval.audit.concordance import query_permutation_test

    ps = []
    for seed in range(6):
        rng, labels, attr, q_labels, q_attr = _world(seed, tie=0.9)
        rows = _neighbours_by(rng, labels, q_labels)  # retrieval purely by label
        res = query_permutation_test(
            rows, np.ones_like(rows, bool), q_attr, attr, q_labels, 199, rng
        )
        assert res.lift == pytest.approx(1.0, abs=0.15)
        ps.append(res.p_value)
    assert min(ps) > 0.01


def test_query_side_expected_is_exact():
    from retrieval.audit.concordance import query_permutation_test

    rng, labels, attr, q_labels, q_attr = _world(seed=11, tie=0.5)
    rows = rng.integers(0, N_INDEX, size=(N_QUERY, K))
    res = query_permutation_test(rows, np.ones_like(rows, bool), q_attr, attr, q_labels, 4000, rng)
    perms = permute_within(q_attr, q_labels, 4000, np.random.default_rng(3))
    mc = ((attr[rows][None] == perms[:, :, None]).mean(-1)).mean()
    assert res.expected == pytest.approx(mc, abs=0.003)


def _p(null, observed):
    return (1 + np.sum(null >= observed - 1e-12)) / (1 + len(null))


@pytest.mark.parametrize("side", ["index", "query"])
def test_detectable_lift_is_where_the_p_value_crosses_the_level(side):
    """Just above the detectable lift the permutation p falls below the level; at it, not."""
    from retrieval.audit.concordance import detectable_lift, query_permutation_test

    rng, labels, attr, q_labels, q_attr = _world(seed=5, tie=0.5)
    rows = rng.integers(0, N_INDEX, size=(N_QUERY, K))
    valid = np.ones_like(rows, bool)
    if side == "index":
        res = concordance_test(rows, valid, q_attr, attr, labels, 1599, rng)
    else:
        res = query_permutation_test(rows, valid, q_attr, attr, q_labels, 1599, rng)
    level = 0.01 / 4
    lift = detectable_lift(res.null, res.expected, level)
    assert lift is not None and lift > 1.0
    critical = lift * res.expected
    assert _p(res.null, critical) >= level
    above = critical + 1e-9 + 1e-6 * abs(np.diff(np.unique(res.null))).min()
    assert _p(res.null, above) < level
    # too few permutations to ever reach the level: nothing is detectable
    assert detectable_lift(res.null[:19], res.expected, level) is None


def test_more_queries_make_weaker_shortcuts_detectable():
    from retrieval.audit.concordance import detectable_lift, query_permutation_test

    def lift_for(nq, seed=2):
        rng = np.random.default_rng(seed)
        attr = rng.integers(0, 3, N_INDEX)
        q_labels, q_attr = rng.integers(0, 3, nq), rng.integers(0, 3, nq)
        rows = rng.integers(0, N_INDEX, size=(nq, K))
        res = query_permutation_test(
            rows, np.ones_like(rows, bool), q_attr, attr, q_labels, 999, rng
        )
        return detectable_lift(res.null, res.expected, 0.01)

    small, large = lift_for(40), lift_for(640)
    assert small > large > 1.0
    # the null's spread shrinks like 1/sqrt(n): 16x the queries, about a quarter of the excess
    assert (large - 1) / (small - 1) == pytest.approx(0.25, abs=0.12)
