"""Every explanation method on a volume model: the 3-D pointing game and mask energy.

On the CT phantom's CLI-default model (bench/volumes.py's ``ct`` run: its index and phantom
under ``--work``), ``explain-eval``'s volume path (retrieval.explain.volume_trust) for each
method in the registry over the first ``--cases`` test volumes with a mask, plus a sweep of
LIME's supervoxel count (3-D SLIC) and samples on ``--sweep-cases`` of them: what picked
``VOLUME_LIME_SEGMENTS`` / ``VOLUME_LIME_SAMPLES`` in retrieval/explain/registry.py.

    /work/notes/heavy .venv/bin/python bench/volume_methods.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import finish, machine  # noqa: E402

WORK = "/work/artifacts/vol3d/bench"
SWEEP = ((64, 128), (256, 256), (512, 512))


def measure(r, manifest, methods, cases) -> dict:
    from retrieval.explain import volume_trust

    # the pointing game and mask energy only: no randomisation sanity check (it re-explains
    # every case ~45 times, 343 forwards each for occlusion)
    rep = volume_trust.evaluate(
        r, manifest, methods=methods, max_cases=cases, progress=False, sanity_cases=0
    )
    return {
        m: {
            k: v.get(k)
            for k in (
                "pointing_game",
                "pointing_game_strict",
                "mask_energy",
                "mask_area",
                "n_cases",
            )
        }
        | {"seconds_per_map": v.get("seconds_per_map")}
        for m, v in rep["methods"].items()
    }


def reinitialised(model):
    """A copy of ``model`` with every layer re-initialised (the model-randomisation check of
    Adebayo et al. 2018: a map that still finds the lesion then says nothing of the model)."""
    import copy

    import torch

    torch.manual_seed(0)
    rand = copy.deepcopy(model)
    for m in rand.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return rand.eval()


def main() -> int:
    import torch

    from retrieval.explain import registry
    from retrieval.service.retriever import CaseRetriever

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=WORK)
    ap.add_argument("--cases", type=int, default=30)
    ap.add_argument("--sweep-cases", type=int, default=12)
    ap.add_argument("--methods", help="the methods part for these only (comma list; merged)")
    ap.add_argument(
        "--part",
        default="sweep,methods,random",
        help="sweep (LIME supervoxels), methods, random (the same maps from a re-initialised "
        "model, cheap methods); parts merge into the JSON",
    )
    args = ap.parse_args()
    parts = set(args.part.split(","))
    torch.set_num_threads(1)
    work = Path(args.work)
    manifest = work / "ct_phantom" / "manifest.csv"
    r = CaseRetriever.load(work / "ct_index", device="cpu")
    info, started = machine(), time.time()
    default = (registry.VOLUME_LIME_SEGMENTS, registry.VOLUME_LIME_SAMPLES)
    path = Path(__file__).resolve().parent / "results" / "volume_methods.json"
    prev = (
        json.loads(path.read_text())
        if path.is_file() and parts != {"sweep", "methods", "random"}
        else {}
    )
    sweep = prev.get("lime_sweep", {})
    for segs, samples in SWEEP if "sweep" in parts else ():
        registry.VOLUME_LIME_SEGMENTS, registry.VOLUME_LIME_SAMPLES = segs, samples
        sweep[f"{segs}/{samples}"] = measure(r, manifest, ["lime"], args.sweep_cases)["lime"]
        print(
            f"lime {segs} supervoxels / {samples} samples: {sweep[f'{segs}/{samples}']}", flush=True
        )
    registry.VOLUME_LIME_SEGMENTS, registry.VOLUME_LIME_SAMPLES = default
    methods = prev.get("methods", {})
    only = args.methods.split(",") if args.methods else registry.METHODS
    for m in only if "methods" in parts else ():
        methods[m] = measure(r, manifest, [m], args.cases)[m]
        print(f"{m}: {methods[m]}", flush=True)
    random = prev.get("random_model", {})
    if "random" in parts:
        r.model = reinitialised(r.model)
        cheap = [m for m in registry.METHODS if not registry.get(m).expensive]
        cheap.append("integrated_gradients")
        random = measure(r, manifest, cheap, args.cases)
        print(f"re-initialised model: {random}", flush=True)
    extra = {}
    if prev.get("machine") and ("methods" not in parts or args.methods):  # a later part
        extra["machine_" + "_".join(sorted(parts) + (args.methods or "").split(","))] = info
        info = prev["machine"]
    finish(
        "volume_methods",
        info,
        {
            **extra,
            "args": vars(args),
            "model": str(work / "ct_index"),
            "lime_default": {"segments": default[0], "samples": default[1]},
            "lime_sweep": sweep,
            "methods": methods,
            "random_model": random,
        },
        started,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
