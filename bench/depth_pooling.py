"""Is lesion size out of reach of pooling? (issue 16's size ratio <= 0.5)

bench/depth.py found every training variant's size ratio at 0.77-0.97 (1 = neighbours no
closer in lesion size than random same-label cases). This script asks whether another
*retrieval vector of the same model* could do better, up to one no model could build: the
feature maps of three blocks (backbone.features.2 / .4 / .6 of the compact backbone: 32, 16
and 8 cells a side at 128 px) pooled over

* ``uniform``: every cell alike;
* ``gradcam``: the predicted class's Grad-CAM, resized to the block's grid (what the index's
  saliency weighting does at the last block);
* ``lesion_mask``: the phantom's ground-truth lesion mask, resized to the grid (an oracle:
  the features of the lesion and nothing else);

each unit-normalised (keys ``POOLING_blockB``), and the three blocks concatenated
(``POOLING_all``); and the index's own vector (``index_embedding``, the saliency-weighted
projection) with and without a within-class whitening fitted on the index
(``index_embedding_whitened``: each direction divided by the square root of its within-class
variance plus 1e-3 of the largest, as in PCA-whitening for retrieval, Jégou & Chum 2012; the
shrinkage was picked among 0, 1e-4, 1e-3 and 1e-2 on the chest model); scored with bench/depth.py's
``depth_metrics`` (test queries against train+val, own patient excluded) and its within-class
ridge probe of size (R^2: is size in the vector at all?).

    casebase phantom P --modality xray --n 600 --seed 21 && casebase train P/manifest.csv --out M
    .venv/bin/python bench/depth_pooling.py --model chest=M@P/manifest.csv [--model photo=...]

Results to bench/results/depth_pooling.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import finish, machine  # noqa: E402
from depth import _metrics_from_frames, size_probe  # noqa: E402

BLOCKS = (2, 4, 6)
POOLINGS = ("uniform", "gradcam", "lesion_mask")
EXP = "/work/artifacts/exp16"
DEFAULT_MODELS = {
    "chest": f"{EXP}/chest_model@{EXP}/chest_phantom/manifest.csv",
    "photo": f"{EXP}/photo_model@{EXP}/photo_phantom/manifest.csv",
}


def pooled_vectors(model_dir: str, manifest_path: str):
    """(gallery frame, gallery vectors, query frame, query vectors), vectors keyed by
    (pooling, block), and the index's own embedding under "index_embedding", all from one
    decode and one forward per image."""
    import torch
    import torch.nn.functional as F

    from retrieval.data.imageio import read_mask
    from retrieval.data.manifest import load_manifest
    from retrieval.model.dataset import iter_decoded
    from retrieval.model.network import load_model
    from retrieval.model.preprocess import Preprocessor

    torch.set_num_threads(1)
    man = load_manifest(manifest_path)
    model = load_model(model_dir).eval()
    pre = Preprocessor(model.config)
    acts: dict[int, torch.Tensor] = {}
    hooks = [
        model.backbone.features[b].register_forward_hook(
            lambda _m, _i, o, b=b: acts.__setitem__(b, o.detach())
        )
        for b in BLOCKS
    ]

    def collect(splits):
        df = man.select(splits).reset_index(drop=True)
        paths = [str(man.resolve(p)) for p in df["image"]]
        out = {(p, b): [] for p in POOLINGS for b in BLOCKS}
        out["index_embedding"] = []  # the saliency-weighted embedding the index holds
        ok = []
        with torch.no_grad():
            for idx, batch, _ in iter_decoded(paths, pre, progress=False):
                if batch is None:
                    continue
                f = model.backbone(pre.normalize(batch))
                cam = model.gradcam(f, model.classifier(model.pool(f)).argmax(1))
                out["index_embedding"].append(model.embed_features(f, model.saliency_weights(cam)))
                cam = cam[:, None]
                s = model.config.image_size
                masks = torch.stack(
                    [
                        torch.from_numpy(read_mask(man.resolve(df["mask"][j])).astype(np.float32))
                        for j in idx
                    ]
                )[:, None]
                masks = F.interpolate(masks, size=(s, s), mode="area")
                for b in BLOCKS:
                    a = acts[b]
                    grid = a.shape[2:]
                    weights = {
                        "uniform": torch.ones(a.shape[0], grid.numel()),
                        "gradcam": F.interpolate(cam, size=grid, mode="bilinear").flatten(1),
                        "lesion_mask": F.adaptive_avg_pool2d(masks, grid).flatten(1),
                    }
                    for p, w in weights.items():
                        w = w / w.sum(1, keepdim=True).clamp_min(1e-12)
                        out[p, b].append(torch.einsum("bn,bcn->bc", w, a.flatten(2)))
                ok += idx
        vecs = {k: F.normalize(torch.cat(v), dim=1).numpy() for k, v in out.items()}
        return df.iloc[ok].reset_index(drop=True), vecs

    try:
        g_df, g = collect(["train", "val"])
        q_df, q = collect(["test"])
    finally:
        for h in hooks:
            h.remove()
    return g_df, g, q_df, q


def whiten(g: np.ndarray, q: np.ndarray, labels: np.ndarray, shrink: float = 1e-3):
    """Within-class PCA-whitening fitted on the gallery, applied to both, unit-normalised."""
    res = g.astype(np.float64).copy()
    for c in np.unique(labels):
        res[labels == c] -= res[labels == c].mean(0)
    var, vec = np.linalg.eigh(res.T @ res / len(res))
    t = vec / np.sqrt(np.clip(var, 0.0, None) + shrink * var.max())
    mu = g.mean(0)
    gw, qw = (g - mu) @ t, (q - mu) @ t
    return (
        gw / np.linalg.norm(gw, axis=1, keepdims=True),
        qw / np.linalg.norm(qw, axis=1, keepdims=True),
    )


def score(g_df, g_vec, q_df, q_vec) -> dict:
    m = _metrics_from_frames(q_df, q_vec, g_df, g_vec)
    m["size_probe_r2"] = size_probe(g_df, g_vec, q_df, q_vec)
    return m


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="LABEL=MODEL_DIR@MANIFEST (repeatable)")
    ap.add_argument("--name", default="depth_pooling")
    args = ap.parse_args(argv)
    models = dict(m.split("=", 1) for m in args.model) if args.model else DEFAULT_MODELS
    info, started = machine(), time.time()
    results = {}
    for label, spec in models.items():
        model_dir, _, manifest = spec.partition("@")
        g_df, g, q_df, q = pooled_vectors(model_dir, manifest)
        rows = {}
        for p in POOLINGS:
            for b in BLOCKS:
                rows[f"{p}_block{b}"] = score(g_df, g[p, b], q_df, q[p, b])
            cat = [np.hstack([v[p, b] for b in BLOCKS]) / np.sqrt(len(BLOCKS)) for v in (g, q)]
            rows[f"{p}_all"] = score(g_df, cat[0], q_df, cat[1])
        ge, qe = g["index_embedding"], q["index_embedding"]
        rows["index_embedding"] = score(g_df, ge, q_df, qe)
        gw, qw = whiten(ge, qe, g_df["label"].to_numpy())
        rows["index_embedding_whitened"] = score(g_df, gw, q_df, qw)
        results[label] = {"model": model_dir, "manifest": manifest, "vectors": rows}
        for k, m in rows.items():
            print(
                f"{label} {k}: P@5 {m['precision_at_5']:.3f} size ratio {m['size_ratio']:.2f} "
                f"probe R2 {m['size_probe_r2']:.2f}",
                flush=True,
            )
    finish(
        args.name, info, {"args": vars(args), "blocks": list(BLOCKS), "models": results}, started
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
