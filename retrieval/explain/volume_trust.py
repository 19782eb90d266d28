"""explain-eval for a volume model (cnn3d): the pointing game and mask energy in 3-D.

For each test case with a lesion mask (a ``(D, H, W)`` mask of the volume, see
:func:`retrieval.data.volume.read_volume_mask`) every method's query map is computed
on the model input, trilinearly resized to the volume's original ``(D, H, W)``, and
scored:

* ``pointing_game``: the map's maximum lies in the lesion dilated by half a
  feature-volume cell along each axis (in original voxels), as the 2-D tolerance;
  ``pointing_game_strict``: no tolerance;
* ``mask_energy``: the share of the map's positive mass inside the lesion
  (``mask_area``: the lesion's share of the volume, the chance level).

The similarity decomposition's lesion x lesion share (lesion cells = feature voxels
whose footprint touches the mask) is reported as for images. What is 2-D only for
now, and so not measured here, is named in the report's ``not_measured``.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from retrieval.errors import CasebaseError
from retrieval.explain import registry
from retrieval.explain.methods import family_of

NOT_MEASURED = (
    "deletion / insertion curves, faithfulness correlation, max-sensitivity, the "
    "randomisation sanity checks and the neighbour tests are 2-D only for now (not measured "
    "on volumes)"
)
_NAN_KEYS = (
    "deletion_auc",
    "deletion_auc_random",
    "insertion_auc",
    "insertion_auc_random",
    "randomization_spearman",
    "randomization_ssim",
    "deletion_gain",
    "insertion_gain",
    "faithfulness_correlation",
    "max_sensitivity",
)


def tolerance(geometry, grid: tuple[int, int, int]) -> tuple[int, int, int]:
    """Half a feature-volume cell along (slices, rows, cols), in original voxels."""
    d, h, w = geometry.original_size
    return tuple(math.ceil(n / g / 2) for n, g in zip((d, h, w), grid, strict=True))


def evaluate(retriever, manifest_path, split="test", methods=None, max_cases=40, progress=True):
    """The explain-eval report of a volume model (same top-level keys as for images)."""
    from tqdm.auto import tqdm

    from retrieval.explain.trust import (
        _mean,
        lesion_summary,
        load_cases,
        mask_energy,
        pointing_game,
        query_map,
    )

    # by default the cheap maps; occlusion (343 forwards per volume) when asked for
    cheap = [m for m in registry.METHODS if not registry.get(m).expensive]
    names = registry.check_names(list(methods) if methods else cheap)
    cases, skipped = load_cases(retriever, manifest_path, split, max_cases, True)
    if not cases:
        raise CasebaseError(
            "no case with a readable volume and a non-empty mask: " + "; ".join(skipped[:5])
        )
    model = retriever.model.eval()
    device = next(model.parameters()).device
    acc = {
        n: {"point": [], "strict": [], "energy": [], "area": [], "sec": [], "lab": []}
        for n in names
    }
    for case in tqdm(cases, desc="explain-eval", unit="volume", disable=not progress):
        x = case["x"].to(device)[None]
        mask = np.asarray(case["mask"], bool)
        geo = case["geometry"]
        nbrs = case.get("neighbours")
        nbrs = None if nbrs is None else nbrs.to(device)
        with torch.no_grad():  # one forward: the predicted class and the feature grid
            fwd = model.run(x, retriever.weighting)
        cls, grid = int(fwd.predicted[0]), tuple(fwd.features.shape[2:])
        tol = tolerance(geo, grid)
        for name in names:
            t0 = time.perf_counter()
            heat = query_map(model, name, registry.get(name), x, cls, retriever.weighting, nbrs)
            a = acc[name]
            a["sec"].append(time.perf_counter() - t0)
            full = geo.map_to_original(heat.numpy())
            a["point"].append(pointing_game(full, mask, tol))
            a["strict"].append(pointing_game(full, mask, 0))
            a["energy"].append(mask_energy(full, mask))
            a["area"].append(float(mask.mean()))
            a["lab"].append(str(case.get("label", "")))
    out = {}
    for name, a in acc.items():
        m = {
            "family": family_of(name),
            "pointing_game": _mean(a["point"]),
            "pointing_game_strict": _mean(a["strict"]),
            "mask_energy": _mean(a["energy"]),
            "mask_area": _mean(a["area"]),
            "n_cases": len(a["point"]),
            "seconds_per_map": _mean(a["sec"]),
            "sanity_check": "not run",
            "sanity": {},
            "split": split,
            "dimensions": 3,
            "not_measured": NOT_MEASURED,
            **{k: float("nan") for k in _NAN_KEYS},
        }
        m["by_label"] = {
            lab: {
                "n": a["lab"].count(lab),
                "pointing_game": _mean(
                    [p for p, v in zip(a["point"], a["lab"], strict=True) if v == lab]
                ),
                "mask_energy": _mean(
                    [e for e, v in zip(a["energy"], a["lab"], strict=True) if v == lab]
                ),
            }
            for lab in sorted(set(a["lab"]))
            if lab
        }
        m["summary"] = (
            f"on {m['n_cases']} volumes: on the lesion {m['pointing_game']:.0%} of the time "
            f"(3-D pointing game, tolerance half a feature-volume cell; strict "
            f"{m['pointing_game_strict']:.0%}), {m['mask_energy']:.0%} of its energy inside the "
            f"lesion (which is {m['mask_area']:.0%} of the volume); sanity checks not run "
            "(2-D only for now)"
        )
        out[name] = m
    lesion = lesion_summary(cases)
    if "similarity" in out and lesion.get("n_pairs"):
        out["similarity"]["lesion_x_lesion_share"] = lesion["median_share"]
        out["similarity"]["lesion_x_lesion_chance"] = lesion["median_chance"]
    return {
        "methods": out,
        "similarity_lesion_share": lesion,
        "split": split,
        "n_cases": len(cases),
        "skipped": skipped,
        "not_measured": NOT_MEASURED,
        "neighbour_tests": {"note": "2-D only for now (not measured on volumes)"},
        "data_randomization": None,
        "settings": {
            "dimensions": 3,
            "pointing_tolerance": "half a feature-volume cell along each axis",
            "maps": "trilinearly resized to the volume's original (D, H, W)",
            "weighting": retriever.weighting,
        },
    }
