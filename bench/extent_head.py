"""How well does the lesion-extent head know the lesion's size, and what does its code do?

For index bundles built by default-trained models with an extent head (retrieval.model.extent;
bench/depth.py keeps them), on the phantom's test split as queries against the index:

* ``spearman``: within each class, the rank correlation of the head's predicted lesion area
  with the mask's true area (test queries), and with the phantom's ``lesion_size`` factor;
* ``code_weight``: the size ratio and P@5 (bench/depth.py's depth_metrics) when the same
  vectors carry the extent code at weight c = 0 (appearance alone, the code dropped), 0.5,
  1 (the default) and 2: what the code itself contributes next to what training on the masks
  taught the appearance part;
* ``oracle``: the code made from the true mask area instead, at c = 1 (its ceiling).

    .venv/bin/python bench/extent_head.py --index chest=/work/artifacts/depth/chest \\
        --index photo=/work/artifacts/depth/photo

Results to bench/results/extent_head.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import finish, machine  # noqa: E402
from depth import _metrics_from_frames  # noqa: E402
from depth_extent import (  # noqa: E402
    split_spec,
    weight_key,
    weights_line,
    within_class_spearman,
)

WEIGHTS = (0.0, 0.5, 1.0, 2.0)


def _vectors(r, paths: list[str]):
    """(appearance embeddings, predicted areas, ok positions) of images, via the index's model."""
    import torch

    from retrieval.model.dataset import iter_decoded

    pre, model = r.preprocessor, r.model
    e, a, ok = [], [], []
    c = float(model.config.extent_weight)
    for idx, batch, _ in iter_decoded(paths, pre, progress=False):
        with torch.no_grad():
            out = model.run(pre.normalize(batch), r.weighting)
        e.append(out.embedding[:, :-2].numpy() * np.sqrt(1 + c * c))
        a.append(out.lesion_fraction.flatten(1).mean(1).numpy())
        ok += idx
    return np.concatenate(e), np.concatenate(a), ok


def _true_areas(man, df) -> np.ndarray:
    from retrieval.data.imageio import read_mask

    return np.array([float(read_mask(man.resolve(p)).mean()) for p in df["mask"]])


def score_index(index_dir: str, manifest: str | None = None) -> dict:
    import torch

    from retrieval.data.manifest import load_manifest
    from retrieval.model import extent
    from retrieval.service.retriever import CaseRetriever

    torch.set_num_threads(1)
    r = CaseRetriever.load(index_dir, device="cpu")
    if not r.model.has_extent:
        raise SystemExit(f"{index_dir}: its model has no extent head")
    man = load_manifest(manifest or r.meta["manifest"])
    g_df = man.select(["train", "val"]).reset_index(drop=True)
    keep = g_df["case_id"].isin(set(r.cases["case_id"]))
    g_df = g_df[keep].reset_index(drop=True)
    q_all = man.select(["test"]).reset_index(drop=True)
    g, ga, g_ok = _vectors(r, [str(man.resolve(p)) for p in g_df["image"]])
    q, qa, q_ok = _vectors(r, [str(man.resolve(p)) for p in q_all["image"]])
    g_df, q_df = g_df.iloc[g_ok].reset_index(drop=True), q_all.iloc[q_ok].reset_index(drop=True)
    gt, qt = _true_areas(man, g_df), _true_areas(man, q_df)
    q_labels = q_df["label"].to_numpy()
    knots = r.model.config.extent_knots

    def code(areas):
        t = extent.angle(torch.tensor(areas, dtype=torch.float32), knots).numpy()
        return np.stack([np.cos(t), np.sin(t)], 1)

    def metrics(c, g_code, q_code):
        gv = np.hstack([g, c * g_code]) / np.sqrt(1 + c * c)
        qv = np.hstack([q, c * q_code]) / np.sqrt(1 + c * c)
        m = _metrics_from_frames(q_df, qv, g_df, gv)
        return {"precision_at_5": m["precision_at_5"], "size_ratio": m["size_ratio"]}

    out = {
        "index": str(index_dir),
        "extent_weight": float(r.model.config.extent_weight),
        "n_gallery": len(g_df),
        "n_queries": len(q_df),
        "spearman": {
            "with_true_area": within_class_spearman(qa, qt, q_labels),
            "with_lesion_size": within_class_spearman(
                qa, q_df["lesion_size"].astype(float).to_numpy(), q_labels
            ),
        },
        "area_log_error_median": float(np.median(np.abs(np.log(qa + 1e-4) - np.log(qt + 1e-4)))),
        "code_weight": {weight_key(c): metrics(c, code(ga), code(qa)) for c in WEIGHTS},
        "oracle": metrics(1.0, code(gt), code(qt)),
    }
    rho = out["spearman"]["with_true_area"]
    rho_text = ", ".join(f"{k} {v:.2f}" for k, v in rho.items())
    print(
        f"  rho(predicted, true area) {rho_text}; {weights_line(out['code_weight'], WEIGHTS)}",
        flush=True,
    )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", action="append", required=True, help="NAME=INDEX_DIR[@MANIFEST]")
    args = ap.parse_args(argv)
    started, info = time.time(), machine()
    results = {}
    for spec in args.index:
        name, index_dir, manifest = split_spec(spec)
        print(f"{name}: {index_dir}", flush=True)
        results[name] = score_index(index_dir, manifest or None)
    finish("extent_head", info, {"weights": list(WEIGHTS), "phantoms": results}, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
