"""`casebase phantom OUT_DIR`: write a synthetic data set (see retrieval.data.phantom)."""

from __future__ import annotations

import sys


def run(args) -> int:
    from retrieval.data.phantom import make_phantom

    manifest = make_phantom(
        args.out_dir,
        n=args.n,
        size=args.size,
        seed=args.seed,
        confounder=args.confounder,
        strength=args.strength,
        modality=getattr(args, "modality", "xray"),
        progress=True,
    )
    print(
        f"wrote {args.n} {getattr(args, 'modality', 'xray')} cases "
        f"(size {args.size}, seed {args.seed}, confounder {args.confounder}) to {manifest}",
        file=sys.stderr,
    )
    print(manifest)
    return 0
