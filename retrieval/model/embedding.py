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
    return torch.nn.functional.normalize(features.float().mean(dim=(2, 3)), dim=1)


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
) -> EmbeddedSet:
    model.eval()
    vecs, probs, oods, ok, failures = [], [], [], [], []
    for idx, batch, fails in iter_decoded(
        paths,
        pre,
        batch_size=batch_size,
        strict=strict,
        progress=progress,
        desc=desc,
        num_workers=num_workers,
    ):
        failures += fails
        if batch is None:
            continue
        v, p, o = embed_tensor(model, pre.normalize(batch.to(device)), weighting)
        vecs.append(v)
        probs.append(p)
        oods.append(o)
        ok += idx
    d, k = model.config.embedding_dim, len(model.config.classes)
    return EmbeddedSet(
        np.concatenate(vecs) if vecs else np.zeros((0, d), np.float32),
        np.concatenate(probs) if probs else np.zeros((0, k), np.float32),
        ok,
        np.concatenate(oods) if oods else None,
        failures,
    )
