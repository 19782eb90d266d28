"""Which score should 3-D Grad-CAM explain when the label set has a lesion-free class? (issue 23)

On the CT phantoms with normals (bench/volumes.py's ct_normals, ct96_normals) the class
logit's Grad-CAM at the default block still misses the nodules (bench/volume_cam_layer.py).
This script scores Grad-CAM (captum's LayerGradCam, as the registry runs it) at every block
for three explained scores of the predicted class c:

* ``own``: the logit z_c (``--reference-class none``);
* ``reference``: z_c - z_normal, "why c rather than normal" (``--reference-class auto``, the
  default since this measurement; retrieval.explain.registry.explained_logits);
* ``centred``: z_c - mean_k z_k (what softmax sees; needs no reference class).

Measures as explain-eval (retrieval.explain.trust): pointing game with half a feature-volume
cell of tolerance, strict pointing, mask energy, per class, on every test volume with a lesion.

    .venv/bin/python bench/volume_cam_target.py     -> bench/results/volume_cam_target.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import finish, machine  # noqa: E402
from volume_cam_layer import DEFAULT_MODELS, by_block  # noqa: E402

MODELS = {k: DEFAULT_MODELS[k] for k in ("ct_normals", "ct96_normals")}


def centred(logits, c: int):
    return logits[:, c] - logits.mean(dim=1)


SCORES = {"own": ("none", None), "reference": ("auto", None), "centred": ("none", centred)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="LABEL=INDEX_DIR@MANIFEST (repeatable)")
    ap.add_argument("--max-cases", type=int, default=200)
    args = ap.parse_args(argv)
    models = dict(m.split("=", 1) for m in args.model) if args.model else MODELS
    info, started = machine(), time.time()
    results = {}
    for label, spec in models.items():
        index_dir, _, manifest = spec.partition("@")
        results[label] = {}
        for name, (reference, score) in SCORES.items():
            t0 = time.time()
            res = by_block(Path(index_dir), Path(manifest), args.max_cases, reference, score)
            res["seconds"] = round(time.time() - t0, 1)
            results[label][name] = res
            print(
                f"{label} {name}: "
                + ", ".join(
                    f"{v['name']} {v['all']['pointing_game']:.2f}" for v in res["blocks"].values()
                ),
                flush=True,
            )
    finish("volume_cam_target", info, {"args": vars(args), "models": results}, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
