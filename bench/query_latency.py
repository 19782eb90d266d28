"""`CaseRetriever.query` latency at 10k, 100k and 1M indexed vectors, and peak memory.

For each size a child process builds a retriever around the real bundle's
model (``--index``, default the 1,020-case phantom bundle): the index holds
the bundle's real vectors plus clustered synthetic unit vectors of the
model's dimension up to the size (``_common.clustered_unit_vectors``), built
with ``--factory`` (default ``auto``, i.e. ``index.vector_index.auto_factory``);
the case table repeats the real cases cyclically, so every row points at a
real phantom image and matched regions work; the OOD reference is the real
one tiled to min(size, 20,000) rows, as a build of that size would store.
Queries are real held-out images (the manifest's test split), read from disk
each time, as ``casebase query`` does.

Per query image the variants run back to back, order rotated:

* ``retrieval``            ``query(img, k, regions=False)``: read, preprocess,
                           one forward, search, OOD score, k-NN vote, text;
* ``regions``              ``query(img, k)``: plus matched regions (reads and
                           encodes the k neighbour images, decomposes k pairs);
* ``gradcam+similarity``   ``query(img, k, explain=("gradcam", "similarity"))``.

Targets (2 cores): p50 ≤ 30 ms at 100k (retrieval); gradcam+similarity ≤ 150 ms.
Peak RSS is the child's VmHWM (one process per size, so sizes do not mix).

    .venv/bin/python bench/query_latency.py                   # 10k, 100k, 1M; 40 queries per variant, torch 1 and 2 threads
    .venv/bin/python bench/query_latency.py --quick           # 5k, 20k; 8 queries
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    DEFAULT_INDEX,
    DEFAULT_MANIFEST,
    clustered_unit_vectors,
    finish,
    machine,
    peak_rss_mb,
    percentile,
    rss_mb,
    table,
)

VARIANTS = {
    "retrieval": {"regions": False},
    "regions": {"regions": True},
    "gradcam+similarity": {"explain": ("gradcam", "similarity")},
}
CACHE = Path(tempfile.gettempdir()) / "casebase-bench-cache"


def make_retriever(index_dir: Path, size: int, factory: str, seed: int = 0):
    """A CaseRetriever over the real bundle's vectors + synthetic ones up to `size`."""
    import numpy as np
    import pandas as pd
    import torch

    from index import bundle
    from index.case_store import image_root, read_cases
    from index.vector_index import VectorIndex, auto_factory
    from retrieval.model.network import load_model
    from retrieval.service.ood import OOD_REFERENCE
    from retrieval.service.retriever import CaseRetriever

    meta = bundle.verify(index_dir)
    model = load_model(index_dir / "model", "cpu")
    real_cases = read_cases(index_dir / "cases.parquet", image_root(meta))
    real = VectorIndex.load(index_dir / "vectors.faiss", meta["faiss"]["factory"]).reconstruct_all()
    n_real, d = real.shape
    spec = auto_factory(size, d) if factory == "auto" else factory
    t0 = time.perf_counter()
    built = True
    if size <= n_real:
        vindex = VectorIndex.build(real[:size], spec)
    else:
        CACHE.mkdir(exist_ok=True)
        key = f"{index_dir.resolve().as_posix().replace('/', '_')}_{size}_{spec.replace(',', '_')}_{seed}"
        cached = CACHE / f"{key}.faiss"
        if cached.is_file() and not spec.startswith("OnDisk:"):
            vindex = VectorIndex.load(cached, spec)
            built = False
        else:
            synth, _ = clustered_unit_vectors(size - n_real, d, seed=seed)
            vindex = VectorIndex.build(np.concatenate([real, synth]), spec)
            del synth
            if not spec.startswith("OnDisk:"):
                vindex.save(cached)
    build_s = time.perf_counter() - t0
    rows = np.arange(size) % n_real
    cases = real_cases.iloc[rows].reset_index(drop=True)
    rep = pd.Series(rows // n_real if size > n_real else np.zeros(size, int)).astype(str)
    cases["case_id"] = (cases["case_id"] + "#" + rep).where(rep != "0", cases["case_id"])
    meta = dict(meta)
    meta["faiss"] = {"factory": spec, "requested": factory, "ntotal": vindex.ntotal}
    r = CaseRetriever(index_dir, meta, model, cases, vindex, torch.device("cpu"))
    ref = np.load(index_dir / OOD_REFERENCE, allow_pickle=False)
    r.ood_reference = ref[np.arange(min(size, 20_000)) % len(ref)]
    return r, spec, build_s, built


def child(args) -> dict:
    import numpy as np

    from retrieval.data.manifest import load_manifest

    size = args.child
    r, spec, build_s, built = make_retriever(Path(args.index), size, args.factory)
    rss_ready = rss_mb()
    man = load_manifest(args.manifest)
    test = man.select(["test"])
    if test.empty:
        test = man.select(["val"])
    images = [str(man.resolve(p)) for p in test["image"]][: args.queries]
    import torch

    default_threads = torch.get_num_threads()
    threads = [default_threads if t == "default" else int(t) for t in args.threads.split(",")]
    names = [f"{v}@{t}thr" for t in threads for v in VARIANTS]

    def run(name, img):
        v, t = name.rsplit("@", 1)
        torch.set_num_threads(int(t[:-3]))
        return r.query(img, k=args.k, **VARIANTS[v])

    for name in names:  # warm-up: first-call costs (captum import, allocator) are not latency
        for img in images[:2]:
            run(name, img)
    times = {v: [] for v in names}
    parts = {v: {} for v in names}
    top_real = 0
    for i in range(args.rounds * len(images)):
        img = images[i % len(images)]
        order = names[i % len(names) :] + names[: i % len(names)]
        for v in order:
            t0 = time.perf_counter()
            res = run(v, img)
            times[v].append(time.perf_counter() - t0)
            for key, val in res.timings.items():
                parts[v].setdefault(key, []).append(val)
            if v.startswith("retrieval@"):
                top_real += all("#" not in nb.case_id for nb in res.neighbors)
    torch.set_num_threads(default_threads)
    out = {
        "size": size,
        "factory": spec,
        "index_build_s": build_s,
        "index_built_now": built,
        "rss_ready_mb": rss_ready,
        "peak_rss_mb": peak_rss_mb(),
        "n_queries": len(times[names[0]]),
        "torch_threads": threads,
        "torch_threads_default": default_threads,
        "neighbors_all_real_fraction": top_real / (len(times[names[0]]) * len(threads)),
        "variants": {},
    }
    for v in names:
        ms = [t * 1000 for t in times[v]]
        out["variants"][v] = {
            "p50_ms": percentile(ms, 50),
            "p95_ms": percentile(ms, 95),
            "mean_ms": float(np.mean(ms)),
            "parts_p50_ms": {
                k: percentile([x * 1000 for x in xs], 50) for k, xs in parts[v].items()
            },
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", default=DEFAULT_INDEX)
    ap.add_argument("--manifest", default=DEFAULT_MANIFEST)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--factory", default="auto")
    ap.add_argument("-k", type=int, default=5, help="neighbours (casebase query's default: 5)")
    ap.add_argument("--queries", type=int, default=40, help="distinct query images")
    ap.add_argument("--rounds", type=int, default=1, help="passes over the query images")
    ap.add_argument(
        "--threads",
        default="1,default",
        help="torch intra-op thread counts to compare, e.g. 1,2 ('default': torch's own)",
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        Path(args.child_out).write_text(json.dumps(child(args)))
        return 0
    if args.quick:
        args.sizes, args.queries = "5000,20000", 8

    started = time.time()
    info = machine()
    results = []
    for size in [int(s) for s in args.sizes.split(",")]:
        with tempfile.NamedTemporaryFile(suffix=".json") as fh:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                str(size),
                "--child-out",
                fh.name,
                "--index",
                args.index,
                "--manifest",
                args.manifest,
                "--factory",
                args.factory,
                "-k",
                str(args.k),
                "--queries",
                str(args.queries),
                "--rounds",
                str(args.rounds),
                "--threads",
                args.threads,
            ]
            t0 = time.time()
            subprocess.run(cmd, check=True)
            res = json.loads(Path(fh.name).read_text())
            res["child_wall_s"] = time.time() - t0
        results.append(res)
        print(
            f"  {size:>9,}: {res['factory']}, index ready in {res['index_build_s']:.1f} s "
            f"({'built' if res['index_built_now'] else 'cached'}), peak RSS {res['peak_rss_mb']:.0f} MB, "
            f"{time.time() - t0:.0f} s",
            flush=True,
        )
    rows = []
    for res in results:
        for v, s in res["variants"].items():
            p = s["parts_p50_ms"]
            rows.append(
                [
                    f"{res['size']:,}",
                    res["factory"],
                    *v.split("@"),
                    s["p50_ms"],
                    s["p95_ms"],
                    p.get("encode", 0.0),
                    p.get("search", 0.0),
                    p.get("regions", float("nan")),
                    p.get("explain", float("nan")),
                    res["peak_rss_mb"],
                ]
            )
    print()
    table(
        [
            "vectors",
            "factory",
            "variant",
            "torch threads",
            "p50 ms",
            "p95 ms",
            "encode p50",
            "search p50",
            "regions p50",
            "explain p50",
            "peak RSS MB",
        ],
        rows,
        title=f"CaseRetriever.query, k={args.k}, {results[0]['n_queries']} queries per variant, interleaved",
    )
    verdicts = {}
    for res in results:
        if res["size"] != 100_000:
            continue
        for name, s in res["variants"].items():
            v, t = name.split("@")
            limit = {"retrieval": 30, "gradcam+similarity": 150}.get(v)
            if limit is None:  # "regions" has no target of its own
                continue
            verdicts[f"{v} p50 <= {limit} ms at 100k ({t})"] = s["p50_ms"] <= limit
    if verdicts:
        print(
            "\ntargets at 100k: "
            + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in verdicts.items())
        )
    finish(
        "query_latency" + ("_quick" if args.quick else ""),
        info,
        {
            "config": {
                "index": args.index,
                "k": args.k,
                "queries": args.queries,
                "rounds": args.rounds,
                "factory": args.factory,
                "variants": {
                    k: {kk: list(vv) if isinstance(vv, tuple) else vv for kk, vv in v.items()}
                    for k, v in VARIANTS.items()
                },
            },
            "results": results,
            "targets": {"retrieval_p50_ms_at_100k": 30, "gradcam_similarity_p50_ms_at_100k": 150},
            "verdicts": verdicts,
        },
        started,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
