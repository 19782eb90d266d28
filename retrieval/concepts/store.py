"""Concept directions kept in the index bundle, and concept-refined search.

    INDEX_DIR/concepts/directions.npy   (K, D) float32, unit rows, embedding space
    INDEX_DIR/concepts/concepts.json    {"names": [...], "concepts": {NAME: {...}}}

Both are written with index.bundle.update, so bundle.json's checksums cover them.

Refinement: the direction is the concept's CAV in embedding space (logistic
regression on the indexed-style embeddings), not a layer CAV mapped through the
projection, because the projection acts on the pooled last map only, while TCAV's
layers sit earlier. A weight w scales the query's component along the direction
by (1 + w):  q' = q + w (q·v) v, renormalised. Inner products with every case
change by w (q·v)(x·v): w = -1 drops the concept's part of every similarity, -2
ranks cases with the opposite concept value first, +1 doubles it. Several
concepts are orthogonalised in the order given so their weights do not interact.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from retrieval.errors import BundleError, CasebaseError

DIR = "concepts"
NPY = f"{DIR}/directions.npy"
META = f"{DIR}/concepts.json"
MAX_WEIGHT = 5.0


def stored_concepts(index_dir: str | Path) -> dict[str, dict]:
    """{NAME: info} of the concepts stored in a bundle ({} when none): what an app slider lists."""
    path = Path(index_dir) / META
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
        return dict(meta["concepts"])
    except (ValueError, KeyError, TypeError) as err:
        raise BundleError(f"{path}: not a valid concepts file ({err})") from None


def load_directions(index_dir: str | Path) -> dict[str, np.ndarray]:
    root = Path(index_dir)
    info = stored_concepts(root)
    if not info:
        return {}
    try:
        arr = np.load(root / NPY, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise BundleError(f"{root / NPY}: cannot read ({err})") from None
    out = {}
    for name, v in info.items():
        row = int(v["row"])
        if not 0 <= row < len(arr):
            raise BundleError(f"{root / META}: concept {name!r} points past {NPY}")
        out[name] = arr[row].astype(np.float32)
    return out


def store(index_dir: str | Path, result) -> list[str]:
    """Add (or replace) the result's concepts in the bundle, atomically; returns stored names."""
    from index import bundle

    root = Path(index_dir)
    info = stored_concepts(root)
    dirs = load_directions(root)
    data = result.to_json()["concepts"]
    for name, c in result.concepts.items():
        dirs[name] = c.embedding_direction.astype(np.float32)
        v = data[name]
        info[name] = {
            "spec": c.spec if c.kind == "attribute" else Path(c.spec).name,
            "kind": c.kind,
            "n_images": c.n_images,
            "direction": "embedding-space CAV (logistic regression)",
            "embedding_accuracy": v["embedding_accuracy"],
            "layer": v["layer"],
            "cav_accuracy": v["cav_accuracy"],
            "significant_classes": [k for k, t in v["classes"].items() if t["significant"]],
            "significant_similarity": [k for k, t in v["similarity"].items() if t["significant"]],
        }
    names = sorted(info)
    for i, n in enumerate(names):
        info[n]["row"] = i
    arr = np.stack([dirs[n] for n in names]).astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    meta = {"format_version": 1, "names": names, "concepts": info}
    bundle.update(root, files={NPY: buf.getvalue(), META: bundle.canonical_json(meta)})
    return names


def parse_weights(items: list[str]) -> dict[str, float]:
    """['ruler=-1', ...] -> {'ruler': -1.0} with one-line errors."""
    from retrieval.concepts.sources import parse_assignment

    out = {}
    for item in items:
        name, value = parse_assignment(item, "NAME=WEIGHT (e.g. ruler=-1)")
        try:
            out[name] = float(value)
        except ValueError:
            raise CasebaseError(f"--concept {item!r}: WEIGHT must be a number") from None
    return out


def refine(vec: np.ndarray, directions: dict[str, np.ndarray], weights: dict[str, float]):
    """Move (N, D) or (D,) query embeddings along stored concepts (see module doc)."""
    unknown = [n for n in weights if n not in directions]
    if unknown:
        have = ", ".join(sorted(directions)) or "none; run casebase concepts --store"
        raise CasebaseError(f"unknown concept {unknown[0]!r} (stored: {have})")
    q = np.atleast_2d(np.asarray(vec, np.float64)).copy()
    basis: list[np.ndarray] = []
    for name, w in weights.items():
        if not np.isfinite(w) or abs(w) > MAX_WEIGHT:
            raise CasebaseError(f"concept weight {name}={w}: use a number in [-5, 5]")
        v = directions[name].astype(np.float64)
        if v.shape[0] != q.shape[1]:
            raise BundleError(
                f"concept {name!r}: direction has {v.shape[0]} dims, embedding {q.shape[1]}"
            )
        for b in basis:
            v = v - (v @ b) * b
        norm = np.linalg.norm(v)
        if norm < 1e-6:
            continue  # already spanned by the concepts before it
        v = v / norm
        basis.append(v)
        q = q + w * (q @ v)[:, None] * v[None]
    q /= np.clip(np.linalg.norm(q, axis=1, keepdims=True), 1e-12, None)
    q = q.astype(np.float32)
    return q[0] if np.ndim(vec) == 1 else q


def refine_embedding(index_dir: str | Path, embedding, weights: dict[str, float]):
    """CaseRetriever.query's hook: the (D,) torch embedding moved along stored concepts."""
    import torch

    dirs = load_directions(index_dir)
    if not dirs:
        raise CasebaseError(
            f"{index_dir}: no concepts stored; run casebase concepts INDEX_DIR --concept "
            "NAME=SPEC --store first"
        )
    vec = embedding.detach().float().cpu().numpy()
    return torch.from_numpy(refine(vec, dirs, weights)).to(embedding.device)
