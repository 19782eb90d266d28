"""explain-eval for every method on trained phantom models: the table the docs show.

Runs ``retrieval.explain.trust.evaluate`` (what ``casebase explain-eval --no-store``
runs) on each ``--index NAME=INDEX_DIR:MANIFEST`` and writes
bench/results/explain_eval_table.json: per data set and method the pointing game,
mask energy, deletion / insertion AUC against a random order, the faithfulness
verdict with its bootstrap CI, the sanity verdict with the cascading /
independent randomisation curves, Hanawa et al.'s neighbour tests, and the
sanity figure (``--plot-dir``, one PNG per data set).

    .venv/bin/python bench/explain_eval_table.py \\
        --index chest=/work/artifacts/h6/chest/index:/work/artifacts/h6/chest/data/manifest.csv \\
        --index photo=/work/artifacts/h6/photo/index:/work/artifacts/h6/photo/data/manifest.csv
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import RESULTS, finish, machine, table


def _binned(manifest: str, column: str) -> str:
    """A copy of the manifest with ``<column>_class``: low / high against the label's median."""
    import pandas as pd

    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    value = pd.to_numeric(df[column])
    median = value.groupby(df["label"]).transform("median")
    df[f"{column}_class"] = (value > median).map({True: "high", False: "low"})
    out = Path(manifest).with_name(f"{Path(manifest).stem}.{column}_class.csv")
    df.to_csv(out, index=False)
    return str(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", action="append", required=True, metavar="NAME=INDEX:MANIFEST")
    ap.add_argument("--max-cases", type=int, default=24)
    ap.add_argument("--sanity-cases", type=int, default=4)
    ap.add_argument("--sanity-seeds", type=int, default=3)
    ap.add_argument("--methods", default=None)
    ap.add_argument("--split", default="test")
    ap.add_argument("--subclass", default=None, help="manifest column of subclasses")
    ap.add_argument(
        "--subclass-bin",
        default=None,
        metavar="COLUMN",
        help="a continuous lesion factor (e.g. lesion_size) split at its median within each "
        "label into low / high: the subclass of Hanawa et al.'s identical-subclass test "
        "(written to a manifest copy beside the original)",
    )
    ap.add_argument("--name", default="explain_eval_table")
    ap.add_argument("--plot-dir", default=str(RESULTS))
    args = ap.parse_args()

    from retrieval.explain import registry, sanity, trust
    from retrieval.service.retriever import CaseRetriever

    started = time.time()
    info = machine()
    methods = args.methods.split(",") if args.methods else list(registry.METHODS)
    subclass = f"{args.subclass_bin}_class" if args.subclass_bin else args.subclass
    out = {}
    for spec in args.index:
        name, rest = spec.split("=", 1)
        index, manifest = rest.split(":", 1)
        if args.subclass_bin:
            manifest = _binned(manifest, args.subclass_bin)
        r = CaseRetriever.load(index, device="cpu")
        t0 = time.time()
        report = trust.evaluate(
            r,
            manifest,
            args.split,
            methods,
            args.max_cases,
            progress=True,
            sanity_cases=args.sanity_cases,
            sanity_seeds=tuple(range(args.sanity_seeds)),
            subclass=subclass,
        )
        report["wall_s"] = round(time.time() - t0, 1)
        report["model"] = {
            "image_size": r.model.config.image_size,
            "backbone": r.model.config.backbone,
            "classes": r.model.config.classes,
            "training": {
                k: r.model.config.training.get(k)
                for k in ("best_val", "epochs_run", "epochs_total")
            },
        }
        if any(m.get("sanity") for m in report["methods"].values()):  # not with 0 cases
            png = Path(args.plot_dir) / f"{args.name}_{name}_sanity.png"
            sanity.plot_curves(report["methods"], png, f"{name}: {index}")
            report["plot"] = str(png)
        out[name] = report
        rows = []
        for m in methods:
            v = report["methods"][m]
            lo, hi = v["deletion_gain_ci95"]
            rows.append(
                [
                    m,
                    v["family"],
                    v["pointing_game"],
                    v["mask_energy"],
                    v["deletion_auc"],
                    v["deletion_auc_random"],
                    f"{v['deletion_gain']:+.3f} [{lo:+.3f}, {hi:+.3f}]",
                    v["faithfulness"],
                    v["randomization_spearman_abs"],
                    v["sanity_check"],
                    v["seconds_per_map"],
                ]
            )
        table(
            [
                "method",
                "family",
                "point",
                "energy",
                "del",
                "del rnd",
                "del gain [95% CI]",
                "faithful",
                "|rho| full rnd",
                "sanity",
                "s/map",
            ],
            rows,
            title=f"{name}: {report['n_cases']} {args.split} cases; sanity on "
            f"{min(args.sanity_cases, report['n_cases'])} cases x {args.sanity_seeds} seeds",
        )
        print("neighbour tests:", report["neighbour_tests"])
    finish(
        args.name,
        info,
        {
            "config": {
                "max_cases": args.max_cases,
                "sanity_cases": args.sanity_cases,
                "sanity_seeds": args.sanity_seeds,
                "split": args.split,
                "methods": methods,
                "subclass": subclass,
                "subclass_binned_from": args.subclass_bin,
            },
            "datasets": out,
        },
        started,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
