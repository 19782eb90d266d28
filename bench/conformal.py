"""Conformal prediction sets and temperature scaling on phantoms (issue 21's acceptance).

For each data set (a folder holding model/ and data/manifest.csv, or given as
NAME=MODEL_DIR,MANIFEST): build an index with the sets calibrated on the val
split (the shipped path: index/builder.py), then on the test split report

* coverage and mean size of the 90 % sets the queries show (U = 0, never
  empty) and of the exact randomised sets, with a 95 % Clopper-Pearson
  interval, per class; classifier and neighbour vote;
* ECE before / after the bundle's temperature;
* a coverage sweep (0.8, 0.9, 0.95);
* `resplit`: val and test pooled and re-split at random into calibration and
  test halves many times: the mean coverage over draws is what the guarantee
  is about (one calibration set's coverage varies by about
  sqrt(α(1 − α) / n_cal) around it).

    python -m bench.conformal --data chest=/work/artifacts/h4/chest \
        --data photo=/work/artifacts/h4/photo [--draws 1000] [--rebuild] [--quick]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench._common import finish, machine
from retrieval.service import calibration as cal
from retrieval.service import conformal

COVERAGES = (0.8, 0.9, 0.95)


def _dataset(spec: str) -> tuple[str, Path, Path, Path]:
    name, _, rest = spec.partition("=")
    if "," in rest:
        model, manifest = rest.split(",", 1)
        root = Path(model).parent
        return name, Path(model), Path(manifest), root / f"index_conformal_{name}"
    root = Path(rest)
    return name, root / "model", root / "data" / "manifest.csv", root / "index_conformal"


def _votes(r, qs, k: int) -> np.ndarray:
    code = {c: i for i, c in enumerate(r.classes)}
    sims = np.array([[s for s, _ in h[:k]] for h in qs.hits])
    labs = np.array([[code.get(r.cases.at[row, "label"], -1) for _, row in h[:k]] for h in qs.hits])
    return conformal.vote_probabilities(sims, labs, len(r.classes))


def _resplit(r, split_probs: dict, split_y: dict, draws: int, coverage: float, seed=0) -> dict:
    """Pool val + test; random halves as calibration / test, `draws` times; randomised APS."""
    out = {}
    for head_name, probs in split_probs.items():
        p = np.concatenate([probs["val"], probs["test"]])
        y = np.concatenate([split_y["val"], split_y["test"]])
        rng = np.random.default_rng(seed)
        shown, rand, size = [], [], []
        for _ in range(draws):
            perm = rng.permutation(len(y))
            c, t = perm[: len(y) // 2], perm[len(y) // 2 :]
            head = conformal.ConformalHead.calibrate(
                p[c], y[c], "aps", seed=int(rng.integers(1 << 30))
            )
            m = head.sets(p[t], coverage)
            mr = head.sets(p[t], coverage, rng=rng)
            shown.append(m[np.arange(len(t)), y[t]].mean())
            rand.append(mr[np.arange(len(t)), y[t]].mean())
            size.append(m.sum(1).mean())
        out[head_name] = {
            "n_calibration": len(y) // 2,
            "n_test": len(y) - len(y) // 2,
            "draws": draws,
            "shown_mean_coverage": float(np.mean(shown)),
            "shown_coverage_sd_over_draws": float(np.std(shown)),
            "randomized_mean_coverage": float(np.mean(rand)),
            "randomized_coverage_sd_over_draws": float(np.std(rand)),
            "randomized_share_of_draws_within_0.03": float(
                np.mean(np.abs(np.array(rand) - coverage) <= 0.03)
            ),
            "mean_size": float(np.mean(size)),
        }
    return out


def run_one(name, model_dir, manifest, index_dir, rebuild: bool, draws: int) -> dict:
    from index.builder import build_index
    from retrieval.service.evaluate import embed_split
    from retrieval.service.retriever import CaseRetriever
    from retrieval.service.uncertainty import reliability_plot, uncertainty_sections

    if rebuild or not (index_dir / "conformal.json").is_file():
        build_index(model_dir, manifest, index_dir, coverage=0.9)
    r = CaseRetriever.load(index_dir)
    k = max(10, r.conformal.knn_k)
    qs = {s: embed_split(r, manifest, s, k) for s in ("val", "test")}
    sets, calib = uncertainty_sections(r, qs["test"], 0.9)
    sweep = {}
    for c in COVERAGES:
        s, _ = uncertainty_sections(r, qs["test"], c)
        sweep[str(c)] = {
            "coverage": s["coverage"],
            "mean_size": s["mean_size"],
            "randomized_coverage": s["randomized"]["coverage"],
            "randomized_mean_size": s["randomized"]["mean_size"],
            "knn_vote_coverage": s["knn_vote"]["coverage"],
            "knn_vote_mean_size": s["knn_vote"]["mean_size"],
        }
    code = {c: i for i, c in enumerate(r.classes)}
    y = {s: np.array([code[v] for v in q.cases["label"]]) for s, q in qs.items()}
    probs = {
        "classifier": {
            s: cal.apply_temperature(q.probabilities, r.conformal.temperature)
            for s, q in qs.items()
        },
        "knn_vote": {s: _votes(r, q, r.conformal.knn_k) for s, q in qs.items()},
    }
    png = reliability_plot(calib, f"{name} phantom, test split")
    plot = None
    if png:
        plot = Path(__file__).resolve().parent / "results" / f"conformal_reliability_{name}.png"
        plot.write_bytes(png)
    calib["reliability_png"] = (
        str(plot.relative_to(Path(__file__).resolve().parent.parent)) if plot else None
    )
    return {
        "index": str(index_dir),
        "n_indexed": int(r.index.ntotal),
        "classes": r.classes,
        "bundle_calibration": r.meta.get("calibration"),
        "test": {
            "classifier_accuracy": float((qs["test"].probabilities.argmax(1) == y["test"]).mean()),
            "prediction_sets": sets,
            "calibration": calib,
        },
        "coverage_sweep": sweep,
        "resplit_val_test": _resplit(r, probs, y, draws, 0.9),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--data", action="append", required=True, help="NAME=DIR or NAME=MODEL,MANIFEST"
    )
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--quick", action="store_true", help="100 draws; writes <name>_quick.json")
    ap.add_argument(
        "--name", default="conformal", help="results file name (bench/results/NAME.json)"
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.draws, args.name = min(args.draws, 100), f"{args.name}_quick"
    t0, info = time.time(), machine()
    out = {}
    for spec in args.data:
        name, model, manifest, index_dir = _dataset(spec)
        out[name] = run_one(name, model, manifest, index_dir, args.rebuild, args.draws)
        t = out[name]["test"]
        ps, c = t["prediction_sets"], t["calibration"]
        print(
            f"{name}: test n={ps['n']} accuracy {t['classifier_accuracy']:.3f}; 90% sets shown "
            f"coverage {ps['coverage']:.3f} CI {ps['coverage_ci95']}, size {ps['mean_size']:.2f}; "
            f"randomised {ps['randomized']['coverage']:.3f} size {ps['randomized']['mean_size']:.2f}; "
            f"kNN {ps['knn_vote']['coverage']:.3f}/{ps['knn_vote']['mean_size']:.2f}; "
            f"ECE {c['ece_before']:.3f} -> {c['ece_after']:.3f} (T {c['temperature']:.2f})"
        )
    path = finish(args.name, info, {"target_coverage": 0.9, "datasets": out}, t0)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
