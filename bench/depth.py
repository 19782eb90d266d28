"""Do neighbours resemble the query beyond its label? CLI defaults on two phantoms.

For each phantom (chest DICOM, ``--modality xray``; RGB dermoscopy-like photos,
``--modality photo``) this script makes the phantom, trains with the CLI defaults
(``casebase train``), builds the index (``casebase index build``) and searches every test
case against it, its own patient excluded. Per phantom it writes:

* label retrieval: precision@1, precision@5, MAP@R;
* within-class agreement on the phantom's known generative factors (lesion size, x, y,
  within-class shape, contrast; written by the phantom into the manifest): the mean
  |difference| between a query and its same-label top-5 neighbours, divided by the mean
  |difference| between the query and every same-label indexed case (own patient
  excluded). 1 = neighbours no closer than a random same-label case; target <= 0.5 for
  lesion size; the same for the background around the lesion (mean intensity outside the
  mask, read from the files), which says what neighbours agree on instead;
* the spread of the raw cosine similarities: median over queries of top-1 minus top-10;
* training seconds, epochs (kept schedule and all schedules), the machine's load.

The trained indexes are kept (``--keep``, default /work/artifacts/depth/{chest,photo}/) so
that matched regions and similarity scores can be measured on them.

    python bench/depth.py                 # both phantoms, the sizes below
    python bench/depth.py --n 600 --only chest
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import finish, machine  # noqa: E402

# the training options a variant may change (recorded with every result)
LOSS_OPTIONS = ("loss", "temperature", "instance_weight", "instance_temperature", "aug_scale")
FACTORS = ("lesion_size", "lesion_x", "lesion_y", "lesion_shape", "lesion_contrast")
# not a lesion factor: the mean intensity of the image outside the lesion mask (the photo's skin
# tone, the film's exposure), computed from the files; how much neighbours agree on what
# surrounds the lesion rather than on the lesion
CONTEXT = "background"
# Sized so that both phantoms together train, index and evaluate in about 20 minutes on 2
# CPU cores: 1,200 chest films (the issue's `phantom --n 1200 --seed 21`) and 1,200 photos.
KEEP = "/work/artifacts/depth"
PHANTOMS = {
    "chest": {"modality": "xray", "n": 1200, "seed": 21, "size": 128},
    "photo": {"modality": "photo", "n": 1200, "seed": 21, "size": 128},
}


def depth_metrics(
    q_vec: np.ndarray,
    q_label: np.ndarray,
    q_patient: np.ndarray,
    q_factors: dict[str, np.ndarray],
    g_vec: np.ndarray,
    g_label: np.ndarray,
    g_patient: np.ndarray,
    g_factors: dict[str, np.ndarray],
    k: int = 5,
) -> dict:
    """Label retrieval, factor agreement and cosine spread of queries against a gallery."""
    sims = q_vec @ g_vec.T
    p1, p5, map_r, gaps = [], [], [], []
    near = {f: [] for f in q_factors}
    rand = {f: [] for f in q_factors}
    for i in range(len(q_vec)):
        allowed = g_patient != q_patient[i]
        s = np.where(allowed, sims[i], -np.inf)
        order = np.argsort(-s, kind="stable")[: int(allowed.sum())]
        same = g_label[order] == q_label[i]
        p1.append(float(same[0]))
        p5.append(float(same[:k].mean()))
        r = int(same.sum())
        if r:
            hits = same[:r]
            prec = np.cumsum(hits) / np.arange(1, r + 1)
            map_r.append(float((prec * hits).sum() / r))
        if len(order) >= 10:
            gaps.append(float(s[order[0]] - s[order[9]]))
        top_same = order[:k][same[:k]]
        pool = allowed & (g_label == q_label[i])
        for f in q_factors:
            qv = q_factors[f][i]
            if np.isfinite(qv) and top_same.size and pool.any():
                near[f].extend(np.abs(g_factors[f][top_same] - qv).tolist())
                rand[f].append(float(np.nanmean(np.abs(g_factors[f][pool] - qv))))
    factor_ratio = {
        f: (float(np.nanmean(near[f]) / np.nanmean(rand[f])) if near[f] else None)
        for f in q_factors
    }
    return {
        "n_queries": len(q_vec),
        "n_indexed": len(g_vec),
        "precision_at_1": float(np.mean(p1)),
        "precision_at_5": float(np.mean(p5)),
        "map_at_r": float(np.mean(map_r)) if map_r else None,
        "factor_ratio": factor_ratio,
        "size_ratio": factor_ratio.get("lesion_size"),
        "raw_gap_top1_top10_median": float(np.median(gaps)) if gaps else None,
        "raw_top1_median": float(np.median(np.max(np.where(np.isfinite(sims), sims, -1), 1))),
    }


@functools.cache
def _background(image: str, mask: str) -> float:
    """Mean intensity of one image outside its lesion mask (cached: the index's embedding and
    the alternative vectors score the same cases)."""
    from retrieval.data.imageio import read_image, read_mask

    try:
        px = read_image(image).pixels.mean(-1)
        m = read_mask(mask, px.shape)
    except Exception:  # an unreadable file leaves the factor unknown for that case
        return np.nan
    return float(px[~m].mean()) if (~m).any() else np.nan


def with_background(df, man):
    """``df`` with a CONTEXT column: each image's mean intensity outside its lesion mask."""
    if "mask" not in df.columns:
        return df
    values = [
        _background(str(man.resolve(img)), str(man.resolve(mask))) if str(mask).strip() else np.nan
        for img, mask in zip(df["image"], df["mask"], strict=True)
    ]
    return df.assign(**{CONTEXT: values})


def _factor_arrays(df) -> dict[str, np.ndarray]:
    out = {}
    for f in (*FACTORS, CONTEXT):
        if f in df.columns:
            out[f] = np.asarray(
                [float(v) if str(v).strip() else np.nan for v in df[f]], dtype=np.float64
            )
    return out


def evaluate_model(model_dir, manifest_path, weighting: str = "saliency") -> dict:
    """depth_metrics of a trained model: test split against train+val (what the index holds)."""
    from retrieval.data.manifest import load_manifest
    from retrieval.model.embedding import embed_paths
    from retrieval.model.network import load_model
    from retrieval.model.preprocess import Preprocessor

    man = load_manifest(manifest_path)
    model = load_model(model_dir)
    pre = Preprocessor(model.config)

    def embed(splits):
        df = man.select(splits).reset_index(drop=True)
        emb = embed_paths(
            model, pre, [str(man.resolve(p)) for p in df["image"]], weighting, progress=False
        )
        return with_background(df.iloc[emb.ok].reset_index(drop=True), man), emb.vectors

    g_df, g_vec = embed(["train", "val"])
    q_df, q_vec = embed(["test"])
    return _metrics_from_frames(q_df, q_vec, g_df, g_vec)


def _metrics_from_frames(q_df, q_vec, g_df, g_vec) -> dict:
    return depth_metrics(
        q_vec,
        q_df["label"].to_numpy(),
        q_df["patient_id"].to_numpy(),
        _factor_arrays(q_df),
        g_vec,
        g_df["label"].to_numpy(),
        g_df["patient_id"].to_numpy(),
        _factor_arrays(g_df),
    )


def evaluate_index(index_dir, manifest_path) -> dict:
    """depth_metrics on a built bundle: its stored vectors, the test split as queries."""
    import pandas as pd

    from retrieval.data.manifest import load_manifest
    from retrieval.service.evaluate import embed_split
    from retrieval.service.retriever import CaseRetriever

    r = CaseRetriever.load(index_dir, device="cpu")
    g_vec = np.asarray(r.index.reconstruct_all(), np.float32)
    man = load_manifest(manifest_path)
    full = man.df if hasattr(man, "df") else man.select(["train", "val", "test"])
    cols = ["case_id", *[f for f in (*FACTORS, "image", "mask") if f in full.columns]]
    g_df = r.cases[["case_id", "label", "patient_id"]].merge(
        pd.DataFrame(full[cols]), on="case_id", how="left"
    )
    qs = embed_split(r, manifest_path, "test", k=5, progress=False)
    q_df = qs.cases[["case_id", "label", "patient_id"]].merge(
        pd.DataFrame(full[cols]), on="case_id", how="left"
    )
    g_df, q_df = with_background(g_df, man), with_background(q_df, man)
    return _metrics_from_frames(q_df, qs.vectors, g_df, g_vec)


def parse_train_args(pairs: list[str]) -> dict:
    """``["temperature=0.5", "aug_scale=0"]`` -> TrainOptions overrides, typed by the field."""
    from dataclasses import fields

    from retrieval.model.train import TrainOptions

    kinds = {}
    for f in fields(TrainOptions):
        hint = str(f.type)  # annotations are strings here (from __future__ import annotations)
        kinds[f.name] = next(
            (k for n, k in (("bool", bool), ("int", int), ("float", float)) if n in hint), str
        )
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if key not in kinds or not value:
            raise SystemExit(
                f"--train-arg {pair!r}: expected NAME=VALUE, NAME one of {sorted(kinds)}"
            )
        kind = kinds[key]
        if kind is bool:
            out[key] = value.lower() in ("1", "true", "yes")
        else:
            out[key] = kind(float(value)) if kind is int else kind(value)
    return out


def alternative_features(model_dir, manifest_path) -> dict:
    """depth_metrics of the same model on other retrieval vectors: the uniform-pooled embedding,
    both embeddings concatenated, and the pooled backbone features before the projection."""
    import torch

    from retrieval.data.manifest import load_manifest
    from retrieval.model.embedding import embed_paths
    from retrieval.model.network import load_model
    from retrieval.model.preprocess import Preprocessor

    man = load_manifest(manifest_path)
    model = load_model(model_dir)
    pre = Preprocessor(model.config)
    pooled: list[torch.Tensor] = []
    handle = model.backbone.register_forward_hook(
        lambda _m, _i, out: pooled.append(out.detach().mean(dim=(2, 3)))
    )

    def embed(splits):
        df = man.select(splits).reset_index(drop=True)
        paths = [str(man.resolve(p)) for p in df["image"]]
        pooled.clear()
        uni = embed_paths(model, pre, paths, "uniform", progress=False)
        feats = torch.cat(pooled).numpy() if pooled else np.zeros((0, 0))
        sal = embed_paths(model, pre, paths, "saliency", progress=False)
        ok = np.intersect1d(uni.ok, sal.ok)
        feats = feats / np.linalg.norm(feats, axis=1, keepdims=True).clip(1e-12)
        vecs = {
            "uniform": uni.vectors,
            "concat": np.hstack([sal.vectors, uni.vectors]) / np.sqrt(2.0),
            "pooled_features": feats[: len(uni.vectors)],
        }
        return with_background(df.iloc[ok].reset_index(drop=True), man), vecs

    try:
        g_df, g = embed(["train", "val"])
        q_df, q = embed(["test"])
    finally:
        handle.remove()
    out = {k: _metrics_from_frames(q_df, q[k], g_df, g[k]) for k in g}
    for k in out:
        out[k]["size_probe_r2"] = size_probe(g_df, g[k], q_df, q[k])
    return out


def size_probe(g_df, g_vec, q_df, q_vec) -> float | None:
    """Within-class R² of a ridge fit of lesion size on the vectors (fitted on the gallery,
    scored on the queries; each class's mean size removed): is size in the vectors at all?"""
    from sklearn.linear_model import RidgeCV

    gf, qf = _factor_arrays(g_df), _factor_arrays(q_df)
    if "lesion_size" not in gf:
        return None

    def centred(df, vec, size):
        keep = np.isfinite(size)
        lab = df["label"].to_numpy()[keep]
        x, y = np.asarray(vec)[keep].astype(np.float64), size[keep].copy()
        for c in np.unique(lab):
            m = lab == c
            x[m] -= x[m].mean(0)
            y[m] -= y[m].mean()
        return x, y

    gx, gy = centred(g_df, g_vec, gf["lesion_size"])
    qx, qy = centred(q_df, q_vec, qf["lesion_size"])
    if len(gy) < 10 or len(qy) < 5:
        return None
    fit = RidgeCV(alphas=np.logspace(-4, 2, 13)).fit(gx, gy)
    return float(fit.score(qx, qy))


def run_one(
    name: str,
    spec: dict,
    work: Path,
    keep: Path | None,
    train_args: dict | None = None,
    phantom_dir: Path | None = None,
    alternatives: bool = False,
) -> dict:
    from index.builder import build_index
    from retrieval.data.phantom import make_phantom
    from retrieval.model.train import TrainOptions, train_model

    ph = phantom_dir or work / f"{name}_phantom"
    t0 = time.perf_counter()
    if phantom_dir and (phantom_dir / "manifest.csv").exists():
        manifest = phantom_dir / "manifest.csv"  # made earlier with the same spec: reuse it
    else:
        manifest = make_phantom(ph, **spec)
    t_phantom = time.perf_counter() - t0
    load_before = os.getloadavg()
    cpu0 = os.times()
    opts = TrainOptions(**(train_args or {}))
    report = train_model(manifest, work / f"{name}_model", opts)
    cpu1 = os.times()
    load_after = os.getloadavg()
    index_dir = (keep / name) if keep else work / f"{name}_index"
    if keep:
        index_dir.parent.mkdir(parents=True, exist_ok=True)
        # the phantom travels with the index, so its manifest paths stay valid
        if ph.resolve() != (keep / f"{name}_phantom").resolve():
            if (keep / f"{name}_phantom").exists():
                shutil.rmtree(keep / f"{name}_phantom")
            shutil.copytree(ph, keep / f"{name}_phantom")
        manifest = keep / f"{name}_phantom" / "manifest.csv"
    t1 = time.perf_counter()
    build_index(work / f"{name}_model", manifest, index_dir, progress=False)
    t_index = time.perf_counter() - t1
    metrics = evaluate_index(index_dir, manifest)
    if alternatives:
        metrics["alternatives"] = alternative_features(work / f"{name}_model", manifest)
    cfg = report.best_val or {}
    return {
        "phantom": spec,
        "train_options": {k: getattr(opts, k) for k in LOSS_OPTIONS},
        "manifest": str(manifest),
        "index": str(index_dir),
        **metrics,
        "train": {
            "seconds": report.seconds,
            "cpu_seconds": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
            "epochs_run": report.epochs_run,
            "epochs_total": report.epochs_total,
            "max_epochs": report.max_epochs,
            "restarts": len(report.attempts) - 1,
            "n_train": report.n_train,
            "n_val": report.n_val,
            "val_precision_at_1": cfg.get("precision_at_1"),
            "loadavg_before": list(load_before),
            "loadavg_after": list(load_after),
        },
        "phantom_seconds": t_phantom,
        "index_seconds": t_index,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=sorted(PHANTOMS), default=None)
    ap.add_argument("--n", type=int, default=None, help="override both phantoms' case count")
    ap.add_argument("--quick", action="store_true", help="300 cases per phantom; *_quick.json")
    ap.add_argument("--work", default="/tmp/casebase-depth")
    ap.add_argument("--keep", default=None, help=f"where the indexes stay (default {KEEP})")
    ap.add_argument(
        "--train-arg",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a TrainOptions override, e.g. temperature=0.5 or aug_scale=0 (repeatable)",
    )
    ap.add_argument(
        "--variant",
        default=None,
        help="record under this label in depth_variants.json (no index kept unless --keep)",
    )
    ap.add_argument(
        "--phantom-dir",
        default=None,
        help="phantom folder, {name} = chest/photo; reused if its manifest.csv exists",
    )
    ap.add_argument(
        "--alternatives",
        action="store_true",
        help="also measure the uniform, concatenated and pooled-feature retrieval vectors",
    )
    args = ap.parse_args(argv)
    train_args = parse_train_args(args.train_arg)
    info = machine()
    started = time.time()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    keep_dir = args.keep if args.keep is not None else (None if args.variant else KEEP)
    keep = Path(keep_dir) if keep_dir and not args.quick else None
    results = {}
    for name, spec in PHANTOMS.items():
        if args.only and name != args.only:
            continue
        spec = dict(spec, n=args.n or (300 if args.quick else spec["n"]))
        ph = Path(args.phantom_dir.format(name=name)) if args.phantom_dir else None
        res = run_one(name, spec, work, keep, train_args, ph, args.alternatives)
        results[name] = res
        print(
            f"{name}: P@1 {res['precision_at_1']:.3f} P@5 {res['precision_at_5']:.3f} "
            f"MAP@R {res['map_at_r']:.3f}; size ratio {res['size_ratio']:.2f}; raw top1-top10 "
            f"{res['raw_gap_top1_top10_median']:.4f}; train {res['train']['seconds']:.0f} s, "
            f"{res['train']['epochs_total']} epochs (load {res['train']['loadavg_after'][0]:.1f})",
            flush=True,
        )
    targets = {"chest_p5": 0.95, "photo_p5": 0.9, "size_ratio": 0.5}
    if args.variant:
        record_variant(args.variant, train_args, info, results, started)
        return 0
    # one phantom per process (--only) writes depth_<name>.json; --merge joins them
    finish(
        ("depth" + (f"_{args.only}" if args.only else "")) + ("_quick" if args.quick else ""),
        info,
        {"phantoms": results, "targets": targets},
        started,
    )
    return 0


def record_variant(label: str, train_args: dict, info: dict, results: dict, started: float) -> None:
    """Add one variant's per-phantom results to bench/results/depth_variants.json (under a
    lock, so that two variant runs side by side both land)."""
    import fcntl
    import json

    from _common import RESULTS

    path = RESULTS / "depth_variants.json"
    info = dict(info, loadavg_end=list(os.getloadavg()), wall_s=round(time.time() - started, 1))
    with open("/tmp/casebase-depth-variants.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        doc = json.loads(path.read_text()) if path.exists() else {"benchmark": "depth_variants"}
        doc.setdefault("targets", {"chest_p5": 0.95, "photo_p5": 0.9, "size_ratio": 0.5})
        entry = doc.setdefault("variants", {}).setdefault(label, {})
        entry["train_args"] = train_args
        for name, res in results.items():
            entry.setdefault("phantoms", {})[name] = dict(res, machine=info)
        doc["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        tmp.replace(path)
    print(f"recorded variant {label!r} in {path}")


def merge() -> int:
    """bench/results/depth.json from the per-phantom files of two parallel --only runs."""
    import json

    from _common import RESULTS

    parts = [json.loads((RESULTS / f"depth_{n}.json").read_text()) for n in PHANTOMS]
    doc = {
        "benchmark": "depth",
        "date": max(p["date"] for p in parts),
        "machine": {n: p["machine"] for n, p in zip(PHANTOMS, parts, strict=True)},
        "phantoms": {n: p["phantoms"][n] for n, p in zip(PHANTOMS, parts, strict=True)},
        "targets": parts[0]["targets"],
        "note": "the two phantoms ran as two processes side by side (--only chest, --only photo)",
    }
    (RESULTS / "depth.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {RESULTS / 'depth.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(merge() if sys.argv[1:] == ["--merge"] else main())
