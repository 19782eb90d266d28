"""Refine by region / example (issue 18): latency, region search at scale, lesion boxes on phantoms.

Parts (``--parts``, each merged into bench/results/refine.json, so parts can run at different
times on a shared machine):

* ``latency`` (needs ``--index``, ``--manifest``): in one process, interleaved rounds over >= 20
  query images: a full query (matched regions from the bundle's stored cells), the same query
  with ``regions=False`` (retrieval only), matched regions the old way (re-encoding every
  neighbour's image), and a bare forward pass of the model on the preprocessed image.
  Targets: regions <= 1.5x no regions; retrieval only <= 3x the bare forward pass.
* ``phantom`` (``--index``, ``--manifest``, repeatable pairs via ``--label``): for every test
  case of the manifest, a box around its lesion (the mask's bounding box, 4 px margin) and the
  whole image: same-label P@5, the share of neighbours on the query's site (``site`` column), and
  for the lesion box: how often the neighbour's top matched region lies on that neighbour's own
  lesion (case box ∩ mask), and how often the top region of the *unrestricted* decomposition
  (whole-image similarity) starts inside the box. (The served matched regions of a region query
  lie in the box by construction: reported, not a finding.)
* ``boxcells`` (``--index``, ``--manifest``, ``--label``): no model run; how many feature cells
  each test lesion box covers and how often one is widened to a cell (region search is as fine
  as the model's feature grid).
* ``scale`` (``--cases 100000 ...``): synthetic cells (``_common.clustered_unit_vectors``,
  64 cells per case, D = 128), written and searched through ``index.region_index`` (the
  product's code: float16 cells.npy, auto factory), recall@10 of the top cases against exact
  MaxSim over all cells, p50 per region query (4 query cells, one thread), memory.

    nice -n 5 .venv/bin/python bench/refine.py --parts latency,phantom \\
        --index /work/artifacts/h8/i_ph --manifest /work/artifacts/h8/ph/manifest.csv --label xray
    nice -n 5 .venv/bin/python bench/refine.py --parts scale --cases 100000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
from _common import RESULTS, clustered_unit_vectors, finish, interleaved, machine, summary, table
from tqdm import tqdm

NAME = "refine"


def _load_existing() -> dict:
    path = RESULTS / f"{NAME}.json"
    if path.is_file():
        doc = json.loads(path.read_text())
        return {k: v for k, v in doc.items() if k not in ("benchmark", "date", "machine")}
    return {}


def _test_rows(manifest: Path, n: int | None = None):
    import pandas as pd

    df = pd.read_csv(manifest, dtype=str).fillna("")
    df = df[df["split"] == "test"].reset_index(drop=True)
    return df if n is None else df.iloc[:n]


def _mask_box(mask_path: Path, pad: int = 4):
    from retrieval.data.imageio import read_image

    m = np.asarray(read_image(mask_path).pixels)
    m = (m.max(axis=-1) if m.ndim == 3 else m) > 0
    if not m.any():
        return None, m
    ys, xs = np.nonzero(m)
    h, w = m.shape
    return (
        max(0, int(xs.min()) - pad),
        max(0, int(ys.min()) - pad),
        min(w, int(xs.max()) + 1 + pad),
        min(h, int(ys.max()) + 1 + pad),
    ), m


# --------------------------------------------------------------------------- latency
def part_latency(index: Path, manifest: Path, n_queries: int, reps: int) -> dict:
    import torch

    from retrieval import CaseRetriever

    torch.set_num_threads(1)
    r = CaseRetriever.load(index, device="cpu")
    rows = _test_rows(manifest, n_queries)
    root = manifest.parent
    images = [root / p for p in rows["image"]]
    tensors = [r.preprocess(p) for p in images]
    region_index = r.region_index

    def over_all(fn):
        def run():
            for i, p in enumerate(images):
                fn(i, p)

        return run

    def reencode(i, p):
        r.region_index = None
        try:
            r.query(p, k=5)
        finally:
            r.region_index = region_index

    fns = {
        "regions_stored": over_all(lambda i, p: r.query(p, k=5)),
        "no_regions": over_all(lambda i, p: r.query(p, k=5, regions=False)),
        "regions_reencoded": over_all(reencode),
        "bare_forward": over_all(
            lambda i, p: r.model.run(tensors[i][None].to(r.device), r.weighting)
        ),
    }
    with torch.no_grad():
        per_round = interleaved(fns, reps=reps, warmup=1)
    per_query = {k: [t / len(images) for t in v] for k, v in per_round.items()}
    # per-query medians too (>= 20 queries, each timed alone, interleaved)
    single: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for i, p in enumerate(images):
            one = {
                "regions_stored": lambda p=p: r.query(p, k=5),
                "no_regions": lambda p=p: r.query(p, k=5, regions=False),
                "regions_reencoded": lambda i=i, p=p: reencode(i, p),
                "bare_forward": lambda i=i: r.model.run(tensors[i][None], r.weighting),
            }
            for k, v in interleaved(one, reps=3, warmup=1).items():
                single[k].append(statistics.median(v))
    med = {k: statistics.median(v) for k, v in single.items()}
    out = {
        "index": str(index),
        "n_cases": len(r.cases),
        "n_queries": len(images),
        "k": 5,
        "torch_threads": 1,
        "per_query_median_s": med,
        "per_query_rounds": {k: summary(v) for k, v in per_query.items()},
        "ratio_regions_vs_no_regions": med["regions_stored"] / med["no_regions"],
        "ratio_reencoded_vs_no_regions": med["regions_reencoded"] / med["no_regions"],
        "ratio_no_regions_vs_bare_forward": med["no_regions"] / med["bare_forward"],
        "targets": {"regions_vs_no_regions": 1.5, "no_regions_vs_bare_forward": 3.0},
        "loadavg": list(os.getloadavg()),
    }
    table(
        ["variant", "median ms/query"],
        [[k, 1000 * v] for k, v in med.items()],
        title=f"query latency ({len(images)} queries, k=5, 1 thread)",
    )
    print(
        f"regions/no-regions {out['ratio_regions_vs_no_regions']:.2f}x (re-encoding: "
        f"{out['ratio_reencoded_vs_no_regions']:.2f}x); no-regions/bare forward "
        f"{out['ratio_no_regions_vs_bare_forward']:.2f}x"
    )
    return out


# --------------------------------------------------------------------------- phantom
def part_phantom(index: Path, manifest: Path, k: int = 5) -> dict:
    from retrieval import CaseRetriever
    from retrieval.data.imageio import read_image
    from retrieval.explain.similarity import region_pairs
    from retrieval.service import refine

    r = CaseRetriever.load(index, device="cpu")
    rows = _test_rows(manifest)
    root = manifest.parent
    has_site = "site" in rows.columns and "site" in r.cases.columns
    stats = {v: {"p_at_5": [], "site_share": []} for v in ("lesion_box", "whole_image", "full_box")}
    case_on_lesion, unrestricted_in_box, served_in_box, n_pairs = [], [], [], 0
    masks_cache: dict[int, np.ndarray] = {}

    def case_mask(row: int):
        if row not in masks_cache:
            p = r.cases.at[row, "mask"]
            m = np.asarray(read_image(p).pixels) if p else None
            masks_cache[row] = None if m is None else ((m.max(-1) if m.ndim == 3 else m) > 0)
        return masks_cache[row]

    skipped = 0
    for _, rec in rows.iterrows():
        if not rec.get("mask"):
            skipped += 1
            continue
        box, _ = _mask_box(root / rec["mask"])
        if box is None:  # e.g. a normal case without a lesion
            skipped += 1
            continue
        img = root / rec["image"]
        h, w = read_image(img).original_size
        variants = {
            "lesion_box": r.query(img, k=k, region=box, exclude_patient=rec["patient_id"]),
            "whole_image": r.query(img, k=k, regions=False, exclude_patient=rec["patient_id"]),
            "full_box": r.query(
                img, k=k, region=(0, 0, w, h), regions=False, exclude_patient=rec["patient_id"]
            ),
        }
        for name, res in variants.items():
            labels = [n.label for n in res.neighbors]
            stats[name]["p_at_5"].append(np.mean([lab == rec["label"] for lab in labels]))
            if has_site:
                stats[name]["site_share"].append(
                    np.mean([n.attributes.get("site") == rec["site"] for n in res.neighbors])
                )
        res = variants["lesion_box"]
        q = r.encode(img)
        qz, qw = r.query_cells(q)
        for nb in res.neighbors:
            n_pairs += 1
            if nb.matched_regions:
                top = nb.matched_regions[0]
                x0, y0, x1, y1 = top.query_box
                served_in_box.append(
                    box[0] <= x0 and box[1] <= y0 and x1 <= box[2] and y1 <= box[3]
                )
                m = case_mask(nb.row)
                if m is not None:
                    cx0, cy0, cx1, cy1 = top.case_box
                    case_on_lesion.append(bool(m[cy0:cy1, cx0:cx1].any()))
            cz, cw = r.region_index.case(nb.row)
            dec = refine.stored_decomposition(
                qz, qw, cz, cw, nb.similarity, q.grid, r.region_index.grid
            )
            pairs = region_pairs(dec, 1)
            if pairs:
                cells = pairs[0].query_cells
                ys, xs = np.nonzero(cells)
                # centre of the unrestricted top region, in original pixels
                g = q.geometry
                a = g.cell_box(int(ys.min()), int(xs.min()), q.grid)
                b = g.cell_box(int(ys.max()), int(xs.max()), q.grid)
                cx, cy = (a[0] + b[2]) / 2, (a[1] + b[3]) / 2
                unrestricted_in_box.append(box[0] <= cx <= box[2] and box[1] <= cy <= box[3])

    def mean(xs):
        return float(np.mean(xs)) if xs else float("nan")

    out = {
        "index": str(index),
        "manifest": str(manifest),
        "n_cases_indexed": len(r.cases),
        "n_queries": len(stats["lesion_box"]["p_at_5"]),
        "skipped_no_lesion": skipped,
        "k": k,
        "box": "lesion mask bounding box + 4 px",
        "precision_at_5": {v: mean(s["p_at_5"]) for v, s in stats.items()},
        "site_share_at_5": {v: mean(s["site_share"]) for v, s in stats.items()}
        if has_site
        else None,
        "pairs": n_pairs,
        "top_region_query_box_in_box_served": mean(served_in_box),
        "top_region_case_box_on_case_lesion": mean(case_on_lesion),
        "unrestricted_top_region_centre_in_box": mean(unrestricted_in_box),
        "targets": {"precision_at_5_lesion_box": 0.8, "top_region_in_box": 0.9},
    }
    table(
        ["variant", "P@5", "site share@5"],
        [
            [v, out["precision_at_5"][v], (out["site_share_at_5"] or {}).get(v, float("nan"))]
            for v in stats
        ],
        title=f"{manifest.parent.name}: {out['n_queries']} test queries, k={k}",
    )
    print(
        f"top matched region: served query box in the lesion box {out['top_region_query_box_in_box_served']:.3f} "
        f"(by construction); case box on the neighbour's lesion {out['top_region_case_box_on_case_lesion']:.3f}; "
        f"unrestricted top region centred in the box {out['unrestricted_top_region_centre_in_box']:.3f}"
    )
    return out


# --------------------------------------------------------------------------- box cells
def part_box_cells(index: Path, manifest: Path) -> dict:
    """How many feature cells each test lesion box covers (no model run): region search can
    only be as fine as the model's feature grid, and a box under half a cell is widened."""
    from index import bundle
    from retrieval.model.preprocess import Geometry
    from retrieval.service.refine import select_cells

    meta = bundle.read_meta(index)
    grid, size = tuple(meta["regions"]["grid"]), int(meta["model"]["image_size"])
    cells, widened, area, shape = [], [], [], None
    for _, rec in _test_rows(manifest).iterrows():
        if not rec.get("mask"):
            continue
        box, m = _mask_box(manifest.parent / rec["mask"])
        if box is None:
            continue
        shape = m.shape
        sel = select_cells(box, Geometry(m.shape, size), grid)
        cells.append(int(sel.cells.sum()))
        widened.append(bool(sel.note))
        area.append((box[2] - box[0]) * (box[3] - box[1]) / m.size)
    out = {
        "index": str(index),
        "grid": list(grid),
        "model_input_px": size,
        "image_px": list(shape) if shape else None,
        "n_boxes": len(cells),
        "cells_per_box_median": float(np.median(cells)) if cells else None,
        "cells_per_box_mean": float(np.mean(cells)) if cells else None,
        "widened_to_one_cell": float(np.mean(widened)) if widened else None,
        "box_area_share_median": float(np.median(area)) if area else None,
    }
    print(
        f"{index.name}: grid {grid} at {size} px; cells per lesion box median "
        f"{out['cells_per_box_median']}, widened {out['widened_to_one_cell']:.2f}"
    )
    return out


# --------------------------------------------------------------------------- scale
def _exact_maxsim(cells: np.ndarray, queries: list[np.ndarray], k: int, chunk: int = 4096):
    """Top-k case rows per query by exact MaxSim of unit queries (m, D) over the cells
    (N, hw, D) (float16 or float32, memory-mapped or not; rows renormalised): one pass
    over the cells for all queries, so a 16 GB float16 map is read once."""
    import torch

    n, hw, d = cells.shape
    m = len(queries[0])
    qt = torch.from_numpy(np.concatenate(queries).astype(np.float32))  # (nq*m, D)
    scores = np.empty((len(queries), n), np.float32)
    for s in tqdm(range(0, n, chunk), desc="exact MaxSim", unit_scale=chunk, leave=False):
        z = torch.from_numpy(np.asarray(cells[s : s + chunk], np.float32)).reshape(-1, d)
        z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
        sims = (z @ qt.T).reshape(-1, hw, len(queries), m)  # (b, hw, nq, m)
        scores[:, s : s + chunk] = sims.max(dim=1).values.mean(dim=2).T.numpy()
    return [np.argsort(-row, kind="stable")[:k] for row in scores]


def part_scale(
    n_cases: int, workdir: Path, n_queries: int, shortlists: list[int], nprobes: list[int]
) -> dict:
    import faiss

    from index import region_index as ri

    hw, d = 64, 128
    if workdir.exists():
        shutil.rmtree(workdir)
    (workdir / ri.REGION_DIR).mkdir(parents=True)
    # the cells are drawn straight into the bundle's cells.npy (memory-mapped, float16 beyond
    # 1 GiB as index build keeps them): 1M cases are 33 GB as float32, more than this RAM
    t0 = time.time()
    _, sampler = clustered_unit_vectors(0, d, n_clusters=max(16, n_cases * hw // 250), seed=18)
    dtype = ri.cells_dtype(n_cases * hw, d)
    cells = np.lib.format.open_memmap(
        workdir / ri.CELLS_FILE, mode="w+", dtype=dtype, shape=(n_cases, hw, d)
    )
    sampler.fill(cells.reshape(-1, d), 18 + 1)  # a view: the draws land in the file
    cells.flush()
    gen_s = time.time() - t0
    weights = np.full((n_cases, hw), 1 / hw, np.float32)
    sizes = np.tile([[128, 128]], (n_cases, 1)).astype(np.int32)
    build_threads = faiss.omp_get_max_threads()
    t0 = time.time()
    entry = ri.write(workdir, cells, weights, sizes, cells_saved=True)
    build_s = time.time() - t0
    idx = ri.RegionIndex.load(workdir, {"regions": {**entry, "grid": [8, 8]}})
    faiss_bytes = int(faiss.serialize_index(idx.index).nbytes)
    cells_bytes = (workdir / ri.CELLS_FILE).stat().st_size
    queries = []
    for i in range(n_queries):  # a 2x2 box of a fresh case drawn from the same mixture
        queries.append(ri.unit(sampler(4, 1000 + i)))
    t0 = time.time()
    truth = _exact_maxsim(cells, queries, 10)
    truth_s = time.time() - t0
    del cells
    rows = []
    faiss.omp_set_num_threads(1)
    ivf = faiss.try_extract_index_ivf(idx.index)
    default_nprobe = ivf.nprobe if ivf is not None else None
    for nprobe in nprobes if ivf is not None else [None]:
        if ivf is not None:
            ivf.nprobe = min(ivf.nlist, nprobe)
        for sl in shortlists:
            rec, times = [], []
            for q, t in zip(queries, truth, strict=True):
                t1 = time.perf_counter()
                hits = idx.search(q, 10, shortlist=sl)
                times.append(time.perf_counter() - t1)
                rec.append(len({h.row for h in hits} & set(t.tolist())) / 10)
            rows.append(
                {
                    "shortlist": sl,
                    "nprobe": ivf.nprobe if ivf is not None else None,
                    "recall_at_10": float(np.mean(rec)),
                    "p50_ms": 1000 * statistics.median(times),
                    "p95_ms": 1000 * float(np.percentile(times, 95)),
                }
            )
    n_cells = n_cases * hw
    per_cell = faiss_bytes / n_cells
    out = {
        "n_cases": n_cases,
        "cells_per_case": hw,
        "dim": d,
        "factory": entry["factory"],
        "cells_dtype": entry["dtype"],
        "generate_s": gen_s,
        "build_s": build_s,
        "exact_truth_s": truth_s,
        "faiss_build_threads": build_threads,
        "faiss_bytes": faiss_bytes,
        "faiss_bytes_per_cell": per_cell,
        "cells_npy_bytes": cells_bytes,
        "n_queries": n_queries,
        "query_cells": 4,
        "default_shortlist": ri.SHORTLIST,
        "nprobe": default_nprobe,
        "sweep": rows,
        "omp_threads": 1,
        "loadavg": list(os.getloadavg()),
    }
    table(
        ["nprobe", "shortlist", "recall@10", "p50 ms", "p95 ms"],
        [[r["nprobe"], r["shortlist"], r["recall_at_10"], r["p50_ms"], r["p95_ms"]] for r in rows],
        title=f"region search, {n_cases:,} cases ({n_cells:,} cells, {entry['factory']}); "
        f"FAISS {faiss_bytes / 1e9:.2f} GB, cells.npy {cells_bytes / 1e9:.2f} GB, build {build_s:.0f} s",
    )
    shutil.rmtree(workdir, ignore_errors=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="latency,phantom,scale")
    ap.add_argument("--index", type=Path, action="append", default=[])
    ap.add_argument("--manifest", type=Path, action="append", default=[])
    ap.add_argument("--label", action="append", default=[], help="name of each index/manifest pair")
    ap.add_argument("--queries", type=int, default=24)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cases", type=int, action="append", default=[])
    ap.add_argument("--scale-queries", type=int, default=50)
    ap.add_argument("--shortlists", default="128,512,2048")
    ap.add_argument("--nprobes", default="32", help="IVF lists probed (swept with --shortlists)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/casebase-refine-bench"))
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    started = time.time()
    info = machine()
    doc = _load_existing()
    labels = args.label or [m.parent.name for m in args.manifest]
    for idx, man, lab in zip(args.index, args.manifest, labels, strict=True):
        if "latency" in parts:
            doc.setdefault("latency", {})[lab] = part_latency(idx, man, args.queries, args.reps)
        if "phantom" in parts:
            doc.setdefault("phantom", {})[lab] = part_phantom(idx, man)
        if "boxcells" in parts:
            doc.setdefault("box_cells", {})[lab] = part_box_cells(idx, man)
    if "scale" in parts:
        for n in args.cases or [100_000]:
            doc.setdefault("scale", {})[str(n)] = part_scale(
                n,
                args.workdir,
                args.scale_queries,
                [int(s) for s in args.shortlists.split(",")],
                [int(s) for s in args.nprobes.split(",")],
            )
    merged = _load_existing()  # parts run by another process meanwhile are kept
    for key, val in doc.items():
        if isinstance(val, dict) and isinstance(merged.get(key), dict):
            merged[key].update(val)
        else:
            merged[key] = val
    finish(NAME, info, merged, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
