"""Index-build throughput: what saliency weighting costs, and what overlapped decoding buys.

Part 1 (model only, the same pre-decoded, pre-normalised batches for every
variant, torch.no_grad):

* plain      ``model(x)``: backbone + global average pool + classifier (a
             plain classification forward, the floor);
* saliency   ``retrieval.model.embedding.embed_tensor(model, x, "saliency")``: what
             an index build runs per batch (logits, closed-form Grad-CAM of
             the predicted class, weighted pooling, projection, softmax, OOD
             features, copies to numpy);
* uniform    the same with ``"uniform"`` weighting.

Target: saliency images/s ≥ 0.9 × plain.

Part 2 (end to end): ``index.builder.build_index`` on a manifest, with
DataLoader decoding workers (``retrieval.model.dataset.default_workers()``) vs
``num_workers=0`` (decoding in the main process, not overlapped). Reports the
embedding-phase images/s (what ``casebase index build`` prints) and the
whole build's wall time (FAISS, OOD calibration, checksums included).

    .venv/bin/python bench/build_throughput.py            # 512 images x 5 rounds; builds of every case x 2
    .venv/bin/python bench/build_throughput.py --quick    # 128 images, 2 rounds; builds of 128 cases x 1
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from _common import DEFAULT_MANIFEST, DEFAULT_MODEL, finish, interleaved, machine, summary, table


def sub_manifest(manifest_path: str, n: int | None, out: Path) -> Path:
    """The first n train+val rows of a manifest, with absolute paths (the whole manifest if n is None)."""
    import pandas as pd

    from retrieval.data.manifest import load_manifest

    m = load_manifest(manifest_path)
    df = m.select(["train", "val"])
    if n is not None:
        df = df.iloc[:n]
    df = df.copy()
    df["image"] = [str(m.resolve(p)) for p in df["image"]]
    if "mask" in df:
        df["mask"] = [str(m.resolve(p)) if p else "" for p in df["mask"]]
    path = out / "manifest.csv"
    pd.DataFrame(df).to_csv(path, index=False)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--manifest", default=DEFAULT_MANIFEST)
    ap.add_argument(
        "--n", type=int, default=None, help="cases built in part 2 (default: every train+val case)"
    )
    ap.add_argument("--n-model", type=int, default=512, help="pre-decoded images timed in part 1")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5, help="rounds of part 1")
    ap.add_argument("--build-reps", type=int, default=2, help="rounds of part 2 (each variant)")
    ap.add_argument("--quick", action="store_true", help="128 cases, 2 + 1 rounds")
    args = ap.parse_args()
    if args.quick:
        args.n, args.n_model, args.reps, args.build_reps = args.n or 128, 128, 2, 1

    import torch

    from index.builder import build_index
    from retrieval.data.manifest import load_manifest
    from retrieval.model.dataset import decode_all, default_workers
    from retrieval.model.embedding import embed_tensor
    from retrieval.model.network import load_model
    from retrieval.model.preprocess import Preprocessor

    started = time.time()
    info = machine()
    model = load_model(args.model, "cpu")
    pre = Preprocessor(model.config)
    man = load_manifest(args.manifest)
    df = man.select(["train", "val"])
    paths = [str(man.resolve(p)) for p in df["image"]][: args.n_model]
    t0 = time.perf_counter()
    images, ok, _ = decode_all(
        paths, pre, batch_size=args.batch_size, num_workers=0, progress=False
    )
    decode_s = time.perf_counter() - t0
    n = len(ok)
    batches = [pre.normalize(images[i : i + args.batch_size]) for i in range(0, n, args.batch_size)]
    cfg = model.config
    print(
        f"model {args.model}: {cfg.backbone}, {cfg.image_size} px, {cfg.in_channels} channel(s); "
        f"{n} images in {len(batches)} batches of {args.batch_size}; decoding alone "
        f"{n / decode_s:.0f} img/s in one process"
    )

    def plain():
        with torch.no_grad():
            for x in batches:
                model(x)

    def weighted(mode):
        def run():
            for x in batches:
                embed_tensor(model, x, mode)

        return run

    times = interleaved(
        {"plain": plain, "saliency": weighted("saliency"), "uniform": weighted("uniform")},
        reps=args.reps,
        warmup=1,
    )
    part1 = {k: {**summary(v), "images_per_s": n / summary(v)["median"]} for k, v in times.items()}
    base = part1["plain"]["images_per_s"]
    rows = [
        [k, v["images_per_s"], v["median"] * 1000 / n, v["images_per_s"] / base]
        for k, v in part1.items()
    ]
    print()
    table(
        ["variant", "images/s", "ms/image", "vs plain"],
        rows,
        title=f"Part 1: model throughput, {args.reps} interleaved rounds over the same batches (medians)",
    )
    ratio = part1["saliency"]["images_per_s"] / base

    # ---------------------------------------------------------------- part 2
    workers = default_workers()
    tmp = Path(tempfile.mkdtemp(prefix="bench_build_"))
    try:
        manifest = sub_manifest(args.manifest, args.n, tmp)
        results: dict[str, list] = {f"workers={workers}": [], "workers=0": []}

        def build(w):
            def run():
                out = tmp / f"index_w{w}"
                rep = build_index(
                    args.model, manifest, out, progress=False, num_workers=w, device="cpu"
                )
                results[f"workers={w}"].append(rep)
                shutil.rmtree(out, ignore_errors=True)

            return run

        walls = interleaved(
            {f"workers={workers}": build(workers), "workers=0": build(0)},
            reps=args.build_reps,
            warmup=0,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    part2 = {}
    for k, reps in results.items():
        ips = sorted(r.images_per_second for r in reps)
        part2[k] = {
            "embed_images_per_s": ips[len(ips) // 2],
            "embed_images_per_s_all": ips,
            "wall": summary(walls[k]),
            "n_indexed": reps[0].n_indexed,
            "factory": reps[0].factory,
        }
    zero = part2["workers=0"]
    rows = [
        [
            k,
            v["embed_images_per_s"],
            v["wall"]["median"],
            v["embed_images_per_s"] / zero["embed_images_per_s"],
        ]
        for k, v in part2.items()
    ]
    print()
    table(
        ["index build", "images/s (embed phase)", "wall s (whole build)", "vs workers=0"],
        rows,
        title=f"Part 2: end-to-end `index build` of {part2['workers=0']['n_indexed']} cases, {args.build_reps} interleaved rounds (medians)",
    )
    overlap = part2[f"workers={workers}"]["embed_images_per_s"] / zero["embed_images_per_s"]
    verdict = "met" if ratio >= 0.9 else "MISSED"
    print(
        f"\nsaliency / plain = {ratio:.3f} (target >= 0.9: {verdict}); "
        f"workers={workers} / workers=0 = {overlap:.2f}x"
    )
    finish(
        "build_throughput" + ("_quick" if args.quick else ""),
        info,
        {
            "config": {
                "model": args.model,
                "backbone": cfg.backbone,
                "image_size": cfg.image_size,
                "n_images_part1": n,
                "n_cases_part2": part2["workers=0"]["n_indexed"],
                "batch_size": args.batch_size,
                "reps": args.reps,
                "build_reps": args.build_reps,
                "default_workers": workers,
                "decode_images_per_s_one_process": n / decode_s,
            },
            "model_throughput": part1,
            "saliency_vs_plain": ratio,
            "target_saliency_vs_plain": 0.9,
            "target_met": ratio >= 0.9,
            "end_to_end": part2,
            "workers_vs_zero": overlap,
        },
        started,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
