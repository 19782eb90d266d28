"""Exact vs approximate search at scale: recall@10, queries/s, build time, bytes per vector.

Database: clustered synthetic unit vectors (a log-normal-sized mixture of
n/250 Gaussian clusters on the sphere, see ``_common.clustered_unit_vectors``),
128-d by default. Queries: fresh draws from the same mixture (not in the
database). Ground truth: exact inner-product top-10 (``Flat``).

Indexes are built through ``index.vector_index.VectorIndex.build`` (the
product's code: training sample, knobs), then searched with FAISS directly at
several nprobe / efSearch settings. Every setting's timing rounds are
interleaved with every other's. Queries/s at batch 1 (a loop of single
queries, what ``CaseRetriever.query`` does) with FAISS's default OpenMP
threads and with one thread, and at batch 100.

HNSW is built on the first ``--hnsw-n`` vectors (200k by default: an HNSW32
build over 1M on 2 shared cores takes longer than this whole benchmark may)
and compared with an exact Flat over the same subset.

Target: recall@10 ≥ 0.95 at ≥ 10× exact throughput (batch 1).

    .venv/bin/python bench/search_scale.py             # 1M vectors, HNSW at 200k (~10 min on 2 cores)
    .venv/bin/python bench/search_scale.py --quick     # 50k vectors, HNSW at 50k
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np
from _common import clustered_unit_vectors, finish, machine, summary, table


def recall_at(ids: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    return float(
        np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(ids, truth, strict=True)])
    )


def index_bytes(index) -> int:
    import faiss

    return int(faiss.serialize_index(index).nbytes)


def set_knob(vindex, knob: str, value) -> None:
    import faiss

    if knob == "nprobe":
        faiss.try_extract_index_ivf(vindex.index).nprobe = value
    elif knob == "efSearch":
        faiss.downcast_index(vindex.index).hnsw.efSearch = value
    elif knob == "nprobe,k_factor":
        faiss.try_extract_index_ivf(vindex.index).nprobe = value[0]
        faiss.downcast_index(vindex.index).k_factor = value[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--hnsw-n", type=int, default=200_000)
    ap.add_argument("--queries", type=int, default=500, help="queries for recall (batch search)")
    ap.add_argument("--single", type=int, default=100, help="single queries per timing round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--ivf",
        default="1024:4,8,16,32;4096:8,16,32",
        help="IVF-Flat lists:nprobes;... (each lists value is one build)",
    )
    ap.add_argument(
        "--pq",
        default="1024:PQ32:16;1024:PQ32,RFlat:16x4,16x16",
        help="IVF-PQ builds lists:code:settings;... settings are nprobes, or nprobe x k_factor "
        "pairs when the code ends in RFlat (exact re-ranking of k_factor*k candidates)",
    )
    ap.add_argument("--hnsw-ef", default="32,64,128")
    ap.add_argument(
        "--train-compare",
        action="store_true",
        help="also build IVF1024 trained on 256/list (FAISS's own cap) vs the default 64/list",
    )
    ap.add_argument(
        "--name", default="search_scale", help="results file name (bench/results/NAME.json)"
    )
    ap.add_argument("--no-hnsw", action="store_true")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.n, args.hnsw_n, args.queries, args.single, args.rounds = 50_000, 50_000, 200, 30, 2
        args.ivf, args.pq, args.hnsw_ef = (
            "256:4,8,16",
            "256:PQ32:8;256:PQ32,RFlat:8x4,8x16",
            "32,64",
        )

    import faiss

    from index.vector_index import TRAIN_PER_LIST, VectorIndex, auto_factory

    started = time.time()
    info = machine()
    default_threads = faiss.omp_get_max_threads()
    t0 = time.perf_counter()
    data, sample = clustered_unit_vectors(args.n, args.dim, seed=0)
    queries = sample(max(args.queries, 100), 12345)
    gen_s = time.perf_counter() - t0
    print(
        f"{args.n:,} clustered {args.dim}-d unit vectors ({max(16, args.n // 250)} clusters) "
        f"generated in {gen_s:.1f} s; {len(queries)} held-out queries; faiss {faiss.__version__}, "
        f"{default_threads} OpenMP threads"
    )

    # ---------------------------------------------------------------- builds
    builds: dict[str, dict] = {}  # name -> {vindex, n, build_s, bytes, ref}

    def build(name, vectors, spec, ref, **kw):
        gc.collect()
        t = time.perf_counter()
        v = VectorIndex.build(vectors, spec, **kw)
        dt = time.perf_counter() - t
        builds[name] = {
            "vindex": v,
            "n": len(vectors),
            "build_s": dt,
            "factory": spec,
            "ref": ref,
            "bytes_per_vector": index_bytes(v.index) / len(vectors),
        }
        print(
            f"  built {name:<28} {dt:7.1f} s  {builds[name]['bytes_per_vector']:7.1f} B/vector",
            flush=True,
        )

    print("building:")
    build("Flat", data, "Flat", None)
    sub = args.hnsw_n < args.n
    hnsw_data = data[: args.hnsw_n]
    if sub:
        build(f"Flat@{args.hnsw_n // 1000}k", hnsw_data, "Flat", None)
    flat_small = f"Flat@{args.hnsw_n // 1000}k" if sub else "Flat"
    ivf_plan = []
    for part in filter(None, args.ivf.split(";")):
        lists, probes = part.split(":")
        name = f"IVF{lists},Flat"
        build(name, data, name, "Flat")
        ivf_plan.append((name, "nprobe", [int(p) for p in probes.split(",")]))
    if args.train_compare:
        name = "IVF1024,Flat"
        build(name + " (train 256/list)", data, name, "Flat", train_per_list=256)
        ivf_plan.append(
            (name + " (train 256/list)", "nprobe", ivf_plan[0][2] if ivf_plan else [16])
        )
    for part in filter(None, args.pq.split(";")):
        lists, code, probes = part.split(":")
        name = f"IVF{lists},{code}"
        build(name, data, name, "Flat")
        if code.endswith("RFlat"):
            pairs = [tuple(int(x) for x in p.split("x")) for p in probes.split(",")]
            ivf_plan.append((name, "nprobe,k_factor", pairs))
        else:
            ivf_plan.append((name, "nprobe", [int(p) for p in probes.split(",")]))
    if not args.no_hnsw:
        hnsw_name = "HNSW32" + (f"@{args.hnsw_n // 1000}k" if sub else "")
        build(hnsw_name, hnsw_data, "HNSW32", flat_small)
        ivf_plan.append((hnsw_name, "efSearch", [int(e) for e in args.hnsw_ef.split(",")]))

    # ---------------------------------------------------------------- recall
    truth = {}
    for name in {"Flat", flat_small}:
        truth[name] = builds[name]["vindex"].index.search(queries[: args.queries], 10)[1]
    settings = [("Flat", None, None)] + ([(flat_small, None, None)] if sub else [])
    settings += [(name, knob, v) for name, knob, vals in ivf_plan for v in vals]
    recall = {}
    for name, knob, val in settings:
        b = builds[name]
        ref = b["ref"] or name
        if knob:
            set_knob(b["vindex"], knob, val)
        ids = b["vindex"].index.search(queries[: args.queries], 10)[1]
        recall[(name, val)] = recall_at(ids, truth[ref])

    # ---------------------------------------------------------------- speed
    single = queries[: args.single]
    batch = queries[:100]
    t1: dict = {s: [] for s in settings}
    t1_one: dict = {s: [] for s in settings}
    t100: dict = {s: [] for s in settings}
    for r in range(args.rounds):
        order = settings[r % len(settings) :] + settings[: r % len(settings)]
        for s in order if r % 2 == 0 else order[::-1]:
            name, knob, val = s
            v = builds[name]["vindex"]
            if knob:
                set_knob(v, knob, val)
            for threads, store in ((default_threads, t1), (1, t1_one)):
                faiss.omp_set_num_threads(threads)
                v.index.search(single[:2], 10)  # warm
                t = time.perf_counter()
                for q in single:
                    v.index.search(q[None], 10)
                store[s].append((time.perf_counter() - t) / len(single))
            faiss.omp_set_num_threads(default_threads)
            t = time.perf_counter()
            v.index.search(batch, 10)
            t100[s].append((time.perf_counter() - t) / len(batch))
    faiss.omp_set_num_threads(default_threads)

    rows, out = [], []
    for s in settings:
        name, knob, val = s
        b = builds[name]
        ref = b["ref"] or name
        ref_s = (ref, None, None)
        q1 = 1 / summary(t1[s])["median"]
        q1o = 1 / summary(t1_one[s])["median"]
        q100 = 1 / summary(t100[s])["median"]
        x1 = q1 / (1 / summary(t1[ref_s])["median"])
        x1o = q1o / (1 / summary(t1_one[ref_s])["median"])
        x100 = q100 / (1 / summary(t100[ref_s])["median"])
        rec = recall[(name, val)]
        meets = rec >= 0.95 and max(x1, x1o) >= 10
        if knob == "nprobe,k_factor":
            label = f"{name} nprobe={val[0]} k_factor={val[1]}"
        else:
            label = name + (f" {knob}={val}" if knob else "")
        rows.append(
            [
                label,
                b["n"],
                rec,
                q1,
                q1o,
                q100,
                x1,
                x1o,
                x100,
                b["build_s"],
                b["bytes_per_vector"],
                "yes" if meets else ("-" if not knob else "no"),
            ]
        )
        out.append(
            {
                "index": name,
                "knob": knob,
                "value": val,
                "n": b["n"],
                "recall_at_10": rec,
                "qps_batch1": q1,
                "qps_batch1_1thread": q1o,
                "qps_batch100": q100,
                "speedup_vs_exact_batch1": x1,
                "speedup_vs_exact_batch1_1thread": x1o,
                "speedup_vs_exact_batch100": x100,
                "exact_reference": ref,
                "build_s": b["build_s"],
                "bytes_per_vector": b["bytes_per_vector"],
                "meets_target": meets,
                "ms_per_query_batch1": 1000 / q1,
                "ms_per_query_batch1_1thread": 1000 / q1o,
            }
        )
    print()
    table(
        [
            "index / setting",
            "n",
            "recall@10",
            f"q/s b1 ({default_threads}thr)",
            "q/s b1 (1thr)",
            "q/s b100",
            f"x exact b1 ({default_threads}thr)",
            "x exact b1 (1thr)",
            "x exact b100",
            "build s",
            "B/vec",
            "target",
        ],
        rows,
        title=f"Search at scale ({args.rounds} interleaved rounds; medians; speedups against the exact "
        "Flat over the same vectors)",
    )
    rule = {
        n: auto_factory(n, args.dim)
        for n in (10_000, 50_000, 100_000, 200_000, 1_000_000, 5_000_000)
    }
    print("\nauto_factory now: " + ", ".join(f"{n:,} -> {f}" for n, f in rule.items()))
    print(f"IVF training sample: {TRAIN_PER_LIST} vectors per list (VectorIndex.build default)")
    finish(
        args.name + ("_quick" if args.quick else ""),
        info,
        {
            "config": {
                "n": args.n,
                "dim": args.dim,
                "hnsw_n": args.hnsw_n,
                "queries_recall": args.queries,
                "single_queries_per_round": args.single,
                "rounds": args.rounds,
                "clusters": max(16, args.n // 250),
                "generation_s": gen_s,
                "omp_threads_default": default_threads,
                "train_per_list": TRAIN_PER_LIST,
            },
            "results": out,
            "auto_factory": rule,
            "target": "recall@10 >= 0.95 at >= 10x exact throughput (batch 1)",
        },
        started,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
