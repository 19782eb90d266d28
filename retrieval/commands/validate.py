"""`casebase validate MANIFEST [--json]`: report every problem, row by row."""

from __future__ import annotations

import json


def run(args) -> int:
    from retrieval.data.manifest import summarize, validate_manifest

    problems = validate_manifest(args.manifest, check_images=True, progress=True)
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
            **summary,
        }
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 1 if problems else 0
    for p in problems:
        print(str(p))
    if problems:
        rows = {p.row for p in problems if p.row is not None}
        n = summary.get("n_cases")
        of = f" in {len(rows)} of {n} rows" if n is not None and rows else ""
        print(f"{len(problems)} problem{'s' if len(problems) != 1 else ''} found{of}")
        return 1
    labels = ", ".join(f"{k}: {v}" for k, v in summary["labels"].items())
    splits = ", ".join(f"{k}: {v}" for k, v in summary["splits"].items())
    print(f"OK: {summary['n_cases']} cases, labels {{{labels}}}, splits {{{splits}}}")
    return 0
