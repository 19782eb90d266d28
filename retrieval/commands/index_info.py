"""`casebase index info INDEX_DIR`: verify checksums and summarise a bundle."""

from __future__ import annotations

import json

from index import bundle


def run(args) -> int:
    meta = bundle.verify(args.index_dir)
    summary = {
        k: meta[k]
        for k in ("format_version", "model_fingerprint", "embedding", "faiss", "counts", "ood")
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
    return 0
