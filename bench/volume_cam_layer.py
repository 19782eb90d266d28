"""Which block should 3-D Grad-CAM look at? (issue 23)

Grad-CAM is usually taken at the last block. On the cnn3d backbone the last stage
(features.5-6: a convolution widening the channels to 8w and a residual block, both at the
stride-8 grid the stage before already has) adds receptive field but no resolution, and the
explain-eval pointing game of its Grad-CAM stays far below the issue's 0.8. This script
scores captum's LayerGradCam (the registry's Grad-CAM, ReLU, the predicted class's logit)
at every block of each model, with the same measures as explain-eval
(retrieval.explain.trust: the maximum in the lesion dilated by half a feature-volume cell,
``pointing_game``; without it, ``pointing_game_strict``; the mask energy), per class.

    .venv/bin/python bench/volume_cam_layer.py      # the CT and ct96 models of bench/volumes.py

Each ``--model LABEL=INDEX_DIR@MANIFEST`` is one index (default: the CLI-default CT model
the layer was chosen on, the ct96 one never tuned on, and the CT ``--zero-init-residual``
model; and the two phantoms with a fourth, lesion-free class, bench/volumes.py's ct_normals
and ct96_normals). Results to bench/results/volume_cam_layer.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import finish, machine  # noqa: E402
from volumes import WORK  # noqa: E402

DEFAULT_MODELS = {
    "ct": f"{WORK}/ct_index@{WORK}/ct_phantom/manifest.csv",
    "ct96": f"{WORK}/ct96_index@{WORK}/ct96_phantom/manifest.csv",
    "ct_zero_init": f"{WORK}/ct_zeroinitresidual_index@{WORK}/ct_phantom/manifest.csv",
    "ct_normals": f"{WORK}/ct_normals_index@{WORK}/ct_normals_phantom/manifest.csv",
    "ct96_normals": f"{WORK}/ct96_normals_index@{WORK}/ct96_normals_phantom/manifest.csv",
}
DESCRIPTIONS = {
    "ct": "ct (defaults; the block chosen by this one)",
    "ct96": "ct96 (defaults; never tuned on)",
    "ct_zero_init": "ct --zero-init-residual",
    "ct_normals": "ct with normals (defaults)",
    "ct96_normals": "ct96 with normals (defaults)",
}


def by_block(
    index_dir: Path, manifest: Path, max_cases: int, reference: str | None = "auto", score=None
) -> dict:
    """Grad-CAM pointing game, strict pointing and mask energy at every backbone block.

    ``reference``: the retriever's --reference-class (auto: a class named normal, if any);
    ``score``: a function (logits, predicted class) -> (B,) explained instead of the class score
    (bench/volume_cam_target.py)."""
    import torch

    from retrieval.explain import registry
    from retrieval.explain.registry import ScoreTarget
    from retrieval.explain.trust import load_cases, mask_energy, pointing_game, pointing_tolerance
    from retrieval.service.retriever import CaseRetriever

    torch.set_num_threads(1)
    r = CaseRetriever.load(index_dir, device="cpu")
    r.set_reference_class(reference)
    cases, skipped = load_cases(r, manifest, max_cases=max_cases, with_neighbours=False)
    model = r.model.eval()
    fused = registry.inference_model(model)  # the model Grad-CAM hooks (score functions run it)
    blocks = list(range(1, len(model.backbone.features)))
    acc = {b: defaultdict(lambda: defaultdict(list)) for b in blocks}
    grids = {}
    for c in cases:
        x = c["x"][None]
        with torch.no_grad():
            feats = model.backbone(x)
            cls = int(model.classifier(model.pool(feats)).argmax(1)[0])
        tol = pointing_tolerance(c["geometry"], tuple(feats.shape[2:]), model.backbone.stride)
        target = ScoreTarget.for_classes([cls], model.config.output_dim, r.weighting)
        if score is not None:

            def target(t, c=cls):
                return score(fused(t), c)

        for b in blocks:
            heat = registry.GradCAM(layer=b).attribute(model, x, target)[0].detach().numpy()
            full = c["geometry"].map_to_original(heat)
            for key in ("all", c["label"]):
                a = acc[b][key]
                a["pointing"].append(pointing_game(full, c["mask"], tol))
                a["strict"].append(pointing_game(full, c["mask"], 0))
                a["energy"].append(mask_energy(full, c["mask"]))
        if not grids:  # each block's output shape (C, d, h, w)
            with torch.no_grad():
                h = x
                for b, block in enumerate(model.backbone.features):
                    h = block(h)
                    grids[b] = list(h.shape[1:])
    out = {}
    for b in blocks:
        out[str(b)] = {
            "name": f"features.{b}",
            "module": type(model.backbone.features[b]).__name__,
            "shape": grids.get(b),
            **{
                key: {
                    "pointing_game": float(np.mean(v["pointing"])),
                    "pointing_game_strict": float(np.mean(v["strict"])),
                    "mask_energy": float(np.mean(v["energy"])),
                    "n_cases": len(v["pointing"]),
                }
                for key, v in acc[b].items()
            },
        }
    return {
        "index": str(index_dir),
        "manifest": str(manifest),
        "n_cases": len(cases),
        "skipped": len(skipped),
        "cam_layer": f"features.{model.cam_index}",
        "reference_class": r.reference_class,
        "blocks": out,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="LABEL=INDEX_DIR@MANIFEST (repeatable)")
    ap.add_argument("--max-cases", type=int, default=45)
    ap.add_argument("--name", default="volume_cam_layer")
    args = ap.parse_args(argv)
    models = dict(DEFAULT_MODELS)
    if args.model:
        models = dict(m.split("=", 1) for m in args.model)
    info, started = machine(), time.time()
    results = {}
    for label, spec in models.items():
        index_dir, _, manifest = spec.partition("@")
        t0 = time.time()
        res = by_block(Path(index_dir), Path(manifest), args.max_cases)
        res["seconds"] = round(time.time() - t0, 1)
        res["description"] = DESCRIPTIONS.get(label, label)
        results[label] = res
        best = max(res["blocks"].values(), key=lambda v: v["all"]["pointing_game"])
        print(
            f"{label}: "
            + ", ".join(
                f"{v['name']} {v['all']['pointing_game']:.2f}" for v in res["blocks"].values()
            )
            + f" (best {best['name']})",
            flush=True,
        )
    finish(args.name, info, {"args": vars(args), "models": results}, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
