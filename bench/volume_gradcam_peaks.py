"""Where does 3-D Grad-CAM peak, when it misses the lesion? (issue 23)

On the CT phantom the volume model retrieves well (P@5 ~0.9) while its Grad-CAM pointing
game stays far below 0.8. This script reads the model's own Grad-CAM at its feature volume
(4 x 8 x 8 cells, the closed form CaseNet.gradcam, before any upsampling) on each test
volume and records, per class:

* hit: the share of volumes whose Grad-CAM maximum lies in a cell touching the lesion;
* the rank (1 = the maximum) of the best lesion cell among the 256 cells, median;
* where the misses go: the most frequent maximum cells, and the share of misses whose
  cell holds voxels saturated by the window (value >= 0.999 of the lung window: in this
  phantom only the spine, 500 HU, reaches it; lesions and soft tissue stay below);
* the same hit rate for the class-contrast map ((W_c - mean_k W_k) . F, what a centred head
  would give; softmax is blind to that shift).

    .venv/bin/python bench/volume_gradcam_peaks.py    # the CT indexes bench/volumes.py built

Each ``--index LABEL=DIR`` is one model (default: the three CT indexes below: the CLI
defaults and ``--train-args=--zero-init-residual`` from bench/volumes.py, and one trained with
``train --peak-pool logits`` in ct_logits_index).
Results to bench/results/volume_gradcam_peaks.json, one entry per label under "models".
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import finish, machine  # noqa: E402
from volumes import WORK  # noqa: E402

SATURATED = 0.999


def peaks(index_dir: Path, manifest: Path, max_cases: int) -> dict:
    import torch

    from retrieval.data.manifest import load_manifest
    from retrieval.explain.similarity import lesion_cells
    from retrieval.explain.trust import load_cases
    from retrieval.service.retriever import CaseRetriever

    torch.set_num_threads(1)
    r = CaseRetriever.load(index_dir, device="cpu")
    cases, skipped = load_cases(r, manifest, max_cases=max_cases, with_neighbours=False)
    man = load_manifest(manifest)
    images = man.df.drop_duplicates("case_id").set_index("case_id")["image"]
    model = r.model.eval()
    w = model.classifier.weight.detach()
    contrast = w - w.mean(dim=0, keepdim=True)
    per = defaultdict(lambda: {"hit": [], "contrast_hit": [], "rank": []})
    miss_cells: Counter = Counter()
    miss_saturated = []
    for c in cases:
        with torch.no_grad():
            f = model.backbone(c["x"][None])[0]
            k = int(model.classifier(model.pool(f[None]))[0].argmax())
        grid = tuple(f.shape[1:])
        les = np.asarray(lesion_cells(c["mask"], c["geometry"], grid), bool).reshape(-1)
        cam = (w[k] @ f.flatten(1)).numpy()
        con = (contrast[k] @ f.flatten(1)).numpy()
        top = int(cam.argmax())
        p = per[c["label"]]
        p["hit"].append(bool(les[top]))
        p["contrast_hit"].append(bool(les[int(con.argmax())]))
        p["rank"].append(int(np.flatnonzero(les[np.argsort(-cam)])[0]) + 1)
        if not les[top]:
            cell = np.unravel_index(top, grid)
            miss_cells[str(tuple(int(v) for v in cell))] += 1
            vol = np.load(man.resolve(images[c["case_id"]]), allow_pickle=False)
            steps = [s // g for s, g in zip(vol.shape, grid, strict=True)]
            box = tuple(slice(i * s, (i + 1) * s) for i, s in zip(cell, steps, strict=True))
            miss_saturated.append(bool((vol[box] >= SATURATED).any()))
    everyone = [v for p in per.values() for v in p["hit"]]
    return {
        "n_cases": len(everyone),
        "skipped": skipped,
        "grid": list(grid),
        "hit": float(np.mean(everyone)),
        "contrast_hit": float(np.mean([v for p in per.values() for v in p["contrast_hit"]])),
        "per_class": {
            lab: {
                "n": len(p["hit"]),
                "hit": float(np.mean(p["hit"])),
                "contrast_hit": float(np.mean(p["contrast_hit"])),
                "median_rank_of_best_lesion_cell": float(np.median(p["rank"])),
            }
            for lab, p in sorted(per.items())
        },
        "misses": len(miss_saturated),
        "misses_in_a_saturated_cell": int(np.sum(miss_saturated)),
        "most_frequent_miss_cells": miss_cells.most_common(5),
    }


DEFAULT_INDEXES = [
    f"features (the default)={WORK}/ct_index",
    f"features, --zero-init-residual={WORK}/ct_zeroinitresidual_index",
    f"logits={WORK}/ct_logits_index",
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", action="append", help="LABEL=INDEX_DIR (repeatable)")
    ap.add_argument("--manifest", default=f"{WORK}/ct_phantom/manifest.csv")
    ap.add_argument("--max-cases", type=int, default=45)
    args = ap.parse_args(argv)
    info, t0 = machine(), time.time()
    models = {}
    for spec in args.index or DEFAULT_INDEXES:
        label, _, index = spec.rpartition("=")
        res = peaks(Path(index), Path(args.manifest), args.max_cases)
        res["index"] = index
        models[label or index] = res
        print(label, {k: res[k] for k in ("hit", "contrast_hit", "misses")})
    finish("volume_gradcam_peaks", info, {"manifest": args.manifest, "models": models}, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
