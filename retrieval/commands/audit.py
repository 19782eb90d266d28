"""`casebase audit INDEX_DIR MANIFEST [--split test] [--attributes a,b] [--out REPORT.html]
[--json] [--permutations B] [--seed S]`: is retrieval matching on the lesion or on a shortcut?

Writes the report (one self-contained HTML file) and its JSON into the bundle
as ``audit/report.html`` and ``audit/audit.json`` (atomically, via
``index.bundle.update``) so the app's audit tab can show them, and also to
``--out`` when given. ``--json`` prints the result object; otherwise a table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from index import bundle
from retrieval import atomic
from retrieval.audit import run_audit, verdict
from retrieval.audit.report import LEAK_SEARCH_NOTE, exclusion_note, render_html
from retrieval.errors import CasebaseError
from retrieval.service.retriever import CaseRetriever

REPORT_FILE = "audit/report.html"
JSON_FILE = "audit/audit.json"


def _store(index_dir: str, html_text: str, data: dict) -> str | None:
    """Put the report into the bundle; a warning (not a failure) when the bundle is read-only."""
    try:
        bundle.update(
            index_dir,
            files={REPORT_FILE: html_text.encode("utf-8"), JSON_FILE: bundle.canonical_json(data)},
        )
    except (OSError, CasebaseError) as err:
        print(
            f"casebase audit: warning: could not store the report in the bundle ({err})",
            file=sys.stderr,
        )
        return None
    return str(Path(index_dir) / REPORT_FILE)


def _f(x, fmt=".3f") -> str:
    return "–" if x is None else format(x, fmt)


def print_table(data: dict, stored: str | None, out: str | None, replaced: bool = False) -> None:
    print(
        f"{data['n_queries']} {data['split']} queries against {data['n_indexed']} indexed cases "
        f"({data['weighting']} weighting, top-{data['k']}, {exclusion_note(data)}); "
        f"precision@5 {_f(data['precision_at_5'])}"
    )
    head = (
        f"  {'attribute':<14}{'kind':<12}{'concord.':>9}{'expected':>9}{'lift':>7}{'p':>8}{'p_holm':>8}"
        f"{'lift_q':>8}{'p_holm_q':>9}{'probe':>7}{'chance':>7}  flagged"
    )
    print(head)
    for name, v in data["attributes"].items():
        q = v.get("query_null") or {}
        print(
            f"  {name:<14}{v['kind']:<12}{_f(v['concordance']):>9}{_f(v['expected']):>9}"
            f"{_f(v['lift'], '.2f'):>7}{_f(v['p_value'], '.4f'):>8}{_f(v['p_value_holm'], '.4f'):>8}"
            f"{_f(q.get('lift'), '.2f'):>8}{_f(q.get('p_value_holm'), '.4f'):>9}"
            f"{_f(v['probe_balanced_accuracy'], '.2f'):>7}{_f(v['chance'], '.2f'):>7}  "
            f"{'FLAGGED' if v['flagged'] else 'bias' if v.get('retrieval_bias') else 'no'}"
        )
    for name, reason in (data.get("skipped_attributes") or {}).items():
        print(f"  {name:<14}not audited: {reason}")
    for name, v in data["attributes"].items():
        if v.get("binning"):
            print(f"  {name}: {v['binning']}")
    print("  (expected / lift / p: index-side null; lift_q / p_holm_q: query-side null)")
    print(f"  rule: {data['flag_rule']}")
    if note := verdict.sensitivity_note(data):
        print(f"  {note}")
    if data.get("flagged"):
        print(f"  SHORTCUT(S): {', '.join(data['flagged'])}")
    if data.get("retrieval_bias"):
        print(f"  retrieval bias (not label-associated): {', '.join(data['retrieval_bias'])}")
    for f in data.get("concept_shortcuts") or []:
        print(f"  CONCEPT SHORTCUT: {f['text']}")
    for f in data.get("concept_influences") or []:
        print(f"  concept influence: {f['text']}")
    if data.get("concepts") and not data.get("concept_shortcuts"):
        print(f"  concepts tested, no shortcut: {', '.join(data['concepts']['concepts'])}")
    print("  precision@5 per group:")
    for name, g in data["groups"].items():
        cells = ", ".join(
            f"{k} {_f(v['precision_at_5'], '.2f')} (n={v['n']})" for k, v in g.items()
        )
        print(f"    {name}: {cells}")
    cf = data["counterfactual"]
    if cf.get("n_queries"):
        m = cf["masked_retrieval"]
        print(
            f"  counterfactual ({cf['n_queries']} queries with masks): similarity inside lesion "
            f"{_f(cf['similarity_in_lesion']['query'])} (lesion area {_f(cf['similarity_in_lesion']['lesion_area_query'])}); "
            f"precision@5 original {_f(m['original']['precision_at_5'])}, lesion removed "
            f"{_f(m['lesion_removed']['precision_at_5'])}, background removed "
            f"{_f(m['background_removed']['precision_at_5'])}, chance {_f(m['chance_precision_at_5'])}"
        )
        if cf.get("interpretation"):
            print(f"    {cf['interpretation']}")
    else:
        print(f"  counterfactual: {cf.get('note', 'not run')}")
    lk = data["leakage"]
    px = lk.get("identical_pixels", {}).get("n", "–")
    npx = lk.get("near_duplicate_pixels", {}).get("n", "–")
    print(
        f"  leakage: {lk['near_duplicates']['n']} embedding near-duplicates (cosine >= "
        f"{lk['near_duplicates']['threshold']:.6g}), {npx} pixel near-duplicates, {px} identical-pixel pairs, "
        f"{lk['shared_case_ids']['n']} shared case ids, {lk['own_patient_neighbors']['n']} own-patient "
        f"neighbours {LEAK_SEARCH_NOTE}"
    )
    print(f"  report: {report_note(stored, out, replaced)}")


def report_note(stored: str | None, out: str | None, replaced: bool) -> str:
    """Where the report went, saying when the bundle's copy (the app's Audit tab) was replaced."""
    bundle_note = ""
    if stored:
        verb = "replaced" if replaced else "written"
        bundle_note = f"the bundle's copy {stored} (shown by the app's Audit tab) {verb}"
    if out:
        return out + (f"; {bundle_note} too" if bundle_note else "")
    return bundle_note or "(not written)"


def _concepts(items) -> list[tuple[str, str]] | None:
    """--concept NAME=SPEC (repeatable): artefact concepts to test with TCAV."""
    if not items:
        return None
    from retrieval.concepts.sources import parse_assignment

    return [parse_assignment(c) for c in items]


def run(args) -> int:
    if args.permutations < 0:
        raise CasebaseError("--permutations must be 0 or more")
    out_path = Path(args.out) if args.out else None
    if out_path is not None and out_path.is_dir():
        raise CasebaseError(
            f"--out {out_path}: is a directory; give a file name such as report.html"
        )
    r = CaseRetriever.load(args.index_dir, device=getattr(args, "device", "auto"))
    result = run_audit(
        r,
        args.manifest,
        args.split,
        args.attributes,
        args.permutations,
        args.seed,
        progress=sys.stderr.isatty() or not args.json,
        concepts=_concepts(getattr(args, "concept", None)),
    )
    html_text = render_html(result.data, result.examples, result.concept_examples)
    if out_path is not None:
        try:  # a report the user hands on: the usual file mode (0644 under umask 022)
            atomic.write_text(out_path, html_text, mode=0o666)
        except OSError as err:
            raise CasebaseError(f"--out {out_path}: cannot write ({err.strerror or err})") from None
    replaced = (Path(args.index_dir) / REPORT_FILE).is_file()
    stored = _store(args.index_dir, html_text, result.data)
    out = str(out_path) if out_path else None
    if args.json:
        data = dict(result.data)
        data["report"] = {
            "out": out,
            "bundle": stored,
            "bundle_replaced": bool(stored and replaced),
        }
        print(json.dumps(data, indent=2, sort_keys=True))
        print(f"casebase audit: report: {report_note(stored, out, replaced)}", file=sys.stderr)
        return 0
    print_table(result.data, stored, out, replaced)
    return 0
