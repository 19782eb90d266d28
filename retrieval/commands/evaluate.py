"""`casebase eval INDEX_DIR MANIFEST [--split test] [--json]`."""

from __future__ import annotations

import json

from retrieval import atomic
from retrieval.errors import CasebaseError
from retrieval.service.conformal import check_coverage
from retrieval.service.evaluate import evaluate
from retrieval.service.retriever import CaseRetriever
from retrieval.service.uncertainty import reliability_plot


def run(args) -> int:
    if args.coverage is not None:
        check_coverage(args.coverage)
    r = CaseRetriever.load(args.index_dir, device=args.device)
    rep = evaluate(r, args.manifest, args.split, coverage=args.coverage)
    rep.calibration["plot"] = _plot(rep, args.plot)
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
    for name, how in rep.attribute_binning.items():
        print(f"  {name}: {how}")
    _print_uncertainty(rep)
    for msg in rep.skipped:
        print(f"  skipped: {msg}")
    return 0


def _plot(rep, path) -> str | None:
    """Write the reliability diagram to --plot PNG; its path (None when not asked or no data)."""
    if not path:
        return None
    png = reliability_plot(rep.calibration, f"{rep.split} split, {rep.n_queries} queries")
    if png is None:
        return None
    try:
        atomic.write_bytes(path, png, mode=0o666)
    except OSError as err:
        raise CasebaseError(f"--plot {path}: cannot write ({err.strerror or err})") from None
    return str(path)


def _print_uncertainty(rep) -> None:
    ps, cal = rep.prediction_sets, rep.calibration
    if ps.get("coverage") is None:
        print(f"  prediction sets: {ps.get('note', 'none')}")
    else:
        lo, hi = ps["coverage_ci95"]
        print(
            f"  {ps['target_coverage']:.0%} prediction sets (calibrated on {ps['calibrated_on']}): "
            f"coverage {ps['coverage']:.3f} (95% CI {lo:.3f}-{hi:.3f}), mean size "
            f"{ps['mean_size']:.2f}, single label {ps['singleton_share']:.0%}; neighbour vote "
            f"coverage {ps['knn_vote']['coverage']:.3f}, mean size {ps['knn_vote']['mean_size']:.2f}"
        )
    if cal.get("ece_after") is not None:
        print(
            f"  calibration: ECE {cal['ece_before']:.3f} -> {cal['ece_after']:.3f} "
            f"(temperature {cal['temperature']:.2f})"
        )
        if cal.get("ece_note"):
            print(f"  note: {cal['ece_note']}")
    if cal.get("plot"):
        print(f"  reliability diagram: {cal['plot']}")
