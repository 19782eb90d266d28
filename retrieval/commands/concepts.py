"""`casebase concepts INDEX_DIR --concept NAME=SPEC [...] [--manifest M] [--layer L]
[--random-runs N] [--store] [--json] [--out REPORT.html]`: TCAV concept tests.

For each concept and class: the TCAV score of the class logit and of the similarity
to the class's indexed cases, against random directions (see retrieval.concepts.tcav).
--store keeps the concepts' embedding-space directions in the bundle, for
`casebase query ... --concept NAME=WEIGHT`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from retrieval import atomic
from retrieval.concepts import report, store
from retrieval.concepts.sources import parse_assignment
from retrieval.concepts.tcav import run_concepts
from retrieval.errors import CasebaseError
from retrieval.service.retriever import CaseRetriever


def print_table(data: dict) -> None:
    print(
        f"{len(data['concepts'])} concept(s), {data['random_runs']} random runs, class inputs "
        f"from split {data['class_inputs_split']} ({', '.join(f'{k} {v}' for k, v in data['n_class_inputs'].items())}); "
        f"headline layer {data['layer']}"
    )
    print(
        f"  {'concept':<14}{'layer':<20}{'target':<11}{'class':<12}{'TCAV':>6}{'random':>14}"
        f"{'effect':>10}{'random sd':>11}{'p_corr':>9}  sig"
    )
    for name, v in data["concepts"].items():
        for layer, lv in v["layers"].items():
            for target in ("classes", "similarity"):
                for c, t in lv[target].items():
                    rnd = f"{t['random_mean']:.2f}±{t['random_std']:.2f}"
                    print(
                        f"  {name:<14}{layer:<20}{'logit' if target == 'classes' else 'similarity':<11}"
                        f"{c:<12}{t['tcav_score']:>6.2f}{rnd:>14}{t['effect']:>+10.3g}"
                        f"{t['effect_random_std']:>11.3g}{t['p_value']:>9.3g}  "
                        f"{'YES' if t['significant'] else 'no'}"
                    )
            print(f"  {name:<14}{layer:<20}CAV accuracy {lv['cav_accuracy']:.2f}")
    for f in data["findings"]:
        print(f"  - {f['text']}")


def run(args) -> int:
    if args.random_runs < 2:
        raise CasebaseError("--random-runs must be at least 2 (20 or more recommended)")
    out_path = Path(args.out) if args.out else None
    if out_path is not None and out_path.is_dir():
        raise CasebaseError(
            f"--out {out_path}: is a directory; give a file name such as concepts.html"
        )
    specs = [parse_assignment(c) for c in args.concept]
    layers = [x for item in (args.layer or []) for x in item.split(",") if x.strip()] or None
    r = CaseRetriever.load(args.index_dir, device=args.device)
    result = run_concepts(
        r,
        specs,
        manifest=args.manifest,
        layers=layers,
        random_runs=args.random_runs,
        n_examples=args.max_images,
        per_class=args.per_class,
        split=args.split,
        seed=args.seed,
        progress=sys.stderr.isatty() or not args.json,
    )
    data = result.to_json()
    if out_path is not None:
        examples = {n: c.examples for n, c in result.concepts.items()}
        try:
            atomic.write_text(out_path, report.render_html(data, examples), mode=0o666)
        except OSError as err:
            raise CasebaseError(f"--out {out_path}: cannot write ({err.strerror or err})") from None
    if args.store:
        names = store.store(args.index_dir, result)
        data["stored"] = names
        print(f"casebase concepts: stored {', '.join(names)} in the bundle", file=sys.stderr)
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    print_table(data)
    if out_path is not None:
        print(f"  report: {out_path}")
    return 0
