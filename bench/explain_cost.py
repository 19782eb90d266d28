"""Cost of each explanation method for one query with 5 neighbours, at 224 px.

``CaseRetriever.query(img, k=5, explain=(m,))`` for each of the seventeen
methods (DESIGN.md's names, grouped by family), interleaved round-robin over a few real held-out query images;
reported: the method's own time (``result.timings["explain"]``, the query's
encode/search/regions excluded), the whole query's time, how many image
forwards the method ran (``CaseNet.run`` calls counted, rows summed; with
gradient = forward + backward), how many neighbour pairs it explained and its
sample counts (from the registry's explainer objects).

The index is a 224-px bundle (``--index``; built from ``--model`` over the
manifest's train+val cases into a temporary folder if it does not exist).

    .venv/bin/python bench/explain_cost.py              # 3 rounds over 3 query images
    .venv/bin/python bench/explain_cost.py --quick      # 1 round, 1 image
    .venv/bin/python bench/explain_cost.py --random-init --manifest M   # no trained model needed

Cost does not depend on what the weights learnt, so ``--random-init`` measures
a seeded random-init 224-px compact model indexed over ``--manifest``'s first
``--index-cases`` cases (built in a temporary folder).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _common import DEFAULT_MANIFEST, finish, machine, table


class RunCounter:
    """Counts images through CaseNet.run (any instance, fused copies included)."""

    def __init__(self):
        import torch

        from retrieval.model.network import CaseNet

        self.cls, self.orig = CaseNet, CaseNet.run
        self.images = self.with_grad = self.calls = 0
        counter = self

        def run(model_self, x, *a, **kw):
            counter.calls += 1
            counter.images += int(x.shape[0])
            if torch.is_grad_enabled():
                counter.with_grad += int(x.shape[0])
            return counter.orig(model_self, x, *a, **kw)

        CaseNet.run = run

    def reset(self):
        self.images = self.with_grad = self.calls = 0

    def close(self):
        self.cls.run = self.orig


def sample_counts(name: str, image_size: int) -> str:
    from retrieval.explain import registry

    e = registry.get(name)
    bits = []
    for attr in ("samples", "steps", "segments", "noise"):
        if hasattr(e, attr):
            bits.append(f"{attr}={getattr(e, attr)}")
    if name == "occlusion":
        win, stride = registry.occlusion_window(
            image_size, getattr(e, "fraction", registry.OCCLUSION_WINDOW)
        )
        pos = -(-(image_size - win) // stride) + 1  # captum adds a last window flush with the edge
        bits.append(f"window={win}px stride={stride}px ({pos}x{pos} positions)")
    return ", ".join(bits) or "-"


def per_map_seconds(r, image: str, methods: list[str], rounds: int) -> dict:
    """Median seconds of one map per method: the query's predicted class, and the similarity
    to one neighbour (the registry's attribute() alone, no query around it)."""
    import torch

    from retrieval.explain import registry
    from retrieval.explain.registry import ScoreTarget

    model, w = r.model, r.weighting
    x = r.preprocess(image)
    x = x[None] if x.dim() == 3 else x
    with torch.no_grad():
        cls = int(model(x).argmax(1)[0])
        e_other = model.run(x.flip(-1), w).embedding  # a stand-in neighbour: the mirrored image
    out = {}
    for m in methods:
        e = registry.get(m)
        cls_t = ScoreTarget.for_classes([cls], model.config.output_dim, w, device=x.device)
        sim_t = ScoreTarget.for_similarity(e_other, w)
        e.attribute(model, x, cls_t)  # warm-up
        times = {"class": [], "similarity": []}
        for _ in range(rounds):
            for kind, t in (("class", cls_t), ("similarity", sim_t)):
                t0 = time.perf_counter()
                e.attribute(model, x, t)
                times[kind].append(time.perf_counter() - t0)
        out[m] = {k: statistics.median(v) for k, v in times.items()}
    return out


def _random_init_index(manifest: str, n_cases: int) -> Path:
    """A seeded random-init compact model at 224 px, indexed over the manifest's first cases."""
    import pandas as pd
    import torch

    from index.builder import build_index
    from retrieval.data.manifest import load_manifest
    from retrieval.model.network import CaseNet, ModelConfig, save_model

    man = load_manifest(manifest)
    df = man.select(["train", "val", "test"])
    keep = pd.concat([df[df["split"] != "test"].head(n_cases), df[df["split"] == "test"].head(5)])
    root = Path(tempfile.mkdtemp(prefix="bench_explain_rand_"))
    small = root / "manifest.csv"
    keep = keep.copy()
    for col in ("image", "mask"):
        if col in keep:
            keep[col] = [str(man.resolve(p)) if p else "" for p in keep[col]]
    keep.to_csv(small, index=False)
    classes = sorted(df["label"].unique())
    torch.manual_seed(0)
    channels = 3 if str(keep["image"].iloc[0]).lower().endswith((".png", ".jpg")) else 1
    cfg = ModelConfig(
        classes=classes,
        image_size=224,
        in_channels=channels,
        mean=[0.5] * channels,
        std=[0.25] * channels,
    )
    save_model(CaseNet(cfg).eval(), root / "model")
    build_index(root / "model", small, root / "index", progress=False, num_workers=0)
    return root / "index"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", default="/tmp/i224")
    ap.add_argument(
        "--model", default="/tmp/m224", help="224-px model (to build --index if missing)"
    )
    ap.add_argument("--manifest", default=DEFAULT_MANIFEST)
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--images", type=int, default=3, help="distinct query images")
    ap.add_argument("--rounds", type=int, default=1, help="passes over the query images")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--random-init", action="store_true", help="a random-init 224-px model (cost only)"
    )
    ap.add_argument("--index-cases", type=int, default=60)
    ap.add_argument("--methods", default=None, help="comma-separated subset")
    args = ap.parse_args()
    if args.quick:
        args.images, args.rounds = 1, 1

    from retrieval.data.manifest import load_manifest
    from retrieval.explain import registry
    from retrieval.explain.methods import family_of
    from retrieval.explain.pipeline import EXPENSIVE_NEIGHBORS
    from retrieval.service.retriever import CaseRetriever

    started = time.time()
    info = machine()
    index = Path(args.index)
    if args.random_init:
        index = _random_init_index(args.manifest, args.index_cases)
    elif not (index / "bundle.json").is_file():
        from index.builder import build_index

        index = Path(tempfile.mkdtemp(prefix="bench_explain_")) / "index"
        print(f"{args.index} missing: building a bundle from {args.model} into {index}")
        build_index(args.model, args.manifest, index, progress=False)
    r = CaseRetriever.load(index, device="cpu")
    size = r.model.config.image_size
    man = load_manifest(args.manifest)
    images = [str(man.resolve(p)) for p in man.select(["test"])["image"]][: args.images]
    methods = args.methods.split(",") if args.methods else list(registry.METHODS)
    registry.check_names(methods)
    print(
        f"index {index}: {r.index.ntotal} cases, {r.model.config.backbone} at {size} px; "
        f"k={args.k}; methods: {', '.join(methods)}"
    )

    for m in methods:  # warm-up (imports, fused-model cache, allocator)
        r.query(images[0], k=args.k, explain=(m,))
    counter = RunCounter()
    explain_s = {m: [] for m in methods}
    total_s = {m: [] for m in methods}
    forwards = {}
    try:
        step = 0
        for _ in range(args.rounds):
            for img in images:
                order = methods[step % len(methods) :] + methods[: step % len(methods)]
                step += 1
                for m in order:
                    counter.reset()
                    t0 = time.perf_counter()
                    res = r.query(img, k=args.k, explain=(m,))
                    total_s[m].append(time.perf_counter() - t0)
                    explain_s[m].append(res.timings.get("explain", float("nan")))
                    # the query itself runs 1 + k images (encode + neighbour regions), no gradient
                    forwards[m] = (counter.images - 1 - len(res.neighbors), counter.with_grad)
    finally:
        counter.close()
    print("per map (class and similarity targets) ...")
    per_map = per_map_seconds(r, images[0], methods, max(3, args.rounds))
    rows, out = [], {}
    for m in methods:
        e = registry.get(m)
        pairs = min(args.k, EXPENSIVE_NEIGHBORS) if e.expensive else args.k
        med_e, med_t = statistics.median(explain_s[m]), statistics.median(total_s[m])
        fw, fw_grad = forwards[m]
        counts = sample_counts(m, size)
        pm = per_map[m]
        rows.append([m, pm["class"], pm["similarity"], med_e, med_t, pairs, fw, fw_grad, counts])
        out[m] = {
            "family": family_of(m),
            "class_map_s": pm["class"],
            "similarity_map_s": pm["similarity"],
            "explain_s_median": med_e,
            "query_total_s_median": med_t,
            "explain_s_all": explain_s[m],
            "neighbor_pairs_explained": pairs,
            "expensive": e.expensive,
            "image_forwards": fw,
            "image_forwards_with_gradient": fw_grad,
            "sample_counts": counts,
        }
    print()
    table(
        [
            "method",
            "class map s",
            "sim map s",
            "explain s",
            "query total s",
            "pairs",
            "image fwd",
            "of which w/ grad",
            "sample counts",
        ],
        rows,
        title=f"Explanation cost at {size} px, k={args.k}, median of {len(explain_s[methods[0]])} "
        "queries, methods interleaved",
    )
    all_s = sum(v["explain_s_median"] for v in out.values())
    print(f"\nall {len(out)} methods together (sum of medians): {all_s:.1f} s")
    finish(
        "explain_cost" + ("_quick" if args.quick else ""),
        info,
        {
            "config": {
                "index": str(index),
                "image_size": size,
                "backbone": r.model.config.backbone,
                "k": args.k,
                "images": args.images,
                "rounds": args.rounds,
                "expensive_neighbors": EXPENSIVE_NEIGHBORS,
                "random_init": args.random_init,
            },
            "methods": out,
            "all_methods_explain_s": all_s,
        },
        started,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
