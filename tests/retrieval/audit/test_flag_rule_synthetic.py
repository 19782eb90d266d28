"""The whole verdict on a synthetic world where the truth is known.

Embeddings = label (strong) + site (a shortcut: tied to the label in the index) +
scanner (encoded, but independent of the label) + noise; sex is not in the
embedding at all. Queries have site independent of their label, as a test split
would. Neighbours come from a real cosine search of the embeddings.
"""

from __future__ import annotations

import numpy as np

from retrieval.audit import verdict
from retrieval.audit.concordance import concordance_test, holm
from retrieval.audit.probe import probe_attribute

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
    ql, qs, qsc, qsex = (rng.integers(0, 3, N_QUERY), rng.integers(0, 3, N_QUERY),
                         rng.integers(0, 3, N_QUERY), rng.integers(0, 2, N_QUERY))
    q = _embed(rng, ql, qs, qsc, N_QUERY)
    rows = np.argsort(-(q @ x.T), axis=1)[:, :K]
    valid = np.ones_like(rows, dtype=bool)
    attrs = {"site": (site, qs), "scanner": (scanner, qsc), "sex": (sex, qsex)}
    conc = {n: concordance_test(rows, valid, qa, ia.astype(np.int16), labels, 999, rng)
            for n, (ia, qa) in attrs.items()}
    p_holm = dict(zip(attrs, holm([conc[n].p_value for n in attrs]), strict=True))
    out = {}
    for n, (ia, _) in attrs.items():
        pr = probe_attribute(x, ia, labels, patients, seed=0, shuffles=0)
        flagged, bias, _ = verdict.decide(p_holm[n], conc[n].lift, pr.balanced_accuracy, pr.chance,
                                          verdict.label_association(ia, labels))
        out[n] = "flagged" if flagged else "bias" if bias else "no"
    return out


def test_shortcut_flagged_encoded_independent_attribute_is_bias_random_attribute_is_not():
    for seed in range(3):
        assert _verdicts(seed) == {"site": "flagged", "scanner": "bias", "sex": "no"}, seed
