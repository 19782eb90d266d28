"""Concept activation vectors (Kim et al. 2018) at intermediate blocks of the backbone.

Which layers: the classifier is linear on the average-pooled last map, so at the
last block ∂logit_c/∂F = W_c / hw for every input and a TCAV score there can only
be 0 or 1. The candidates are therefore earlier blocks (`candidate_layers`); each
is reported, and the default is the one chosen by measurement (bench/concepts.py).

Hand-written, and why: captum's TCAV keeps its CAVs with torch.save (a pickle,
which casebase never loads) and runs one forward per target and per layer; here
one forward through the head of the backbone and one through its tail serve every
target (class logits and similarity to each class's cases), because the backbone
is an nn.Sequential that splits at any block. The TCAV test (tcav.py) uses "pattern"
CAVs, the difference of mean activations, chosen by measurement; `fit_cav` (scikit-learn's
linear SGD classifier, as in Kim et al.'s reference code) is kept for that comparison
(bench/concepts.py, part variants).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.model_selection import cross_val_score, train_test_split

from retrieval.errors import CasebaseError

PREFIX = "backbone.features."
# block indices tested by default, per backbone (the last block is excluded: see above)
_CANDIDATES = {"compact": (2, 4, 5), "resnet18": (5, 6)}


def candidate_layers(model) -> list[str]:
    n = len(model.backbone.features)
    idx = _CANDIDATES.get(model.config.backbone, tuple(range(max(0, n - 4), n - 1)))
    return [f"{PREFIX}{i}" for i in idx if i < n - 1]


def layer_index(model, name: str) -> int:
    text = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    n = len(model.backbone.features)
    if not text.isdigit() or not 0 <= int(text) < n:
        raise CasebaseError(
            f"--layer {name!r}: not a block of this backbone (use {PREFIX}0 .. {PREFIX}{n - 1}; "
            f"tested by default: {', '.join(candidate_layers(model))})"
        )
    if int(text) == n - 1:
        raise CasebaseError(
            f"--layer {name!r} is the last block: the classifier is linear on its pooled map, "
            "so a TCAV score there can only be 0 or 1; choose an earlier block"
        )
    return int(text)


def layer_shape(model, index: int) -> tuple[int, ...]:
    size = model.config.image_size
    with torch.no_grad():
        x = torch.zeros((1, model.config.in_channels, size, size), device=_device(model))
        return tuple(model.backbone.features[: index + 1](x).shape[1:])


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def activations(
    model, indices: list[int], x: torch.Tensor, batch: int = 64
) -> dict[int, np.ndarray]:
    """Flattened activations (N, C·h·w) after each block in `indices`, one forward per batch."""
    feats = model.backbone.features
    last = max(indices)
    out: dict[int, list[np.ndarray]] = {i: [] for i in indices}
    dev = _device(model)
    for s in range(0, len(x), batch):
        h = x[s : s + batch].to(dev)
        for i in range(last + 1):
            h = feats[i](h)
            if i in out:
                out[i].append(h.flatten(1).float().cpu().numpy())
    return {i: np.concatenate(v) if v else np.zeros((0, 0), np.float32) for i, v in out.items()}


def target_gradients(
    model,
    index: int,
    x: torch.Tensor,
    class_idx: int,
    class_mean: np.ndarray,
    weighting: str,
    batch: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-input gradients at block `index` of (the class's centred logit z_c - mean_k z_k,
    the similarity to the class).

    The similarity target is e(x) · m_c with m_c the mean of the class's indexed embeddings:
    the mean cosine similarity of the query to the cases of class c, computed exactly as
    retrieval embeds (same pooling weights, detached as in CaseNet.run).
    """
    feats = model.backbone.features
    dev = _device(model)
    mean = torch.as_tensor(class_mean, dtype=torch.float32, device=dev)
    g_logit, g_sim = [], []
    for s in range(0, len(x), batch):
        with torch.no_grad():
            a = feats[: index + 1](x[s : s + batch].to(dev))
        a = a.detach().requires_grad_(True)
        f = feats[index + 1 :](a)
        logits = model.classifier(f.mean(dim=(2, 3)))
        if weighting == "saliency":
            w = model.saliency_weights(model.gradcam(f, logits.argmax(dim=1)).detach())
        else:
            h, ww = f.shape[-2:]
            w = f.new_full((f.shape[0], h, ww), 1.0 / (h * ww))
        sim = model.embed(f, w) @ mean
        # the centred logit: softmax ignores a shift common to every class, so a concept that
        # raises all logits alike changes no probability (bench/concepts.py, part variants)
        centred = logits[:, class_idx] - logits.mean(dim=1)
        (gl,) = torch.autograd.grad(centred.sum(), a, retain_graph=True)
        (gs,) = torch.autograd.grad(sim.sum(), a)
        g_logit.append(gl.flatten(1).cpu().numpy())
        g_sim.append(gs.flatten(1).cpu().numpy())
    return np.concatenate(g_logit), np.concatenate(g_sim)


@dataclass
class CAV:
    direction: np.ndarray  # (D,) unit vector pointing towards the concept
    accuracy: float  # held-out accuracy of concept vs counterexamples


def fit_cav(pos: np.ndarray, neg: np.ndarray, seed: int = 0) -> CAV:
    """Linear SGD classifier (hinge, alpha 0.01: Kim et al.'s settings), 1/3 held out for accuracy."""
    x = np.concatenate([pos, neg]).astype(np.float32)
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=1 / 3, stratify=y, random_state=seed)
    clf = SGDClassifier(alpha=0.01, max_iter=1000, tol=1e-3, random_state=seed)
    clf.fit(xtr, ytr)
    coef = clf.coef_[0].astype(np.float64)
    norm = np.linalg.norm(coef)
    direction = coef / norm if norm > 0 else coef
    # accuracy of the direction itself: SGD's intercept settles poorly on ~70 samples, so the
    # threshold is the midpoint of the two classes' mean projections on the training part
    ptr, pte = xtr @ direction, xte @ direction
    cut = (ptr[ytr == 1].mean() + ptr[ytr == 0].mean()) / 2
    return CAV(direction.astype(np.float32), float(((pte > cut) == (yte == 1)).mean()))


def embedding_direction(concept: np.ndarray, others: np.ndarray, seed: int = 0) -> CAV:
    """The concept's direction in embedding space: logistic regression on the L2-normalised
    embeddings (concept vs random cases), cross-validated accuracy. This is the space retrieval
    searches, so a query moved along it changes exactly the cosine it is ranked by."""
    x = np.concatenate([concept, others]).astype(np.float64)
    y = np.r_[np.ones(len(concept)), np.zeros(len(others))]
    clf = LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced")
    folds = int(min(5, np.bincount(y.astype(int)).min()))
    acc = (
        float(cross_val_score(clf, x, y, cv=folds, scoring="balanced_accuracy").mean())
        if folds >= 2
        else float("nan")
    )
    clf.fit(x, y)
    coef = clf.coef_[0]
    norm = np.linalg.norm(coef)
    return CAV((coef / norm if norm > 0 else coef).astype(np.float32), acc)
