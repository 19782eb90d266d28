"""Batched saliency-weighted embedding of many images (index builds, eval, audit).

One forward per batch gives logits, the Grad-CAM of the predicted class (in
closed form, see retrieval.model.network) and the pooled embedding: saliency
weighting costs one extra (C × h·w) product per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from retrieval.model.dataset import Failure, iter_decoded
from retrieval.model.network import CaseNet
from retrieval.model.preprocess import Preprocessor


@dataclass
class EmbeddedSet:
    vectors: np.ndarray  # (N_ok, D) float32, unit norm
    probabilities: np.ndarray  # (N_ok, K) float32
    ok: list[int]  # positions in the input list that were embedded
    ood_features: np.ndarray | None = (
        None  # (N_ok, C) unit-norm average-pooled features (OOD score)
    )
    failures: list[Failure] = field(default_factory=list)
    # With cells=True (index builds): what the region index stores (index.region_index)
    cells: np.ndarray | None = None  # (N_ok, h*w, D) float32: P·F per feature-map cell (d*h*w)
    cell_weights: np.ndarray | None = None  # (N_ok, h*w) float32 pooling weights
    sizes: np.ndarray | None = None  # (N_ok, 2) int32 original (H, W); (N_ok, 3) (D, H, W)
    grid: tuple[int, ...] | None = None
    # with an extent head (CaseNet.has_extent): (N_ok, h*w) predicted lesion share per cell
    lesion_fractions: np.ndarray | None = None
    # With fingerprints=True (index builds): index.fingerprints, from the same decode
    pixel_sha256: np.ndarray | None = None  # (N_ok, 32) uint8
    pixel_thumbs: np.ndarray | None = None  # (N_ok, T) float16


@torch.no_grad()
def embed_tensor(model: CaseNet, batch: torch.Tensor, weighting: str):
    """(embeddings, probabilities, OOD features) of one normalised batch, one forward."""
    out = model.run(batch, weighting)
    return (
        out.embedding.float().cpu().numpy(),
        out.logits.float().softmax(1).cpu().numpy(),
        ood_features(out.features).cpu().numpy(),
    )


def ood_features(features: torch.Tensor) -> torch.Tensor:
    """Unit-norm global-average-pooled feature map: the space the OOD score searches."""
    return torch.nn.functional.normalize(features.float().flatten(2).mean(dim=2), dim=1)


def embed_paths(
    model: CaseNet,
    pre: Preprocessor,
    paths: Sequence[str],
    weighting: str = "saliency",
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    strict: bool = False,
    progress: bool = True,
    desc: str = "embedding",
    num_workers: int | None = None,
    cells: bool = False,
    fingerprints: bool = False,
) -> EmbeddedSet:
    """cells: also keep every image's projected feature cells and pooling weights (the region
    index), taken from the same forward pass: no image is decoded or encoded twice.
    fingerprints: also keep every image's pixel fingerprint (index.fingerprints)."""
    model.eval()
    vecs, probs, oods, ok, failures = [], [], [], [], []
    zs, ws, fr, sizes = [], [], [], {}
    grid = None
    fps: dict | None = {} if fingerprints else None
    for idx, batch, fails in iter_decoded(
        paths,
        pre,
        batch_size=batch_size,
        strict=strict,
        progress=progress,
        desc=desc,
        num_workers=num_workers,
        sizes=sizes,  # original shapes: the region index and the image_shape attribute
        fingerprints=fps,
    ):
        failures += fails
        if batch is None:
            continue
        if cells:
            with torch.no_grad():
                out = model.run(pre.normalize(batch.to(device)), weighting)
            vecs.append(out.embedding.float().cpu().numpy())
            probs.append(out.logits.float().softmax(1).cpu().numpy())
            oods.append(ood_features(out.features).cpu().numpy())
            zs.append(cell_vectors(model, out.features))
            ws.append(out.weights.float().flatten(1).cpu().numpy())
            if out.lesion_fraction is not None:
                fr.append(out.lesion_fraction.float().flatten(1).cpu().numpy())
            grid = tuple(out.features.shape[2:])
        else:
            v, p, o = embed_tensor(model, pre.normalize(batch.to(device)), weighting)
            vecs.append(v)
            probs.append(p)
            oods.append(o)
        ok += idx
    d, k = model.config.output_dim, len(model.config.classes)
    res = EmbeddedSet(
        np.concatenate(vecs) if vecs else np.zeros((0, d), np.float32),
        np.concatenate(probs) if probs else np.zeros((0, k), np.float32),
        ok,
        np.concatenate(oods) if oods else None,
        failures,
    )
    if cells and zs:
        res.cells = np.concatenate(zs)
        res.cell_weights = np.concatenate(ws)
        res.lesion_fractions = np.concatenate(fr) if fr else None
        res.grid = grid
    if ok:
        res.sizes = np.array([sizes[i] for i in ok], np.int32).reshape(len(ok), -1)
    if fps is not None and ok:
        from index.fingerprints import pack

        packed = [pack(*fps[i]) for i in ok]
        res.pixel_sha256 = np.stack([p[0] for p in packed])
        res.pixel_thumbs = np.stack([p[1] for p in packed])
    return res


@torch.no_grad()
def cell_vectors(model: CaseNet, features: torch.Tensor) -> np.ndarray:
    """(B, C, *grid) feature maps -> (B, cells, D) float32 P·F per cell (the decomposition's
    factors; cells = h*w, or d*h*w voxels of a feature volume)."""
    z = torch.einsum("dc,bcn->bnd", model.projection.weight, features.float().flatten(2))
    return z.cpu().numpy().astype(np.float32)
