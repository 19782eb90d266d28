"""Issue 23's GPU sweep: which cnn3d change moves Grad-CAM onto the lesion? (helpers + record)

bench/volume_init_sweep.sh runs the trainings on a lent GPU and calls this file for each run's
Grad-CAM-at-the-cells probe, the summary of every run and the pre-registered pick; then

    .venv/bin/python bench/volume_init_sweep.py record OUT/variants.json OUT/seeds.json \\
        --machine "NVIDIA H200, 16 cores, torch 2.11.0+cu130" --date 2026-12-04

merges the summaries into bench/results/volume_init_sweep.json (what docs/results.md shows).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS  # noqa: E402

# the CT variants: run name -> (train arguments at this commit, or None where the option is
# gone; the arguments as run at bfea852; what it tests). --cell-context existed only there.
VARIANTS = {
    "ct_wide": (
        "--no-zero-init-residual",
        "--cell-context wide",
        "the default: every block 3 x 3 x 3, default initialisation",
    ),
    "ct_mid": (None, "--cell-context mid", "stage 4 pointwise (receptive field 63 voxels)"),
    "ct_local": (
        None,
        "--cell-context local",
        "stage 3's residual and stage 4 pointwise (receptive field 31 voxels)",
    ),
    "ct_local_zi": (
        None,
        "--cell-context local --zero-init-residual",
        "local, residual blocks start as the identity",
    ),
    "ct_local_logits": (
        None,
        "--cell-context local --peak-pool logits",
        "local, top-k pooling of the per-cell logits",
    ),
    "ct_wide_zi": (
        "--zero-init-residual",
        "--cell-context wide --zero-init-residual",
        "residual blocks start as the identity (kept as an option)",
    ),
}
PICK_MIN_P5 = 0.85


def probe(index: str, manifest: str) -> dict:
    from volume_gradcam_peaks import peaks

    return peaks(Path(index), Path(manifest), 45)


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return {"error": str(e)[:200]}


def describe(name: str) -> tuple[str, str]:
    """(phantom, train arguments as run) of a run named by volume_init_sweep.sh: PHANTOM_VARIANT
    on ct96 / MR, the CT variant itself, or a CT variant with _s1 / _s2 (seed) or _both."""
    phantom, _, rest = name.partition("_")
    base = rest if phantom in ("ct96", "mr") else name
    phantom = phantom if phantom in ("ct96", "mr") else "ct"
    extra = ""
    if base.endswith(("_s1", "_s2")):
        base, extra = base[:-3], f"--seed {base[-1]} "
    elif base.endswith("_both"):
        base, extra = base[: -len("_both")], "--peak-pool both "
    base = base if base in VARIANTS else f"ct_{base}"  # ct96_wide: the ct_wide arguments
    return phantom, extra + VARIANTS[base][1]


def run_summary(d: Path) -> dict:
    """One run's figures: P@5, Grad-CAM at the cells, the pointing game, the training lines."""
    phantom, args_as_run = describe(d.name)
    ev, pr, ee = _json(d / "eval.json"), _json(d / "probe.json"), _json(d / "ee.json")
    methods = ee.get("methods", {})
    log = (d / "train.log").read_text().splitlines() if (d / "train.log").exists() else []
    keep = ("trained", "train_s", "training stalled", "1 restart", "2 restart")
    return {
        "name": d.name,
        "phantom": phantom,
        "args_as_run": args_as_run,
        "p5": ev.get("precision_at_5", ev.get("retrieval", {}).get("precision_at_5")),
        "cell_hit": pr.get("hit"),
        "per_class": pr.get("per_class"),
        "pointing": {k: v.get("pointing_game") for k, v in methods.items()},
        "pointing_strict": {k: v.get("pointing_game_strict") for k, v in methods.items()},
        "mask_energy": {k: v.get("mask_energy") for k, v in methods.items()},
        "train": [line for line in log if line.startswith(keep)][-5:],
    }


def pick(runs: dict) -> str:
    """Pre-registered: among the CT variants with P@5 >= PICK_MIN_P5, the highest Grad-CAM
    pointing game (half-cell), ties broken by the share of maxima in a lesion cell."""
    ok = [r for r in runs.values() if r["name"] in VARIANTS and (r["p5"] or 0) >= PICK_MIN_P5]
    if not ok:
        return "ct_wide"
    return max(ok, key=lambda r: ((r["pointing"] or {}).get("gradcam") or 0, r["cell_hit"] or 0))[
        "name"
    ]


def record(files: list[str], machine: str, date: str, commit: str) -> dict:
    runs: dict = {}
    for f in files:
        runs.update(json.loads(Path(f).read_text()))
    for name, run in runs.items():  # summaries written before run_summary recorded these
        run.setdefault("phantom", describe(name)[0])
        run.setdefault("args_as_run", describe(name)[1])
    doc = {
        "benchmark": "volume_init_sweep",
        "date": date,
        "machine": {"device": machine},
        "commit": commit,
        "variants": {
            k: {"args": a, "args_as_run": r, "what": w} for k, (a, r, w) in VARIANTS.items()
        },
        "pick_rule": f"among CT variants with P@5 >= {PICK_MIN_P5}, the best Grad-CAM pointing",
        "picked": pick(runs),
        "runs": runs,
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "volume_init_sweep.json").write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("variants")
    a = sub.add_parser("args")
    a.add_argument("name")
    p = sub.add_parser("probe")
    p.add_argument("index")
    p.add_argument("manifest")
    for name in ("summary", "pick"):
        sub.add_parser(name).add_argument("runs")
    r = sub.add_parser("record")
    r.add_argument("files", nargs="+")
    r.add_argument("--machine", required=True)
    r.add_argument("--date", required=True)
    r.add_argument("--commit", default="bfea852")
    args = ap.parse_args(argv)
    if args.cmd == "variants":  # the ones this commit can run
        print(" ".join(k for k, v in VARIANTS.items() if v[0] is not None))
    elif args.cmd == "args":
        print(VARIANTS[args.name][0] or VARIANTS[args.name][1])
    elif args.cmd == "probe":
        print(json.dumps(probe(args.index, args.manifest), default=str))
    elif args.cmd in ("summary", "pick"):
        runs = {d.name: run_summary(d) for d in sorted(Path(args.runs).iterdir()) if d.is_dir()}
        print(json.dumps(runs, indent=1) if args.cmd == "summary" else pick(runs))
    else:
        doc = record(args.files, args.machine, args.date, args.commit)
        print(f"{len(doc['runs'])} runs recorded; picked {doc['picked']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
