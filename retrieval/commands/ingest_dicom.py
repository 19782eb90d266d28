"""`casebase ingest-dicom DICOM_DIR --out MANIFEST`: a PHI-free manifest from a DICOM tree."""

from __future__ import annotations


def run(args) -> int:
    from retrieval.data.dicom_ingest import ingest_dicom

    report = ingest_dicom(args.dicom_dir, args.out, label_from=args.label_from, strict=args.strict)
    labels = ", ".join(f"{k}: {v}" for k, v in report.labels.items())
    splits = ", ".join(f"{k}: {v}" for k, v in report.splits.items())
    print(f"wrote {report.manifest} (labels {{{labels}}}, splits {{{splits}}})")
    print(report.summary())
    return 0
