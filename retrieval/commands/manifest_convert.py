"""`casebase manifest from-<source> METADATA --images DIR --out MANIFEST`: public data set -> manifest."""

from __future__ import annotations

from pathlib import Path


def run(args) -> int:
    from retrieval.data.converters import ConvertOptions, convert

    opts = ConvertOptions(
        images=Path(args.images),
        out=Path(args.out),
        seed=args.seed,
        extra=[Path(p) for p in (getattr(args, "extra", None) or [])],
        val_fraction=getattr(args, "val_fraction", 0.15),
        test_fraction=getattr(args, "test_fraction", 0.15),
        ignore_official_split=getattr(args, "ignore_official_split", False),
        label_policy=getattr(args, "label_policy", "single"),
        uncertain=getattr(args, "uncertain", "ignore"),
        label_field=getattr(args, "label_field", None),
        masks=Path(args.masks) if getattr(args, "masks", None) else None,
        strict=getattr(args, "strict", False),
    )
    report = convert(args.source, args.metadata, opts)
    labels = ", ".join(f"{k}: {v}" for k, v in report.labels.items())
    splits = ", ".join(f"{k}: {v}" for k, v in report.splits.items())
    print(f"wrote {report.manifest} (labels {{{labels}}}, splits {{{splits}}})")
    print(report.summary())
    return 0
