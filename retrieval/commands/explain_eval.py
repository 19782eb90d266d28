"""`casebase explain-eval INDEX_DIR MANIFEST [--split test] [--json] [--methods m1,m2]
[--max-cases N] [--no-store]`: measured trust of every explanation method.

Scores each method's query maps on the split's cases that have lesion masks
(pointing game, mask energy, deletion / insertion AUC against a random order,
model-randomisation sanity check; see retrieval.explain.trust) and, unless
--no-store, writes the per-method results into the bundle as ``trust.json``
(merged with any methods measured before), so that query results carry them.
"""

from __future__ import annotations

import json
import sys

from index import bundle
from retrieval.errors import CasebaseError
from retrieval.explain import trust
from retrieval.service.retriever import TRUST_FILE, CaseRetriever


def _store(index_dir, previous: dict, report: dict) -> None:
    merged = {k: v for k, v in (previous or {}).items() if isinstance(v, dict)}
    merged.update(report["methods"])
    data = bundle.canonical_json(merged)
    bundle.update(index_dir, files={TRUST_FILE: data})


def run(args) -> int:
    if args.max_cases is not None and args.max_cases < 1:
        raise CasebaseError("--max-cases must be at least 1")
    r = CaseRetriever.load(args.index_dir, device=getattr(args, "device", "auto"))
    report = trust.evaluate(
        r,
        args.manifest,
        args.split,
        args.methods,
        args.max_cases,
        progress=sys.stderr.isatty() or not args.json,
    )
    if not args.no_store:
        _store(args.index_dir, r.trust, report)
        report["stored"] = f"{args.index_dir}/{TRUST_FILE}"
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True, allow_nan=True))
        return 0
    print(trust.format_table(report))
    if not args.no_store:
        print(f"stored in {report['stored']}")
    return 0
