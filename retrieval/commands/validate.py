"""`casebase validate MANIFEST [--json]`: report every problem, row by row."""

from __future__ import annotations

import json
import sys

MAX_WARNING_LINES = 10  # per-file warnings shown; the count line tells how many in all


def run(args) -> int:
    from retrieval.data.manifest import summarize, validate_manifest

    warnings: list = []
    problems = validate_manifest(args.manifest, check_images=True, progress=True, warnings=warnings)
    # the progress bar (stderr) is closed by now: flush it so the report comes after it
    sys.stderr.flush()
    summary: dict = {}
    if not any(p.row is None and p.column is None for p in problems):
        try:
            summary = summarize(args.manifest)
        except Exception:  # noqa: BLE001 - the problems list already says why
            summary = {}
    if args.json:
        out = {
            "ok": not problems,
            "manifest": str(args.manifest),
            "n_problems": len(problems),
            "problems": [p.to_dict() for p in problems],
            "n_warnings": len(warnings),
            "warnings": [w.to_dict() for w in warnings],
            **summary,
        }
        print(json.dumps(out, indent=2, ensure_ascii=False), flush=True)
        return 1 if problems else 0
    for p in problems:
        print(str(p))
    # per-row warnings (an image that decodes to a constant) and whole-manifest ones (a mix of
    # volumes and 2-D images), each kind with its own summary
    constant = [w for w in warnings if w.row is not None]
    for w in constant[:MAX_WARNING_LINES]:
        print(f"warning: {w}")
    if constant:
        more = len(constant) - MAX_WARNING_LINES
        print(
            (f"warning: ... and {more} more; " if more > 0 else "warning: ")
            + (f"{len(constant)} images decode" if len(constant) != 1 else "1 image decodes")
            + " to a constant image (every pixel equal): check the DICOM window / rescale or "
            "the export"
        )
    for w in warnings:
        if w.row is None:
            print(f"warning: {w.message}")
    if problems:
        rows = {p.row for p in problems if p.row is not None}
        n = summary.get("n_cases")
        of = f" in {len(rows)} of {n} rows" if n is not None and rows else ""
        print(f"{len(problems)} problem{'s' if len(problems) != 1 else ''} found{of}", flush=True)
        return 1
    labels = ", ".join(f"{k}: {v}" for k, v in summary["labels"].items())
    splits = ", ".join(f"{k}: {v}" for k, v in summary["splits"].items())
    note = f", {len(warnings)} warning{'s' if len(warnings) != 1 else ''}" if warnings else ""
    print(
        f"OK: {summary['n_cases']} cases, labels {{{labels}}}, splits {{{splits}}}{note}",
        flush=True,
    )
    return 0
