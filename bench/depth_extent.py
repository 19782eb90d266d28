"""Could the model's own saliency say how big the lesion is? (issue 16's size ratio <= 0.5)

bench/depth_pooling.py showed that no pooling of a default-trained model's features, not
even the ground-truth lesion mask, orders same-label neighbours by lesion size (oracle 0.54
chest, 0.72 photo). A mean over cells keeps what the lesion looks like, not how many cells it
covers. This script tries the other route: an *extent* estimate per image, appended to the
index's embedding as a two-dimensional code on a quarter circle,

    v = [e, c * (cos t, sin t)] / sqrt(1 + c^2),   t = pi/2 * (rank of the extent among the index's),

so that cosine(v, v') = (e . e' + c^2 cos(t - t')) / (1 + c^2): the appearance similarity
plus an agreement in extent, both readable, vectors still unit-norm for FAISS. Extents:

* ``pr@B`` / ``half@B``: the participation ratio (effective number of cells, 1 / sum w^2) and
  the share of cells above half the maximum of the predicted class's Grad-CAM (``gc``) or
  LayerCAM (``lc``, Jiang et al. 2021: positive gradients x activations, cell by cell) at
  backbone block B (2, 4: 32 and 16 cells a side at 128 px; 6: the index's own Grad-CAM);
* ``oracle``: the phantom's true lesion size (what no model has: the ceiling of the code).

For each it reports the within-class Spearman correlation with lesion size on the index, and
the size ratio and P@5 (bench/depth.py's ``depth_metrics``) with c = 0.5, 1, 2.

    casebase phantom P --modality xray --n 600 --seed 21 && casebase train P/manifest.csv --out M
    .venv/bin/python bench/depth_extent.py --model chest=M@P/manifest.csv [--model photo=...]

Results to bench/results/depth_extent.json.
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

BLOCKS = (2, 4, 6)
WEIGHTS = (0.5, 1.0, 2.0)


def weight_key(c: float) -> str:
    """c0_5, c1, c2: JSON keys without a dot (bench.report's figure paths split on dots)."""
    return f"c{c:g}".replace(".", "_")


def split_spec(spec: str) -> tuple[str, str, str]:
    """'NAME=PATH@MANIFEST' -> (NAME, PATH, MANIFEST or '')."""
    name, _, rest = spec.partition("=")
    path, _, manifest = rest.partition("@")
    return name, path, manifest


def weights_line(by_key: dict, weights=WEIGHTS) -> str:
    """'c 0.5: size 0.31 P@5 0.994; ...' of {weight_key(c): {size_ratio, precision_at_5}}."""
    return "; ".join(
        f"c {c:g}: size {by_key[weight_key(c)]['size_ratio']:.2f} "
        f"P@5 {by_key[weight_key(c)]['precision_at_5']:.3f}"
        for c in weights
    )


def extent_code(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(N, 2) points on a quarter circle: the angle is the value's rank among ``reference``."""
    t = np.searchsorted(np.sort(reference), values) / max(1, len(reference)) * np.pi / 2
    return np.stack([np.cos(t), np.sin(t)], 1)


def with_extent(e: np.ndarray, code: np.ndarray, c: float) -> np.ndarray:
    """The embedding with the extent code appended at weight c, unit-norm again."""
    return np.hstack([e, c * code]) / np.sqrt(1.0 + c * c)


def _extents(cam, prefix: str) -> dict:
    """Participation ratio and above-half-maximum share of each (B, h, w) map."""
    m = cam.flatten(1)
    w = m / m.sum(1, keepdim=True).clamp_min(1e-12)
    peak = m.max(1, keepdim=True).values.clamp_min(1e-12)
    return {
        f"{prefix}_pr": (1.0 / (w**2).sum(1).clamp_min(1e-12)).numpy(),
        f"{prefix}_half": (m >= 0.5 * peak).float().mean(1).numpy(),
    }


def extents_and_embeddings(model_dir: str, manifest_path: str):
    """(gallery frame, embeddings, extents), (query frame, ...): one forward and one backward
    per batch."""
    import torch
    import torch.nn.functional as F

    from retrieval.data.manifest import load_manifest
    from retrieval.model.dataset import iter_decoded
    from retrieval.model.network import load_model
    from retrieval.model.preprocess import Preprocessor

    torch.set_num_threads(1)
    man = load_manifest(manifest_path)
    model = load_model(model_dir).eval()
    pre = Preprocessor(model.config)
    acts: dict[int, torch.Tensor] = {}

    def hook(b):
        def keep(_m, _i, out):
            if out.requires_grad:
                out.retain_grad()
            acts[b] = out

        return keep

    hooks = [model.backbone.features[b].register_forward_hook(hook(b)) for b in BLOCKS]

    def collect(splits):
        df = man.select(splits).reset_index(drop=True)
        paths = [str(man.resolve(p)) for p in df["image"]]
        emb, ext, ok = [], {}, []
        for idx, batch, _ in iter_decoded(paths, pre, progress=False):
            if batch is None:
                continue
            x = pre.normalize(batch)
            feats = model.backbone(x)
            logits = model.classifier(model.pool(feats))
            model.zero_grad()
            logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
            for b in BLOCKS:
                a, g = acts[b].detach(), acts[b].grad.detach()
                maps = {
                    f"gc@{b}": F.relu((g.mean((2, 3), keepdim=True) * a).sum(1)),
                    f"lc@{b}": F.relu((F.relu(g) * a).sum(1)),
                }
                for name, cam in maps.items():
                    for k, v in _extents(cam, name).items():
                        ext.setdefault(k, []).append(v)
            with torch.no_grad():
                emb.append(model.run(x, "saliency").embedding.numpy())
            ok += idx
        return (
            df.iloc[ok].reset_index(drop=True),
            np.concatenate(emb),
            {k: np.concatenate(v) for k, v in ext.items()},
        )

    try:
        return collect(["train", "val"]), collect(["test"])
    finally:
        for h in hooks:
            h.remove()


def within_class_spearman(values: np.ndarray, size: np.ndarray, labels: np.ndarray) -> dict:
    from scipy.stats import spearmanr

    out = {}
    for c in sorted(set(labels)):
        sel = (labels == c) & np.isfinite(size)
        if sel.sum() >= 5 and np.ptp(values[sel]) > 0:
            out[str(c)] = float(spearmanr(values[sel], size[sel])[0])
    return out


def score_model(model_dir: str, manifest_path: str) -> dict:
    (g_df, g, gx), (q_df, q, qx) = extents_and_embeddings(model_dir, manifest_path)
    g_size = g_df["lesion_size"].replace("", np.nan).astype(float).to_numpy()
    q_size = q_df["lesion_size"].replace("", np.nan).astype(float).to_numpy()
    fill = np.nanmedian(g_size)
    gx["oracle"], qx["oracle"] = np.nan_to_num(g_size, nan=fill), np.nan_to_num(q_size, nan=fill)
    base = _metrics_from_frames(q_df, q, g_df, g)
    out = {
        "index_embedding": {
            "precision_at_5": base["precision_at_5"],
            "size_ratio": base["size_ratio"],
        },
        "extents": {},
    }
    labels = g_df["label"].to_numpy()
    for name in gx:
        row = {"spearman_with_size": within_class_spearman(gx[name], g_size, labels)}
        gcode, qcode = extent_code(gx[name], gx[name]), extent_code(qx[name], gx[name])
        for c in WEIGHTS:
            m = _metrics_from_frames(q_df, with_extent(q, qcode, c), g_df, with_extent(g, gcode, c))
            row[weight_key(c)] = {
                "precision_at_5": m["precision_at_5"],
                "size_ratio": m["size_ratio"],
            }
        out["extents"][name] = row
        print(f"  {name:>12}: rho {row['spearman_with_size']}; {weights_line(row)}", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, help="NAME=MODEL_DIR@MANIFEST")
    args = ap.parse_args(argv)
    started, info = time.time(), machine()
    models = {}
    for spec in args.model:
        name, model_dir, manifest = split_spec(spec)
        print(f"{name}: {model_dir} on {manifest}", flush=True)
        models[name] = {
            "model": model_dir,
            "manifest": manifest,
            **score_model(model_dir, manifest),
        }
    finish("depth_extent", info, {"weights": list(WEIGHTS), "models": models}, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
