"""Fill a query result's maps: the query's and every neighbour pair's, for each method.

For the query each method explains the predicted class logit; for a neighbour
it explains the similarity score between the query and that case, on both
images (the query image with the case's embedding held fixed, and the case
image with the query's embedding held fixed). One call of a method explains
all of these in one batch: row 0 is the query (class target), then the query
once per pair, then the cases (similarity targets).

Cost control: the expensive methods (lime, occlusion, integrated_gradients,
smoothgrad: tens to hundreds of forwards per image) explain only the top
``EXPENSIVE_NEIGHBORS`` neighbour pair(s) (default 1) besides the query; the
cheap ones (gradcam, gradient, similarity) explain every neighbour. Pass
``expensive_neighbors=`` to raise it.

``similarity``: the neighbour maps are the exact decomposition the service
already computed in ``match_regions`` (computed here only if missing); the
query-level map is the similarity-weighted mean (weights clipped at 0) of the
neighbours' query maps.

Every map is resized to its image's original (H, W), float32 and finite.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from retrieval.explain import registry
from retrieval.explain.registry import ScoreTarget, finite

EXPENSIVE_NEIGHBORS = 1


def weighted_query_map(maps: Sequence[np.ndarray], sims: Sequence[float]) -> np.ndarray:
    """Similarity-weighted mean of same-shaped maps (weights max(sim, 0); uniform if none positive)."""
    w = np.clip(np.asarray(sims, np.float64), 0.0, None)
    w = w / w.sum() if w.sum() > 0 else np.full(len(maps), 1.0 / len(maps))
    out = np.tensordot(w, np.stack([np.asarray(m, np.float64) for m in maps]), axes=1)
    return np.nan_to_num(out).astype(np.float32)


def pair_batch(q, cases: Sequence, weighting: str, predicted: int | None = None):
    """Inputs and ScoreTarget for [query (class)] + [query (sim to case j)] + [case j (sim to query)]."""
    n = len(cases)
    inputs = torch.stack([q.tensor] * (1 + n) + [c.tensor for c in cases])
    cls = [q.predicted if predicted is None else predicted] + [-1] * (2 * n)
    d = q.embedding.shape[-1]
    others = torch.stack(
        [torch.zeros(d, dtype=q.embedding.dtype, device=q.embedding.device)]
        + [c.embedding for c in cases]
        + [q.embedding] * n
    )
    return inputs, ScoreTarget(torch.tensor(cls, dtype=torch.long), others.float(), weighting)


def explain_query(
    retriever,
    q_ctx,
    neighbors,
    ctxs,
    methods,
    result,
    *,
    expensive_neighbors: int = EXPENSIVE_NEIGHBORS,
) -> None:
    """Fill ``result.maps[m]`` and ``neighbor.maps[m]`` for each method (see the module doc)."""
    methods = registry.check_names(methods)
    model, device, weighting = retriever.model, retriever.device, retriever.weighting
    model.eval()
    pairs = [(nb, c) for nb, c in zip(neighbors, ctxs, strict=True) if c is not None]
    for m in methods:
        if m == "similarity":
            _similarity(retriever, q_ctx, pairs, result)
            continue
        explainer = registry.get(m)
        n = min(len(pairs), expensive_neighbors) if explainer.expensive else len(pairs)
        sel = pairs[:n]
        inputs, target = pair_batch(q_ctx, [c for _, c in sel], weighting)
        maps = finite(explainer.attribute(model, inputs.to(device), target.to(device)))
        result.maps[m] = q_ctx.geometry.map_to_original(maps[0])
        for j, (nb, c) in enumerate(sel):
            nb.maps[m] = {
                "query": q_ctx.geometry.map_to_original(maps[1 + j]),
                "case": c.geometry.map_to_original(maps[1 + n + j]),
            }


def _similarity(retriever, q_ctx, pairs, result) -> None:
    for nb, c in pairs:
        if "similarity" not in nb.maps:
            retriever.match_regions(q_ctx, c, nb)
    if pairs:
        result.maps["similarity"] = weighted_query_map(
            [nb.maps["similarity"]["query"] for nb, _ in pairs], [nb.similarity for nb, _ in pairs]
        )
    else:  # no readable neighbour: fall back to the class activation map's decomposition
        inputs = q_ctx.tensor[None].to(retriever.device)
        target = ScoreTarget.for_classes(
            [q_ctx.predicted], q_ctx.embedding.shape[-1], retriever.weighting, device=inputs.device
        )
        cam = finite(registry.get("similarity").attribute(retriever.model, inputs, target))
        result.maps["similarity"] = q_ctx.geometry.map_to_original(cam[0])
