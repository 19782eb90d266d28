"""`casebase explain-eval INDEX_DIR MANIFEST [--split test] [--json] [--methods m1,m2]
[--max-cases N] [--no-store] [--sanity-cases N] [--sanity-seeds N]
[--data-randomization EPOCHS] [--subclass COLUMN] [--plot PNG]`: measured trust of every
explanation method.

Scores each method's query maps on the split's cases that have lesion masks
(pointing game, mask energy, deletion / insertion AUC against a random order with a
bootstrap faithfulness verdict, Adebayo et al.'s cascading / independent
randomisation sanity checks; see retrieval.explain.trust and
retrieval.explain.sanity), runs Hanawa et al.'s tests on the neighbours, and,
unless --no-store, writes the per-method results into the bundle as
``trust.json`` (merged with any methods measured before), so that query results
carry them. --plot writes the sanity curves (the paper's Fig. 2, per method).
A volume index (cnn3d) gets the same measures on voxels, every flag meaning the same
(retrieval.explain.volume_trust); without --methods only the cheap maps run there.
"""

from __future__ import annotations

import json
import sys

from index import bundle
from retrieval.errors import CasebaseError
from retrieval.explain import sanity, trust
from retrieval.jsonsafe import clean
from retrieval.service.retriever import TRUST_FILE, CaseRetriever


def _store(index_dir, previous: dict, report: dict) -> None:
    merged = {k: v for k, v in (previous or {}).items() if isinstance(v, dict)}
    merged.update(report["methods"])
    data = bundle.canonical_json(clean(merged))
    bundle.update(index_dir, files={TRUST_FILE: data})


def run(args) -> int:
    if args.max_cases is not None and args.max_cases < 1:
        raise CasebaseError("--max-cases must be at least 1")
    sanity_cases = getattr(args, "sanity_cases", sanity.SANITY_CASES)
    n_seeds = getattr(args, "sanity_seeds", len(sanity.SEEDS))
    epochs = getattr(args, "data_randomization", 0) or 0
    if sanity_cases < 0 or n_seeds < 1 or epochs < 0:
        raise CasebaseError(
            "--sanity-cases must be >= 0, --sanity-seeds >= 1, --data-randomization >= 0"
        )
    r = CaseRetriever.load(args.index_dir, device=getattr(args, "device", "auto"))
    r.set_reference_class(getattr(args, "reference_class", "auto"))
    report = trust.evaluate(
        r,
        args.manifest,
        args.split,
        args.methods,
        args.max_cases,
        progress=sys.stderr.isatty() or not args.json,
        sanity_cases=sanity_cases,
        sanity_seeds=tuple(range(n_seeds)),
        data_randomization_epochs=epochs,
        subclass=getattr(args, "subclass", None),
    )
    plot = getattr(args, "plot", None)
    if plot and any(m.get("sanity") for m in report["methods"].values()):
        sanity.plot_curves(report["methods"], plot, f"{args.index_dir} ({args.split})")
        report["plot"] = str(plot)
    if not args.no_store:
        _store(args.index_dir, r.trust, report)
        report["stored"] = f"{args.index_dir}/{TRUST_FILE}"
    if args.json:
        print(json.dumps(clean(report), indent=2, sort_keys=True))
        return 0
    print(trust.format_table(report))
    if report.get("plot"):
        print(f"sanity curves in {report['plot']}")
    if not args.no_store:
        print(f"stored in {report['stored']}")
    return 0
