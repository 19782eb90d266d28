"""Layer-wise relevance propagation with zennit.

lrp     zennit's ``EpsilonPlusFlat`` composite (Montavon et al. 2019, "LRP: an
        overview": ε for dense layers, z⁺ for convolutions, the flat rule for the
        first layer) on the canonical model (``canonical``): BatchNorm folded into
        the convolutions (zennit's ``MergeBatchNorm``), each residual addition a
        zennit ``Sum`` layer, which the composite gives the ``Norm`` rule (relevance
        split in proportion to each branch's contribution, zennit's
        ``ResNetCanonizer``), ReLUs pass relevance unchanged.

The head is linear in the last feature map F once the embedding's norm is held
fixed, so its relevance is exact and needs no rule: for a class row
R_kij = W_ck F_kij / hw (sums to the logit minus its bias); for a similarity row
R_kij = w_ij F_kij (Pᵀ e_other)_k / ‖P p‖ (sums to the similarity; the
channel-resolved version of the similarity decomposition). zennit propagates R
from F to the pixels; the map is the relevance summed over channels (signed).
Conservation is not exact: the folded BatchNorm gives every conv a bias, which
z⁺ does not pass on, and z⁺ drops negative contributions; on a random-init tiny
model the map summed to 34 % of the similarity it explains (the tests check the
head's relevance sums exactly, and the whole map against zennit's own
ResNetCanonizer on a torchvision BasicBlock backbone).
"""

from __future__ import annotations

import math

import torch

from retrieval.explain.methods import channel_sum
from retrieval.explain.registry import explained_class_weights


def head_relevance(model, features: torch.Tensor, target) -> torch.Tensor:
    """(B, C, h, w) relevance of the explained score at the last feature map ((B, C, d, h, w)
    for a volume model)."""
    b, c, *spatial = features.shape
    n = math.prod(spatial)
    grid = (1,) * len(spatial)
    rows = explained_class_weights(model, target.classes)  # W_c (- W_ref: explained_logits)
    cam = rows.view(b, c, *grid) * features / n
    w = _pool_weights(model, features, target.weighting)  # (B, *spatial)
    pooled = (w[:, None] * features).flatten(2).sum(-1)
    norm = model.projection(pooled).norm(dim=1).clamp_min(1e-12)
    others = target.others.to(features.dtype)
    extent = getattr(model, "has_extent", False)
    if extent:
        c2 = float(model.config.extent_weight) ** 2
        code_rel = _extent_relevance(model, features, w, others[:, -2:])
        others = others[:, :-2] / math.sqrt(1.0 + c2)
    back = others @ model.projection.weight  # (B, C): Pᵀ e_other
    sim = w[:, None] * features * back.view(b, c, *grid) / norm.view(b, 1, *grid)
    if extent:
        sim = sim + code_rel
    return torch.where((target.classes >= 0).view(b, 1, *grid), cam, sim)


def _extent_relevance(model, features, weights, other_code) -> torch.Tensor:
    """(B, C, *spatial) relevance of the extent code's term code_q · code_other: over cells as
    the similarity decomposition splits it (by the predicted lesion shares), within a cell over
    channels by the z⁺ rule on the extent head's 1 x 1 convolution (each channel's positive
    contribution to the cell's lesion logit; evenly where none is positive)."""
    from retrieval.explain.similarity import extent_allocation
    from retrieval.model import extent

    b, c = features.shape[:2]
    frac = model.lesion_fraction(features)  # (B, *spatial)
    code = extent.code(model.extent_angle(frac), model.config.extent_weight)
    term = (code.to(features.dtype) * other_code).sum(1)  # (B,)
    alloc = extent_allocation(frac, weights).to(features.dtype).view(frac.shape)
    u = model.extent_head.weight.view(1, c, *(1,) * (features.ndim - 2)).to(features.dtype)
    zp = (u * features).clamp_min(0)
    total = zp.sum(1, keepdim=True)
    zp = torch.where(total > 0, zp / total.clamp_min(1e-12), torch.full_like(zp, 1.0 / c))
    return term.view(b, *(1,) * (features.ndim - 1)) * alloc[:, None] * zp


def _pool_weights(model, features, weighting):
    spatial = tuple(range(2, features.ndim))
    if weighting == "uniform":
        n = features[0, 0].numel()
        return features.new_full((features.shape[0], *features.shape[2:]), 1.0 / n)
    logits = model.classifier(features.mean(dim=spatial))
    return model.saliency_weights(model.gradcam(features, logits.argmax(1)))


class LRP:
    name, expensive = "lrp", False

    def __init__(self, epsilon: float = 1e-6):
        self.epsilon = epsilon

    def attribute(self, model, inputs, target):
        from zennit.composites import EpsilonPlusFlat

        from retrieval.errors import CasebaseError
        from retrieval.explain.methods.canonical import canonical_model
        from retrieval.explain.registry import _grad_mode, _prepare

        canon = canonical_model(model)
        p = _prepare(canon, inputs, target)
        if p.target is None:
            raise CasebaseError("lrp explains a class logit or a similarity")
        composite = EpsilonPlusFlat(epsilon=self.epsilon)
        with _grad_mode():
            x = inputs.detach().clone().requires_grad_(True)
            with composite.context(canon.backbone):
                feats = canon.backbone(x)
                rel = head_relevance(canon, feats.detach(), p.target)
                (grad,) = torch.autograd.grad(feats, x, grad_outputs=rel)
        return channel_sum(grad)
