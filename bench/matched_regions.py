"""Do the matched regions carry the similarity, and does similarity_score tell neighbours apart?

    python bench/matched_regions.py INDEX_DIR MANIFEST --name chest [--split test]
        [--max-queries 150] [--pairs 5]

Over the split's cases with a lesion mask (own patient excluded from the neighbours), as
`casebase query` computes them (CaseRetriever: decomposition, region pairs, calibrated score):

* ``carried``: per query-neighbour pair (top ``--pairs`` neighbours), the summed share of the
  similarity carried by its matched regions (up to 3 region pairs); median and mean;
* ``top_touches_lesion``: share of pairs whose top matched region's query box holds a pixel of
  the query's lesion mask, overall and per class; with the median area of that box as a share of
  the image (a box covering the image would touch every lesion: read the two together);
* ``score_gap``: per query, similarity_score of neighbour 1 minus neighbour 10 (median), next to
  the same gap in raw cosine;
* ``lesion_x_lesion``: share of the similarity in the decomposition's terms between the query's
  and the neighbour's lesion cells (neighbours with a mask), with the even-spread chance level;
* ``precision_at_5``: label agreement of the top 5 (context: the regions are only worth reading
  when the neighbours are right).

Targets (issue 16): top region on the lesion in >= 90% of pairs for every class, regions carry
>= 50% (median), score gap >= 0.02. Each run is stored under its --name in
bench/results/matched_regions.json (other names kept), with the machine and load.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from _common import RESULTS, finish, machine  # also puts the repository root on sys.path

TARGETS = {"top_touches_lesion_min_class": 0.90, "carried_median": 0.50, "score_gap_median": 0.02}


def touches(box: list[int], mask: np.ndarray) -> bool:
    x0, y0, x1, y1 = box
    return bool(mask[y0:y1, x0:x1].any())


def run(index_dir, manifest, split="test", max_queries=150, pairs=5, k=10, progress=True):
    from tqdm.auto import tqdm

    from index.builder import case_table
    from retrieval.data.imageio import read_mask
    from retrieval.data.manifest import load_manifest
    from retrieval.errors import CasebaseError
    from retrieval.explain.trust import _pick, lesion_pair_shares
    from retrieval.service.retriever import CaseRetriever

    r = CaseRetriever.load(index_dir, device="cpu")
    m = load_manifest(manifest)
    table = case_table(m, m.select([split]))
    table = table[table["mask"].str.len() > 0].reset_index(drop=True)
    carried, touch, area, cross = [], [], [], []
    by_class: dict[str, list[bool]] = {}
    gaps, cos_gaps, p5, lesion = [], [], [], []
    skipped = []
    rows = _pick(len(table), max_queries)
    for pos in tqdm(rows, desc="matched regions", unit="query", disable=not progress):
        row = table.iloc[pos]
        try:
            q = r.encode(row["image"])
            mask = read_mask(row["mask"], expected_size=tuple(q.geometry.original_size))
        except CasebaseError as err:
            skipped.append(f"{row['case_id']}: {err}")
            continue
        hits = r.search(q.embedding.float().cpu().numpy(), k, row["patient_id"] or None)[0]
        nbs = [r.neighbor(s, i) for s, i in hits]
        if len(nbs) >= 2:
            gaps.append(nbs[0].similarity_score - nbs[-1].similarity_score)
            cos_gaps.append(nbs[0].similarity - nbs[-1].similarity)
        p5.append(float(np.mean([n.label == row["label"] for n in nbs[:5]])))
        top = nbs[:pairs]
        ctxs = r._neighbor_contexts(top)
        h, w = q.geometry.original_size
        for nb, c in zip(top, ctxs, strict=True):
            if c is None:
                continue
            r.match_regions(q, c, nb)
            shares = [g.share for g in nb.matched_regions]
            carried.append(float(sum(shares)))
            hit = bool(nb.matched_regions) and touches(nb.matched_regions[0].query_box, mask)
            touch.append(hit)
            by_class.setdefault(row["label"], []).append(hit)
            if nb.matched_regions:
                x0, y0, x1, y1 = nb.matched_regions[0].query_box
                area.append((x1 - x0) * (y1 - y0) / (h * w))
                cross.append(any(g.crosses_sides for g in nb.matched_regions))
        lesion += lesion_pair_shares(r, q, mask, top, ctxs)
    per_class = {lab: float(np.mean(v)) for lab, v in sorted(by_class.items())}
    out = {
        "index": str(Path(index_dir).resolve()),
        "manifest": str(Path(manifest).resolve()),
        "split": split,
        "n_queries": len(gaps),
        "n_pairs": len(carried),
        "pairs_per_query": pairs,
        "k": k,
        "model_backbone": r.model.config.backbone,
        "weighting": r.weighting,
        "score_calibrated": r.scale.calibrated,
        "carried_median": float(np.median(carried)) if carried else float("nan"),
        "carried_mean": float(np.mean(carried)) if carried else float("nan"),
        "carried_share_of_pairs_at_least_half": float(np.mean(np.array(carried) >= 0.5))
        if carried
        else float("nan"),
        "carried_max": float(np.max(carried)) if carried else float("nan"),
        "top_touches_lesion": float(np.mean(touch)) if touch else float("nan"),
        "top_touches_lesion_by_class": per_class,
        "top_touches_lesion_min_class": min(per_class.values()) if per_class else float("nan"),
        "top_box_area_median": float(np.median(area)) if area else float("nan"),
        "pairs_with_cross_side_region": float(np.mean(cross)) if cross else float("nan"),
        "score_gap_median": float(np.median(gaps)) if gaps else float("nan"),
        "cosine_gap_median": float(np.median(cos_gaps)) if cos_gaps else float("nan"),
        "lesion_x_lesion_median": float(np.median([p["share"] for p in lesion]))
        if lesion
        else float("nan"),
        "lesion_x_lesion_mean": float(np.mean([p["share"] for p in lesion]))
        if lesion
        else float("nan"),
        "lesion_x_lesion_chance_median": float(np.median([p["chance"] for p in lesion]))
        if lesion
        else float("nan"),
        "precision_at_5": float(np.mean(p5)) if p5 else float("nan"),
        "skipped": skipped,
    }
    out["targets"] = TARGETS
    out["passes"] = {
        "top_touches_lesion_min_class": out["top_touches_lesion_min_class"]
        >= TARGETS["top_touches_lesion_min_class"],
        "carried_median": out["carried_median"] >= TARGETS["carried_median"],
        "score_gap_median": out["score_gap_median"] >= TARGETS["score_gap_median"],
    }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("index_dir")
    ap.add_argument("manifest")
    ap.add_argument("--name", required=True, help="key of this run in the JSON (e.g. chest)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--max-queries", type=int, default=150)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args(argv)
    started = time.time()
    info = machine()
    res = run(args.index_dir, args.manifest, args.split, args.max_queries, args.pairs, args.k)
    res["loadavg_start"] = info["loadavg_start"]
    res["loadavg_end"] = list(os.getloadavg())
    res["wall_s"] = round(time.time() - started, 1)
    path = RESULTS / "matched_regions.json"
    runs = {}
    if path.is_file():
        runs = json.loads(path.read_text()).get("runs", {})
    runs[args.name] = res
    finish("matched_regions", info, {"runs": runs}, started)
    keys = [k for k in res if not isinstance(res[k], dict | list)]
    for key in keys:
        print(f"{key:>40}: {res[key]}")
    print(f"{'top_touches_lesion_by_class':>40}: {res['top_touches_lesion_by_class']}")
    print(f"{'passes':>40}: {res['passes']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
