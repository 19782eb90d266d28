"""The whole verdict (`judge_attributes`: both concordance tests, probe, rule) on a synthetic
world where the truth is known.

Embeddings = label (strong) + site (a shortcut: tied to the label in the index) +
scanner (encoded, but independent of the label) + noise; sex is not in the
embedding at all. Queries have site independent of their label, as a test split
would. Neighbours come from a real cosine search of the embeddings.
"""

from __future__ import annotations

import numpy as np

from retrieval.audit.attributes import CodedAttribute
from retrieval.audit.runner import judge_attributes

N_INDEX, N_QUERY, D, K = 450, 150, 24, 5


def _embed(rng, labels, site, scanner, n):
    x = 0.15 * rng.normal(size=(n, D))
    x[np.arange(n), labels] += 1.0
    x[np.arange(n), 3 + site] += 0.6
    x[np.arange(n), 6 + scanner] += 0.6
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _verdicts(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, N_INDEX)
    site = np.where(rng.random(N_INDEX) < 0.85, labels, rng.integers(0, 3, N_INDEX))
    scanner = rng.integers(0, 3, N_INDEX)
    sex = rng.integers(0, 2, N_INDEX)
    patients = np.array([f"p{i // 3}" for i in range(N_INDEX)])
    x = _embed(rng, labels, site, scanner, N_INDEX)
    ql, qs, qsc, qsex = (
        rng.integers(0, 3, N_QUERY),
        rng.integers(0, 3, N_QUERY),
        rng.integers(0, 3, N_QUERY),
        rng.integers(0, 2, N_QUERY),
    )
    q = _embed(rng, ql, qs, qsc, N_QUERY)
    rows = np.argsort(-(q @ x.T), axis=1)[:, :K]
    attrs = [
        CodedAttribute(
            n,
            "categorical",
            None,
            [str(g) for g in range(3)],
            ia.astype(np.int16),
            qa.astype(np.int16),
        )
        for n, ia, qa in [("site", site, qs), ("scanner", scanner, qsc), ("sex", sex, qsex)]
    ]
    out = judge_attributes(
        attrs,
        rows,
        np.ones_like(rows, bool),
        labels.astype(str),
        patients,
        x,
        ql.astype(str),
        np.array([f"q{i}" for i in range(N_QUERY)]),
        1000,
        seed,
    )
    return {
        n: "flagged" if v["flagged"] else "bias" if v["retrieval_bias"] else "no"
        for n, v in out.items()
    }


def test_shortcut_flagged_encoded_independent_attribute_is_bias_random_attribute_is_not():
    for seed in range(3):
        assert _verdicts(seed) == {"site": "flagged", "scanner": "bias", "sex": "no"}, seed
