"""`casebase phantom OUT_DIR`: write a synthetic data set (retrieval.data.phantom, phantom3d)."""

from __future__ import annotations

import sys

from retrieval.errors import CasebaseError


def run(args) -> int:
    dim = int(getattr(args, "dim", 2) or 2)
    modality = getattr(args, "modality", None)
    if dim == 3:
        if getattr(args, "concept_images", None):
            raise CasebaseError("--concept-images makes 2-D images: leave out --dim 3")
        return _run3d(args, modality or "ct")
    modality = modality or "xray"
    if getattr(args, "normals", False):
        raise CasebaseError("--normals is available with --dim 3 only")
    if modality in ("ct", "mr"):
        raise CasebaseError(f"--modality {modality} makes volumes: add --dim 3")
    if getattr(args, "concept_images", None):
        return _run_concept(args, modality)
    from retrieval.data.phantom import make_phantom

    n = 600 if args.n is None else args.n
    size = 128 if args.size is None else args.size
    manifest = make_phantom(
        args.out_dir,
        n=n,
        size=size,
        seed=args.seed,
        confounder=args.confounder,
        strength=args.strength,
        modality=modality,
        progress=True,
    )
    print(
        f"wrote {n} {modality} cases "
        f"(size {size}, seed {args.seed}, confounder {args.confounder}) to {manifest}",
        file=sys.stderr,
    )
    print(manifest)
    return 0


def _run_concept(args, modality: str) -> int:
    """Example images of one concept, from the same generator as the data (issue 20)."""
    from retrieval.data.phantom import write_concept_images

    n = 60 if args.n is None else args.n
    written = write_concept_images(
        args.out_dir,
        kind=args.concept_images,
        modality=modality,
        n=n,
        size=128 if args.size is None else args.size,
        seed=1000 + args.seed,  # never the data set's own draws
        site=args.site,
        confounder=args.confounder,
        strength=args.strength,
        vendor=args.vendor,
    )
    print(
        f"wrote {len(written)} {modality} images of the concept {args.concept_images!r} to "
        f"{args.out_dir}: use it as `casebase concepts INDEX --concept NAME={args.out_dir}`",
        file=sys.stderr,
    )
    print(args.out_dir)
    return 0


def _run3d(args, modality: str) -> int:
    from retrieval.data.phantom3d import make_phantom3d

    if modality not in ("ct", "mr"):
        raise CasebaseError(f"--dim 3 makes ct or mr volumes (got --modality {modality})")
    if getattr(args, "confounder", "none") != "none":
        raise CasebaseError("--confounder is not available with --dim 3")
    n = 300 if args.n is None else args.n
    size = 64 if args.size is None else args.size
    normals = bool(getattr(args, "normals", False))
    manifest = make_phantom3d(
        args.out_dir,
        n=n,
        size=size,
        depth=args.depth,
        seed=args.seed,
        modality=modality,
        formats=args.format,
        normals=normals,
        progress=True,
    )
    extra = ", with normals" if normals else ""
    print(
        f"wrote {n} {modality} volumes ({args.depth} x {size} x {size}, seed {args.seed}, "
        f"format {args.format}{extra}) to {manifest}",
        file=sys.stderr,
    )
    print(manifest)
    return 0
