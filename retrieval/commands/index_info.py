"""`casebase index info INDEX_DIR`: verify checksums and summarise a bundle."""

from __future__ import annotations

import json

from index import bundle


def run(args) -> int:
    meta = bundle.verify(args.index_dir)
    summary = {
        k: meta[k]
        for k in (
            "format_version",
            "model_fingerprint",
            "embedding",
            "faiss",
            "counts",
            "ood",
            "calibration",
            "conformal",
        )
        if k in meta
    }
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        print(
            f"{args.index_dir}: OK (format {meta['format_version']}, {meta['counts']['cases']} cases, "
            f"{meta['faiss']['factory']}, {meta['embedding']['weighting']} weighting, "
            f"all {len(meta['files'])} checksums verified)"
        )
        conf, cal = meta.get("conformal"), meta.get("calibration") or {}
        if conf:
            print(
                f"  prediction sets: {conf['coverage']:.0%} by default, calibrated on "
                f"{conf['calibrated_on']}; temperature {conf['temperature']:.2f}"
                + (f"; per {conf['group_attribute']}" if conf.get("group_attribute") else "")
            )
        else:
            print(f"  prediction sets: {cal.get('reason', 'none (built before they existed)')}")
    return 0
