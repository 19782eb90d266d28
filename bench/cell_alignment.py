"""Where Grad-CAM's upsampled peak lands: cells at their receptive fields' centres or half a cell off.

Every backbone centres feature cell i of a stride-s grid on input pixel s*i
(``retrieval.model.cells``); an ``align_corners=False`` interpolation (captum's
``LayerAttribution.interpolate``, pytorch-grad-cam's cv2 resize, what casebase used before)
puts it at s*i + (s - 1)/2. For each ``--index NAME=INDEX_DIR:MANIFEST`` this takes the test
cases with a lesion mask, the registry's Grad-CAM of the predicted class at the feature grid
(``upsample=False``), upsamples it both ways and scores explain-eval's pointing game (half-cell
tolerance and strict) and the signed offset of the map's maximum from the lesion's centroid,
per axis, in cells. Same model, same raw maps: only the upsampling differs.

    .venv/bin/python bench/cell_alignment.py \\
        --index chest=/work/artifacts/depth/chest:/work/artifacts/depth/chest_phantom/manifest.csv \\
        --index ct_normals=/work/artifacts/vol3d/bench/ct_normals_index:/work/artifacts/vol3d/bench/ct_normals_phantom/manifest.csv
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from _common import finish, machine
from tqdm import tqdm

UPSAMPLINGS = ("half_cell_off", "centred")


def _upsample(raw: torch.Tensor, size: tuple[int, ...], how: str) -> torch.Tensor:
    from retrieval.model.cells import upsample_cells

    if how == "centred":
        return upsample_cells(raw, size)
    mode = "trilinear" if len(size) == 3 else "bilinear"
    return F.interpolate(raw[:, None], size=size, mode=mode, align_corners=False)[:, 0]


def measure(index: str, manifest: str, max_cases: int) -> dict:
    from retrieval.explain import registry
    from retrieval.explain.trust import load_cases, pointing_game, pointing_tolerance
    from retrieval.service.retriever import CaseRetriever

    r = CaseRetriever.load(index, device="cpu")
    cases, skipped = load_cases(r, manifest, max_cases=max_cases, with_neighbours=False)
    model = r.model.eval()
    hits = {h: defaultdict(list) for h in UPSAMPLINGS}
    strict = {h: defaultdict(list) for h in UPSAMPLINGS}
    offsets = {h: [] for h in UPSAMPLINGS}
    grid = None
    for case in tqdm(cases, desc=index.rsplit("/", 1)[-1]):
        x = case["x"][None]
        with torch.no_grad():
            feats = model.backbone(x)
            cls = int(model.classifier(model.pool(feats)).argmax(1)[0])
        raw = registry.GradCAM(upsample=False).attribute(model, x, [cls]).detach()
        grid = tuple(raw.shape[1:])
        geo, mask = case["geometry"], case["mask"]
        tol = pointing_tolerance(geo, tuple(feats.shape[2:]), model.backbone.stride)
        centroid = np.array(np.nonzero(mask), np.float64).mean(1)
        cell_px = np.array(geo.original_size, np.float64) / np.array(grid)  # original px a cell
        for how in UPSAMPLINGS:
            full = geo.map_to_original(_upsample(raw, tuple(x.shape[2:]), how)[0].numpy())
            peak = np.array(np.unravel_index(int(np.argmax(full)), full.shape), np.float64)
            offsets[how].append(((peak - centroid) / cell_px).tolist())
            for key in ("all", str(case["label"])):
                hits[how][key].append(pointing_game(full, mask, tol))
                strict[how][key].append(pointing_game(full, mask, 0))
    out = {
        "n_cases": len(cases),
        "skipped": len(skipped),
        "grid": list(grid or ()),
        "input": list(cases[0]["x"].shape[1:]) if cases else [],
        "stride": model.backbone.stride,
    }
    for how in UPSAMPLINGS:
        off = np.array(offsets[how])
        out[how] = {
            "pointing_game": {k: float(np.mean(v)) for k, v in hits[how].items()},
            "pointing_game_strict": {k: float(np.mean(v)) for k, v in strict[how].items()},
            "mean_offset_cells": off.mean(0).tolist() if len(off) else [],
            "median_abs_offset_cells": np.median(np.abs(off), 0).tolist() if len(off) else [],
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", action="append", required=True, metavar="NAME=INDEX:MANIFEST")
    ap.add_argument("--max-cases", type=int, default=200)
    args = ap.parse_args()
    info, t0 = machine(), time.time()
    runs = {}
    for spec in args.index:
        name, rest = spec.split("=", 1)
        index, manifest = rest.split(":", 1)
        runs[name] = measure(index, manifest, args.max_cases)
        runs[name]["index"] = index
        a, b = (runs[name][h]["pointing_game"]["all"] for h in UPSAMPLINGS)
        print(f"{name}: Grad-CAM pointing half a cell off {a:.3f}, centred {b:.3f}")
    finish("cell_alignment", info, {"datasets": runs}, t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
