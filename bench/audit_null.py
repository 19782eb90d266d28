"""False-flag rate of the shortcut audit on attributes that are random by construction.

For each index: embed the split once, then give every case R random
attributes (half constant per patient like sex, half drawn per case like a
scanner; 2-4 groups, independent of everything in the images) and run each
through the audit's own concordance test, probe and flag rule, with the Holm
correction for the audit's usual 4 attributes (per test family). Reports how often each
criterion is met and how often the attribute would have been flagged, plus the
p-value calibration of both tests (share of raw p < 0.05 / 0.01). Writes
bench/results/audit_null.json.

    nice python bench/audit_null.py --index /tmp/i1200 --manifest /tmp/ph1200/manifest.csv --r 100
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import finish, machine, table


def calibrate(index_dir: str, manifest: str, n_attr: int, permutations: int, seed: int) -> dict:
    from threadpoolctl import threadpool_limits

    from retrieval.audit import verdict
    from retrieval.audit.concordance import concordance_test, query_permutation_test
    from retrieval.audit.probe import probe_attribute
    from retrieval.audit.runner import K, neighbor_matrix
    from retrieval.service.evaluate import embed_split
    from retrieval.service.retriever import CaseRetriever

    r = CaseRetriever.load(index_dir)
    qs = embed_split(r, manifest, "test", K, progress=False)
    rows, _, valid = neighbor_matrix(qs.hits, K)
    labels = r.cases["label"].astype(str).to_numpy()
    ipat = r.cases["patient_id"].astype(str).to_numpy()
    qpat = qs.cases["patient_id"].astype(str).to_numpy()
    vectors = r.index.reconstruct_all()
    rng = np.random.default_rng(seed)
    m = 4  # Holm over the audit's usual four attributes (per test family): p * 4 bounds the adjusted p
    recs = []
    for j in range(n_attr):
        levels = int(rng.integers(2, 5))
        if j % 2 == 0:  # per patient
            pats = np.unique(np.concatenate([ipat, qpat]))
            val = dict(zip(pats, rng.integers(0, levels, len(pats)), strict=True))
            icodes = np.array([val[p] for p in ipat], np.int16)
            qcodes = np.array([val[p] for p in qpat], np.int16)
        else:  # per case
            icodes = rng.integers(0, levels, len(ipat)).astype(np.int16)
            qcodes = rng.integers(0, levels, len(qpat)).astype(np.int16)
        c = concordance_test(rows, valid, qcodes, icodes, labels, permutations, rng, qpat)
        cq = query_permutation_test(
            rows, valid, qcodes, icodes, qs.cases["label"].astype(str).to_numpy(), permutations, rng
        )
        with threadpool_limits(1):
            pr = probe_attribute(vectors, icodes, labels, ipat, seed=j, shuffles=0)
        p_holm, p_holm_q = min(1.0, m * c.p_value), min(1.0, m * cq.p_value)
        assoc = verdict.label_association(icodes, labels)
        flagged, bias, _ = verdict.decide(
            p_holm, c.lift, pr.balanced_accuracy, pr.chance, assoc, p_holm_q, cq.lift
        )
        recs.append(
            {
                "kind": "patient" if j % 2 == 0 else "case",
                "levels": levels,
                "lift": c.lift,
                "p_value": c.p_value,
                "p_holm_bound": p_holm,
                "lift_query": cq.lift,
                "p_value_query": cq.p_value,
                "p_holm_bound_query": p_holm_q,
                "probe_margin": pr.margin,
                "label_association": assoc[0],
                "flagged": flagged,
                "retrieval_bias": bias,
            }
        )
    return {
        "index": index_dir,
        "n_queries": len(qs.cases),
        "n_indexed": int(r.index.ntotal),
        "attributes": recs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", action="append", required=True)
    ap.add_argument("--manifest", action="append", required=True)
    ap.add_argument("--r", type=int, default=100, help="random attributes per index")
    ap.add_argument("--permutations", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if len(args.index) != len(args.manifest):
        ap.error("give one --manifest per --index")
    from retrieval.audit import verdict

    started, info = time.time(), machine()
    results, rows = [], []
    for idx, man in zip(args.index, args.manifest, strict=True):
        res = calibrate(idx, man, args.r, args.permutations, args.seed)
        results.append(res)
        a = res["attributes"]

        def share(pred, a=a):
            return sum(1 for x in a if pred(x)) / len(a)

        rows.append(
            [
                idx,
                len(a),
                share(lambda x: x["p_value"] < 0.05),
                share(lambda x: x["p_value"] < 0.01),
                share(lambda x: x["p_value_query"] < 0.05),
                share(lambda x: x["p_value_query"] < 0.01),
                share(lambda x: min(x["p_holm_bound"], x["p_holm_bound_query"]) < verdict.ALPHA),
                share(lambda x: (x["lift"] or 0) >= verdict.MIN_LIFT),
                share(lambda x: (x["probe_margin"] or 0) >= verdict.MIN_PROBE_MARGIN),
                float(np.max([x["probe_margin"] or 0 for x in a])),
                float(np.max([x["lift"] or 0 for x in a])),
                share(lambda x: x["flagged"]),
                share(lambda x: x["retrieval_bias"]),
            ]
        )
    table(
        [
            "index",
            "R",
            "p<.05",
            "p<.01",
            "p_q<.05",
            "p_q<.01",
            "p_holm<α",
            "lift≥min",
            "probe≥min",
            "max probe margin",
            "max lift",
            "FLAGGED",
            "bias",
        ],
        rows,
        "random attributes: share meeting each criterion of the flag rule",
    )
    finish(
        "audit_null", info, {"args": vars(args), "rule": verdict.RULE, "results": results}, started
    )


if __name__ == "__main__":
    main()
