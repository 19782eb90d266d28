"""The lesion's extent: a head taught by the manifest's lesion masks, and its code in the embedding.

Why: label and instance training keep lesion size only in directions of little variance, so
same-label neighbours were no closer in size than random same-label cases (size ratio 0.78
chest, 0.76 photo; bench/depth_variants). Once an extent is known, two numbers appended to the
embedding order neighbours by it (ratio 0.07 with the true size, bench/depth_extent.py), but the
model's own saliency did not know it (best 0.69). So a model trained on a manifest with masks
learns it: a 1 x 1 convolution on the last feature map predicts, per feature cell, the share of
that cell the lesion covers (the mask's area fraction around the cell's centre: binary cross-
entropy, plus an L1 on the log of the whole image's lesion area so that nodules of a few pixels
count as much as masses). The predicted area A = mean of the cells' fractions becomes an angle

    t = pi/2 * (the rank of log A among the training lesions' log areas, interpolated)

and the embedding is  v = [e, c cos t, c sin t] / sqrt(1 + c^2),  so

    cosine(v, v') = (e . e' + c^2 cos(t - t')) / (1 + c^2):

how the cases look, plus how far apart their lesions' extents rank, both readable and still
unit-norm for FAISS. retrieval.explain.similarity splits the extent term over the two images'
lesion cells (each pair by the product of its predicted fractions), so the decomposition stays
exact and the matched regions that carry it are the lesions.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# Knots of the angle mapping: log-area quantiles of the training lesions.
N_KNOTS = 33
# A floor under every area (model-input pixels: an empty mask and a lesion of < 1/4 px agree).
AREA_FLOOR = 1e-4
# Weights: loss = LOSS_WEIGHT x (per-cell cross-entropy + AREA_LOSS_WEIGHT x log-area L1), next
# to the classification and metric losses. At 600 cases, seed 21 (bench/depth.py, variants
# extent_*): 1 x (BCE + 3 x L1) left the naevi's size unlearnt (photo size ratio 0.54); 2 x (BCE
# + 2 x L1) gave 0.26 chest, 0.36 photo at P@5 0.976 and 1.000.
AREA_LOSS_WEIGHT = 2.0
LOSS_WEIGHT = 2.0


def cell_targets(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, 1, S, S) masks in [0, 1] -> (B, h, w): the share of each feature cell's pixels (the
    pixels nearer its centre than any other cell's, retrieval.model.cells) inside the lesion."""
    s = masks.shape[-1] // grid[-1]
    pooled = F.avg_pool2d(masks.float(), s, stride=s, padding=s // 2, count_include_pad=False)
    return pooled[:, 0, : grid[0], : grid[1]]


def log_area(area: torch.Tensor) -> torch.Tensor:
    return torch.log(area.float().clamp_min(0.0) + AREA_FLOOR)


def fit_knots(areas: np.ndarray) -> list[float]:
    """N_KNOTS strictly increasing log-area quantiles of the training masks' areas."""
    q = np.quantile(np.log(np.clip(areas, 0.0, None) + AREA_FLOOR), np.linspace(0, 1, N_KNOTS))
    q = np.maximum.accumulate(q)
    return [float(v) for v in q + 1e-6 * np.arange(N_KNOTS)]


def angle(area: torch.Tensor, knots: list[float]) -> torch.Tensor:
    """(B,) areas -> (B,) angles in [0, pi/2]: the area's interpolated rank among the knots."""
    k = torch.tensor(knots, dtype=torch.float64, device=area.device)
    x = log_area(area).double().clamp(k[0], k[-1])
    i = torch.searchsorted(k, x).clamp(1, len(knots) - 1)
    lo, hi = k[i - 1], k[i]
    frac = ((x - lo) / (hi - lo).clamp_min(1e-12)).clamp(0.0, 1.0)
    rank = (i - 1 + frac) / (len(knots) - 1)
    return (rank * math.pi / 2).to(area.dtype if area.is_floating_point() else torch.float32)


def code(t: torch.Tensor, weight: float) -> torch.Tensor:
    """(B,) angles -> (B, 2): the last two entries of the index's vector, c (cos t, sin t) /
    sqrt(1 + c^2); the dot product of two codes is the extent term c^2 cos(t - t') / (1 + c^2)."""
    c = float(weight)
    return torch.stack([torch.cos(t), torch.sin(t)], 1) * (c / math.sqrt(1.0 + c * c))


def append_code(e: torch.Tensor, t: torch.Tensor, weight: float) -> torch.Tensor:
    """[e, c cos t, c sin t] / sqrt(1 + c^2) for unit-norm e: unit-norm again."""
    c = float(weight)
    return torch.cat([e / math.sqrt(1.0 + c * c), code(t, c).to(e.dtype)], 1)


def init_prior(head: torch.nn.Conv2d, masks: torch.Tensor) -> None:
    """Start the head at the training lesions' mean cell fraction p (bias logit(p), as focal
    loss's prior initialisation): at 0.5 everywhere, its first log-area errors (~3) would
    outweigh the classification and metric losses for the first epochs."""
    p = float(masks.float().mean() / 255.0) if len(masks) else 0.5
    p = min(max(p, 1e-3), 0.5)
    with torch.no_grad():
        head.bias.fill_(math.log(p / (1 - p)))


def extent_loss(
    fractions: torch.Tensor,
    targets: torch.Tensor,
    has_mask: torch.Tensor,
    area_weight: float = AREA_LOSS_WEIGHT,
) -> torch.Tensor:
    """Per-cell binary cross-entropy + area_weight x |log area - log true area|, over the
    cases with a mask (0 when there are none)."""
    if not bool(has_mask.any()):
        return fractions.sum() * 0.0
    f, t = fractions[has_mask].flatten(1).float(), targets[has_mask].flatten(1).float()
    bce = F.binary_cross_entropy(f.clamp(1e-6, 1 - 1e-6), t)
    area = (log_area(f.mean(1)) - log_area(t.mean(1))).abs().mean()
    return bce + area_weight * area
