"""The GPU path, measured when a CUDA device is present (else: "no CUDA device; skipped", exit 0).

With CUDA it checks and times, on the device:

* training: a 1-epoch run records every ``torch.autocast`` context and the
  ``GradScaler`` (AMP must be on: autocast enabled on "cuda", scaler enabled);
* embedding: images/s of the index-build embedding (saliency) vs a plain
  forward on the GPU, same pre-decoded batches (and the model's parameters
  are on the device);
* Grad-CAM: closed form vs the registry's gradcam, ms per map on the GPU;
* ``index build --device cuda`` end to end, images/s;
* ``CaseRetriever.load(device="cuda")``: the search backend chosen
  (faiss-gpu with StandardGpuResources, else torch-cuda for Flat) and query
  p50/p95 with and without regions and with gradcam+similarity;
* search at ``--n`` (1M) clustered vectors: the GPU backend vs FAISS Flat on
  the CPU, batch 1 and batch 100 queries/s, and agreement of the top-10.

    .venv/bin/python bench/gpu_path.py
    .venv/bin/python bench/gpu_path.py --force-cpu --quick   # smoke-test this script's logic on the CPU
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _common import (
    DEFAULT_INDEX,
    DEFAULT_MANIFEST,
    DEFAULT_MODEL,
    clustered_unit_vectors,
    finish,
    interleaved,
    machine,
    percentile,
    summary,
    table,
)


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def check_training_amp(manifest, device, n_cases):
    """1 epoch on the first n_cases train+val cases; records autocast/GradScaler use."""
    import pandas as pd
    import torch

    from retrieval.data.manifest import load_manifest
    from retrieval.model import train

    calls, scalers = [], []
    real_autocast, real_scaler = torch.autocast, torch.amp.GradScaler

    def autocast(device_type, *a, **k):
        calls.append((device_type, bool(k.get("enabled", True))))
        return real_autocast(device_type, *a, **k)

    def scaler(*a, **k):
        s = real_scaler(*a, **k)
        scalers.append(s.is_enabled())
        return s

    tmp = Path(tempfile.mkdtemp(prefix="bench_gpu_train_"))
    try:
        m = load_manifest(manifest)
        df = m.select(["train", "val"]).iloc[:n_cases].copy()
        df["image"] = [str(m.resolve(p)) for p in df["image"]]
        if "mask" in df:
            df["mask"] = [str(m.resolve(p)) if p else "" for p in df["mask"]]
        pd.DataFrame(df).to_csv(tmp / "manifest.csv", index=False)
        torch.autocast, torch.amp.GradScaler = autocast, scaler
        t0 = time.perf_counter()
        train.train_model(
            tmp / "manifest.csv",
            tmp / "model",
            train.TrainOptions(epochs=1, progress=False, device=device.type),
        )
        secs = time.perf_counter() - t0
    finally:
        torch.autocast, torch.amp.GradScaler = real_autocast, real_scaler
        shutil.rmtree(tmp, ignore_errors=True)
    amp = bool(calls) and all(d == "cuda" and e for d, e in calls) and scalers == [True]
    return {
        "seconds": secs,
        "autocast_calls": len(calls),
        "autocast_devices": sorted({d for d, _ in calls}),
        "autocast_enabled": sorted({e for _, e in calls}),
        "grad_scaler_enabled": scalers,
        "amp": amp,
    }


def train_defaults(manifest, out, device):
    """``casebase train`` with the CLI defaults on the device: wall seconds and what ran."""
    import json

    from retrieval.model import train

    t0 = time.perf_counter()
    train.train_model(manifest, out, train.TrainOptions(progress=False, device=device.type))
    secs = time.perf_counter() - t0
    cfg = json.loads((Path(out) / "config.json").read_text())
    t = cfg.get("training", {})
    return {
        "seconds": secs,
        "n_train": t.get("n_train"),
        "epochs_run": t.get("epochs_run"),
        "epochs_total": t.get("epochs_total"),
        "val": {k: v for k, v in t.items() if k.startswith("val_")},
        "image_size": cfg.get("image_size"),
        "backbone": cfg.get("backbone"),
    }


def embedding_and_gradcam(model_dir, manifest, device, n, reps):
    import torch
    import torch.nn.functional as F

    from retrieval.data.manifest import load_manifest
    from retrieval.explain import registry
    from retrieval.model.dataset import decode_all
    from retrieval.model.embedding import embed_tensor
    from retrieval.model.network import load_model
    from retrieval.model.preprocess import Preprocessor

    model = load_model(model_dir, device)
    on_device = all(p.device.type == device.type for p in model.parameters())
    pre = Preprocessor(model.config)
    man = load_manifest(manifest)
    paths = [str(man.resolve(p)) for p in man.select(["train", "val"])["image"]][:n]
    images, ok, _ = decode_all(paths, pre, batch_size=64, num_workers=0, progress=False)
    batches = [pre.normalize(images[i : i + 64].to(device)) for i in range(0, len(ok), 64)]

    def plain():
        with torch.no_grad():
            for x in batches:
                model(x)
        sync(device)

    def saliency():
        for x in batches:
            embed_tensor(model, x, "saliency")  # ends in .cpu(): synchronises
        sync(device)

    t = interleaved({"plain": plain, "saliency": saliency}, reps=reps)
    emb = {k: len(ok) / summary(v)["median"] for k, v in t.items()}

    x = batches[0][:16]
    size = model.config.image_size
    with torch.no_grad():
        pred = model(x).argmax(1)

    def closed():
        with torch.no_grad():
            o = model.run(x)
            cam = model.gradcam(o.features, o.predicted)
            F.interpolate(cam[:, None], size=(size, size), mode="bilinear", align_corners=False)
        sync(device)

    def reg():
        registry.get("gradcam").attribute(model, x, pred)
        sync(device)

    g = interleaved({"closed form": closed, "registry gradcam": reg}, reps=reps)
    cam = {k: summary(v)["median"] * 1000 / len(x) for k, v in g.items()}
    return {
        "model_on_device": on_device,
        "images": len(ok),
        "images_per_s": emb,
        "saliency_vs_plain": emb["saliency"] / emb["plain"],
        "gradcam_ms_per_map": cam,
    }


def build_and_query(model_dir, manifest, index_dir, device, n_queries, k):
    from index.builder import build_index
    from retrieval.data.manifest import load_manifest
    from retrieval.service.retriever import CaseRetriever

    tmp = Path(tempfile.mkdtemp(prefix="bench_gpu_index_"))
    try:
        rep = build_index(model_dir, manifest, tmp / "index", device=device.type, progress=False)
        build = {"images_per_s": rep.images_per_second, "seconds": rep.seconds, "n": rep.n_indexed}
        r = CaseRetriever.load(index_dir or tmp / "index", device=device.type)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    man = load_manifest(manifest)
    imgs = [str(man.resolve(p)) for p in man.select(["test"])["image"]][:n_queries]
    variants = {
        "retrieval": {"regions": False},
        "regions": {},
        "gradcam+similarity": {"explain": ("gradcam", "similarity")},
    }
    for v in variants.values():
        r.query(imgs[0], k=k, **v)
    times = {v: [] for v in variants}
    for i, img in enumerate(imgs):
        names = list(variants)
        for v in names[i % 3 :] + names[: i % 3]:
            t0 = time.perf_counter()
            r.query(img, k=k, **variants[v])
            times[v].append((time.perf_counter() - t0) * 1000)
    return build, {
        "backend": r.index.backend,
        "device": str(r.device),
        "model_on_device": all(p.device.type == device.type for p in r.model.parameters()),
        "latency_ms": {
            v: {"p50": percentile(t, 50), "p95": percentile(t, 95)} for v, t in times.items()
        },
    }


def search(n, device, reps, n_batch1=20):
    import faiss

    from index.vector_index import VectorIndex

    data, sample = clustered_unit_vectors(n, 128, seed=0)
    q = sample(100, 99)
    cpu = VectorIndex.build(data, "Flat")
    gpu = VectorIndex.build(data, "Flat")
    t0 = time.perf_counter()
    backend = gpu.use_gpu() if device.type == "cuda" else "faiss-cpu (forced)"
    move_s = time.perf_counter() - t0
    want = cpu.search(q, 10)[1]
    got = gpu.search(q, 10)[1]
    agree = float((want == got).mean())

    def one(ix):
        def run():
            for v in q[:n_batch1]:
                ix.search(v[None], 10)

        return run

    t1 = interleaved({"cpu": one(cpu), "gpu": one(gpu)}, reps=reps)
    t100 = interleaved(
        {"cpu": lambda: cpu.search(q, 10), "gpu": lambda: gpu.search(q, 10)}, reps=reps
    )
    return {
        "n": n,
        "backend": backend,
        "to_device_s": move_s,
        "top10_agreement": agree,
        "faiss_gpu_installed": hasattr(faiss, "StandardGpuResources"),
        "qps_batch1": {k: n_batch1 / statistics.median(v) for k, v in t1.items()},
        "qps_batch100": {k: 100 / statistics.median(v) for k, v in t100.items()},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="a trained model; 'train' trains one with the CLI defaults on the device (timed)",
    )
    ap.add_argument("--index", default=DEFAULT_INDEX, help="'build': the index built here")
    ap.add_argument("--manifest", default=DEFAULT_MANIFEST)
    ap.add_argument(
        "--n", default="1000000", help="search sizes, comma-separated (e.g. 1000000,10000000)"
    )
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument(
        "--force-cpu", action="store_true", help="run the GPU code paths on the CPU (smoke test)"
    )
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available() and not args.force_cpu:
        print("no CUDA device; skipped")
        return 0
    sizes = [int(x) for x in str(args.n).split(",")]
    if args.quick:
        sizes, args.images, args.queries, args.reps = [20_000], 64, 3, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.time()
    info = machine()
    full = None
    if args.model == "train":
        args.model = tempfile.mkdtemp(prefix="bench_gpu_model_")
        full = train_defaults(args.manifest, args.model, device)
        print(f"trained with the CLI defaults in {full['seconds']:.1f} s", flush=True)
    train = check_training_amp(args.manifest, device, 120 if args.quick else 400)
    emb = embedding_and_gradcam(args.model, args.manifest, device, args.images, args.reps)
    build, query = build_and_query(
        args.model,
        args.manifest,
        None if args.index == "build" else args.index,
        device,
        args.queries,
        args.k,
    )
    searches = []
    for n in sizes:  # the largest size last: batch-1 CPU searches there are slow, so fewer
        searches.append(search(n, device, args.reps, 20 if n <= 2_000_000 else 5))
        print(f"search at {n:,} done", flush=True)
    rows = [
        [
            "training AMP (autocast on cuda + GradScaler)",
            "yes" if train["amp"] else "NO",
            f"{train['autocast_calls']} autocast calls, devices {train['autocast_devices']}, "
            f"enabled {train['autocast_enabled']}, scaler {train['grad_scaler_enabled']}",
        ],
        ["model on device (embedding, Grad-CAM)", "yes" if emb["model_on_device"] else "NO", ""],
        [
            "embedding images/s: saliency | plain",
            f"{emb['images_per_s']['saliency']:.0f} | {emb['images_per_s']['plain']:.0f}",
            f"ratio {emb['saliency_vs_plain']:.3f}",
        ],
        [
            "Grad-CAM ms/map: closed form | registry",
            f"{emb['gradcam_ms_per_map']['closed form']:.3f} | "
            f"{emb['gradcam_ms_per_map']['registry gradcam']:.3f}",
            "batch of 16",
        ],
        [
            "index build images/s (end to end)",
            f"{build['images_per_s']:.0f}",
            f"{build['n']} cases",
        ],
        ["query backend", query["backend"], f"model on device: {query['model_on_device']}"],
    ]
    for v, s in query["latency_ms"].items():
        rows.append([f"query p50/p95 ms: {v}", f"{s['p50']:.1f} / {s['p95']:.1f}", f"k={args.k}"])
    if full:
        rows.insert(
            0,
            [
                "casebase train, CLI defaults (s)",
                f"{full['seconds']:.1f}",
                f"{full['n_train']} train cases, {full['epochs_run']} epochs",
            ],
        )
    for srch in searches:
        rows.append(
            [
                f"search {srch['n']:,} Flat: backend",
                srch["backend"],
                f"top-10 agreement with CPU {srch['top10_agreement']:.4f}",
            ]
        )
        for b in ("qps_batch1", "qps_batch100"):
            rows.append(
                [
                    f"search {srch['n']:,} q/s {b[4:]}: device | CPU",
                    f"{srch[b]['gpu']:.0f} | {srch[b]['cpu']:.0f}",
                    f"x{srch[b]['gpu'] / srch[b]['cpu']:.1f}",
                ]
            )
    print()
    table(
        ["check", "result", "detail"],
        rows,
        title=f"GPU path on {info['cuda_device'] or 'CPU (forced)'}",
    )
    finish(
        ("gpu_path" if device.type == "cuda" else "gpu_path_forced_cpu")
        + ("_quick" if args.quick else ""),
        info,
        {
            "device": str(device),
            "training": train,
            "embedding": emb,
            "build": build,
            "query": query,
            "search": searches[0],
            "searches": searches,
            "train_defaults": full,
            "manifest": str(args.manifest),
        },
        started,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
