"""Does the shortcut audit flag what it should, seed after seed?

For each seed and each confounder (``site-marker`` at strength 0.9, and
``none``): phantom → train → index → audit, then the verdicts:

* site-marker: ``site`` flagged, ``sex`` and ``age`` not;
* none: nothing flagged.

Prints a per-run table and how often each verdict held, and writes
bench/results/audit_seeds.json. Every stage's output is kept under --work,
so an interrupted sweep resumes where it stopped (delete --work to start
over). CPU-heavy: run it in the background with ``nice``.

    nice python bench/audit_seeds.py --seeds 0,1,2,3,4 --n 600 --size 64 --epochs 12
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import finish, machine, table

EXPECT = {
    "site-marker": {"site": True, "sex": False, "age": False},
    "none": {"site": False, "sex": False, "age": False, "scanner": False},
}


def run_one(work: Path, seed: int, confounder: str, args) -> dict:
    from index.builder import build_index
    from retrieval.audit import run_audit
    from retrieval.phantom import make_phantom
    from retrieval.service import CaseRetriever
    from retrieval.train import TrainOptions, train_model

    root = work / f"{confounder}-s{seed}"
    done = root / "audit.json"
    if done.is_file():
        return json.loads(done.read_text())
    root.mkdir(parents=True, exist_ok=True)
    t = {}
    t0 = time.time()
    if not (root / "data" / "manifest.csv").is_file():
        make_phantom(root / "data", n=args.n, size=args.size, seed=seed, confounder=confounder,
                     strength=args.strength)
    t["phantom"] = time.time() - t0
    t0 = time.time()
    if not (root / "model" / "config.json").is_file():
        train_model(root / "data" / "manifest.csv", root / "model",
                    TrainOptions(epochs=args.epochs, seed=seed, progress=False))
    t["train"] = time.time() - t0
    t0 = time.time()
    if not (root / "index" / "bundle.json").is_file():
        build_index(root / "model", root / "data" / "manifest.csv", root / "index", progress=False)
    t["index"] = time.time() - t0
    t0, c0 = time.time(), time.process_time()
    r = CaseRetriever.load(root / "index")
    res = run_audit(r, root / "data" / "manifest.csv", "test", None, args.permutations, seed,
                    progress=False, max_counterfactual=args.counterfactual, examples=False)
    t["audit"] = time.time() - t0
    t["audit_cpu"] = time.process_time() - c0
    d = res.data
    out = {"seed": seed, "confounder": confounder, "n": args.n, "size": args.size, "epochs": args.epochs,
           "n_queries": d["n_queries"], "n_indexed": d["n_indexed"], "precision_at_5": d["precision_at_5"],
           "attributes": {n: {k: v[k] for k in ("concordance", "expected", "lift", "p_value", "p_value_holm",
                                                "probe_balanced_accuracy", "chance", "label_association",
                                                "label_association_p", "flagged", "retrieval_bias")}
                          for n, v in d["attributes"].items()},
           "counterfactual": {k: d["counterfactual"].get(k) for k in ("similarity_in_lesion", "masked_retrieval")},
           "seconds": {k: round(v, 1) for k, v in t.items()}}
    done.write_text(json.dumps(out, indent=1))
    return out


def rejudge(runs: list[dict]) -> None:
    """Re-apply the current flag rule to the stored statistics (cached runs follow rule changes)."""
    from retrieval.audit import verdict

    for r in runs:
        for v in r["attributes"].values():
            v["flagged"], v["retrieval_bias"], _ = verdict.decide(
                v["p_value_holm"], v["lift"], v["probe_balanced_accuracy"], v["chance"],
                (v["label_association"], v["label_association_p"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--confounders", default="site-marker,none")
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--strength", type=float, default=0.9)
    ap.add_argument("--permutations", type=int, default=1000)
    ap.add_argument("--counterfactual", type=int, default=60, help="counterfactual query cap (speed)")
    ap.add_argument("--work", default="/tmp/audit_seeds")
    args = ap.parse_args()
    started = time.time()
    info = machine()
    work = Path(args.work)
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for conf in args.confounders.split(","):
            runs.append(run_one(work, seed, conf, args))
            print(f"done: {conf} seed {seed}", flush=True)
    rejudge(runs)

    rows = []
    for r in runs:
        a = r["attributes"]
        cells = [r["confounder"], r["seed"], r["precision_at_5"]]
        for name in ("site", "sex", "age", "scanner"):
            v = a.get(name)
            cells.append("-" if v is None else
                         f"{v['lift']:.2f}/{v['p_value_holm']:.3f}/{v['probe_balanced_accuracy'] - v['chance']:+.2f}"
                         f"{' F' if v['flagged'] else ' b' if v['retrieval_bias'] else ''}")
        cells.append(r["seconds"].get("audit", float("nan")))
        rows.append(cells)
    table(["confounder", "seed", "P@5", "site", "sex", "age", "scanner", "audit s"], rows,
          "lift / Holm p / probe margin over chance; F = flagged (shortcut), b = retrieval bias")

    held: dict[str, list[bool]] = {}
    for r in runs:
        for name, want in EXPECT.get(r["confounder"], {}).items():
            v = r["attributes"].get(name)
            if v is not None:
                held.setdefault(f"{r['confounder']}: {name} {'flagged' if want else 'not flagged'}", []).append(
                    bool(v["flagged"]) == want)
        if r["confounder"] == "none":
            held.setdefault("none: nothing flagged", []).append(
                not any(v["flagged"] for v in r["attributes"].values()))
    vrows = [[k, f"{sum(v)}/{len(v)}"] for k, v in held.items()]
    print()
    table(["verdict", "held"], vrows)
    finish("audit_seeds", info, {"args": vars(args), "runs": runs,
                                 "verdicts": {k: {"held": sum(v), "of": len(v)} for k, v in held.items()}},
           started)


if __name__ == "__main__":
    main()
