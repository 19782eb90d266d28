"""`casebase eval INDEX_DIR MANIFEST [--split test] [--json]`."""

from __future__ import annotations

import json

from retrieval.service.evaluate import evaluate
from retrieval.service.retriever import CaseRetriever


def run(args) -> int:
    r = CaseRetriever.load(args.index_dir, device=args.device)
    rep = evaluate(r, args.manifest, args.split)
    if args.json:
        print(json.dumps(rep.to_json(), indent=2, sort_keys=True))
        return 0
    print(
        f"{rep.n_queries} {rep.split} queries against {r.index.ntotal} indexed cases "
        f"({rep.weighting} weighting; neighbours of the query's own patient excluded)"
    )
    print(
        f"  precision@1 {rep.precision_at_1:.3f}   precision@5 {rep.precision_at_5:.3f}   "
        f"precision@10 {rep.precision_at_10:.3f}   MAP@R {rep.map_at_r:.3f}"
    )
    print(
        f"  kNN accuracy {rep.knn_accuracy:.3f}   classifier accuracy {rep.classifier_accuracy:.3f}"
    )
    print(f"  {'class':<20}{'n':>6}{'P@5':>8}{'kNN acc':>9}")
    for c, row in rep.per_class.items():
        print(f"  {c:<20}{row['n']:>6}{row['precision_at_5']:>8.3f}{row['knn_accuracy']:>9.3f}")
    if rep.attribute_agreement:
        print(
            "  share of top-5 neighbours sharing the query's attribute: "
            + ", ".join(f"{a} {v:.2f}" for a, v in rep.attribute_agreement.items())
        )
    for msg in rep.skipped:
        print(f"  skipped: {msg}")
    return 0
