"""Does training on the lesion masks (the extent head) keep a model off a shortcut?

A site-marker phantom ties a burned-in site letter to the label in train / val (strength 0.9)
and unties it in test. For each seed the same phantom trains two models with the CLI
defaults, one with the lesion-extent head (the default when masks exist, at the default weight;
``extent_shortcut_c1.json`` holds a run at ``--extent-weight 1``) and one without
(``--extent-weight 0``); each is indexed and audited (``casebase audit``,
the test split as queries). Per model: the label P@5 on the untied test split, whether the
audit flags ``site``, its neighbour lift and the probe's balanced accuracy (how much of the
site the embedding carries).

    .venv/bin/python bench/extent_shortcut.py --seeds 20 21 22 [--work /tmp/extent-shortcut]

Results to bench/results/extent_shortcut.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, finish, machine  # noqa: E402

CASEBASE = [str(Path(sys.executable).parent / "casebase")]
WEIGHTS = {"extent": None, "no_extent": "0"}  # None: the CLI default (the head on, at its weight)


def _run(args: list[str], log: Path) -> None:
    with open(log, "w") as fh:
        subprocess.run(
            [*CASEBASE, *args], check=True, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT
        )


def one(seed: int, work: Path, n: int) -> dict:
    ph = work / f"phantom_s{seed}"
    if not (ph / "manifest.csv").exists():
        _run(
            ["phantom", str(ph), "--n", str(n), "--seed", str(seed), "--confounder",
             "site-marker", "--strength", "0.9"],
            work / f"phantom_s{seed}.log",
        )  # fmt: skip
    out = {}
    for name, weight in WEIGHTS.items():
        model, index = work / f"{name}_s{seed}_model", work / f"{name}_s{seed}_index"
        t0 = time.perf_counter()
        _run(
            ["train", str(ph / "manifest.csv"), "--out", str(model), "--seed", str(seed),
             *(["--extent-weight", weight] if weight is not None else [])],
            work / f"{name}_s{seed}_train.log",
        )  # fmt: skip
        train_s = time.perf_counter() - t0
        _run(["index", "build", str(model), str(ph / "manifest.csv"), "--out", str(index)],
             work / f"{name}_s{seed}_index.log")  # fmt: skip
        report = work / f"{name}_s{seed}_audit.json"
        with open(report, "w") as fh:
            subprocess.run(
                [*CASEBASE, "audit", str(index), str(ph / "manifest.csv"), "--json",
                 "--out", str(work / f"{name}_s{seed}_audit.html")],
                check=True, stdout=fh, stderr=subprocess.DEVNULL, cwd=ROOT,
            )  # fmt: skip
        d = json.loads(report.read_text())
        site = d["attributes"]["site"]
        out[name] = {
            "precision_at_5": d["precision_at_5"],
            "site_flagged": "site" in d["flagged"],
            "site_lift": site.get("lift"),
            "site_p_value": site.get("p_value"),
            "site_probe_balanced_accuracy": site.get("probe_balanced_accuracy"),
            "train_seconds": train_s,
            "extent_weight": json.loads((model / "config.json").read_text())["extent_weight"],
        }
        print(f"seed {seed} {name}: {out[name]}", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[20, 21, 22])
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--work", default="/tmp/extent-shortcut")
    args = ap.parse_args(argv)
    started, info = time.time(), machine()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    runs = {f"s{s}": one(s, work, args.n) for s in args.seeds}
    summary = {
        name: {
            "site_flagged": sum(r[name]["site_flagged"] for r in runs.values()),
            "runs": len(runs),
            "precision_at_5_mean": sum(r[name]["precision_at_5"] for r in runs.values())
            / len(runs),
        }
        for name in WEIGHTS
    }
    finish(
        "extent_shortcut",
        info,
        {"n_cases": args.n, "strength": 0.9, "runs": runs, "summary": summary},
        started,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
