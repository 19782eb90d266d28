"""`casebase index build MODEL_DIR MANIFEST --out INDEX_DIR`."""

from __future__ import annotations

from index.builder import build_index
from retrieval.cli import _csv_list
from retrieval.service.conformal import check_coverage


def run(args) -> int:
    check_coverage(args.coverage)  # fail before embedding, not after
    report = build_index(
        args.model_dir,
        args.manifest,
        args.out,
        weighting=args.weighting,
        factory=args.factory,
        splits=_csv_list(args.splits),
        batch_size=args.batch_size,
        device=args.device,
        strict=args.strict,
        engine=args.engine,
        address=args.address,
        coverage=args.coverage,
        conformal_method=args.conformal,
        mondrian=args.mondrian,
    )
    print(
        f"indexed {report.n_indexed} cases ({report.factory}, {args.weighting} weighting) in "
        f"{report.seconds:.1f} s ({report.images_per_second:.0f} img/s); skipped {len(report.skipped)} "
        f"-> {args.out}"
    )
    return 0
