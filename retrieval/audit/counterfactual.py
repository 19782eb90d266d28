"""Is retrieval matching on the lesion or on its context? (queries with lesion masks)

**Where the similarity comes from.** For each query and each of its top-5
neighbours (own patient excluded), the exact decomposition
(`retrieval.explain.similarity.decompose`) splits the cosine similarity into
query-cell × case-cell terms on the model's feature grid. Keeping the
positive terms, a cell's mass is its row (query) or column (case) sum; the
lesion mask is mapped onto the same grid as the fraction of each cell's area
inside the lesion. ``query`` / ``case`` = share of the positive mass inside
the lesion (summed over the 5 neighbours, then averaged over queries; case
side over neighbours that have a mask). ``lesion_area_*`` is the lesion's
share of the image area: what a map spread evenly over the image would give,
so ``enrichment`` = share / area > 1 means the similarity concentrates on the
lesion.

**Masked retrieval.** Each query is searched again (a) with the lesion
removed: the mask, dilated by 2 % of the image side, filled with the local
background (a normalised-convolution Gaussian blur of the surrounding pixels,
σ = the lesion's equivalent radius), and (b) with the background removed:
everything outside the dilated mask set to the mean of the removed pixels.
Reported: precision@5 of the original, lesion-removed and
background-removed queries against the unchanged index, the chance level
(label prevalence in the index), and each attribute's concordance under each
condition. If labels survive removing the lesion, retrieval matches on
context; if an attribute's concordance rises when the lesion is gone,
retrieval falls back on that attribute.

At most ``max_queries`` (default 200) queries with a readable, non-empty mask
are used, chosen at random with the audit's seed, to bound the run time.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm.auto import tqdm

from retrieval.audit.attributes import CodedAttribute
from retrieval.audit.groups import label_precision
from retrieval.data.imageio import LoadedImage, read_mask
from retrieval.errors import CasebaseError
from retrieval.explain.similarity import decompose

MAX_QUERIES = 200
BATCH = 32


# --------------------------------------------------------------------------- pure pieces
def cell_fractions(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(gh·gw,) share of each feature cell's area inside the (H, W) bool mask."""
    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    return F.adaptive_avg_pool2d(t, grid)[0, 0].reshape(-1).double().numpy()


def positive_mass(terms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(query-cell mass, case-cell mass) of the positive terms of a decomposition."""
    pos = np.clip(terms, 0.0, None)
    return pos.sum(1), pos.sum(0)


def remove_lesion(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Pixels with the dilated lesion filled by the blurred surrounding background."""
    m = _dilate(mask)
    if not m.any():
        return pixels.copy()
    radius = float(np.sqrt(m.sum() / np.pi))
    sigma = max(2.0, radius)
    keep = (~m).astype(np.float32)
    den = ndimage.gaussian_filter(keep, sigma, mode="nearest")
    out = pixels.astype(np.float32).copy()
    for c in range(out.shape[2]):
        num = ndimage.gaussian_filter(out[:, :, c] * keep, sigma, mode="nearest")
        fill = num / np.maximum(den, 1e-6)
        out[:, :, c][m] = fill[m]
    return np.clip(out, 0.0, 1.0)


def remove_background(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Pixels outside the dilated lesion replaced by their mean (the lesion kept as it is)."""
    m = _dilate(mask)
    out = pixels.astype(np.float32).copy()
    if m.all() or not m.any():
        return out
    fill = out[~m].mean(axis=0)
    out[~m] = fill
    return out


def _dilate(mask: np.ndarray) -> np.ndarray:
    it = max(1, int(round(0.02 * min(mask.shape))))
    return ndimage.binary_dilation(mask, iterations=it) if mask.any() else mask.copy()


# --------------------------------------------------------------------------- the audit
def _pick(query_cases, max_queries: int, seed: int) -> np.ndarray:
    has = (
        query_cases["mask"].astype(str).str.strip().ne("").to_numpy()
        if "mask" in query_cases
        else None
    )
    if has is None:
        return np.zeros(0, dtype=int)
    rows = np.flatnonzero(has)
    if len(rows) > max_queries:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_queries, replace=False))
    return rows


class _Encoder:
    """Features, pooling weights and lesion-cell fractions of indexed cases, computed once each."""

    def __init__(self, r):
        self.r = r
        self.cache: dict[int, tuple] = {}

    def ensure(self, rows: list[int]) -> None:
        todo = [row for row in dict.fromkeys(rows) if row not in self.cache]
        for start in range(0, len(todo), BATCH):
            chunk = todo[start : start + BATCH]
            try:
                ctxs = self.r.encode_many([self.r.cases.at[row, "image"] for row in chunk])
            except CasebaseError:
                ctxs = []
                for row in chunk:
                    try:
                        ctxs.append(self.r.encode(self.r.cases.at[row, "image"]))
                    except CasebaseError:
                        ctxs.append(None)
            for row, c in zip(chunk, ctxs, strict=True):
                if c is None:
                    self.cache[row] = None
                    continue
                frac = None
                mpath = str(self.r.cases.at[row, "mask"]) if "mask" in self.r.cases else ""
                if mpath.strip():
                    try:
                        m = read_mask(mpath, expected_size=c.geometry.original_size)
                        frac = cell_fractions(m, c.grid) if m.any() else None
                    except CasebaseError:
                        frac = None
                self.cache[row] = (c.features, c.weights, frac)


def _attribute_share(
    attrs: list[CodedAttribute], qrows: np.ndarray, hits, index_codes_by_attr
) -> dict:
    out = {}
    for a in attrs:
        qc = a.query_codes[qrows]
        shares = []
        for i, hs in enumerate(hits):
            if qc[i] < 0 or not hs:
                continue
            rows = [row for _, row in hs]
            shares.append(float(np.mean(index_codes_by_attr[a.name][rows] == qc[i])))
        out[a.name] = float(np.mean(shares)) if shares else None
    return out


def _precision(r, hits, qlabels) -> float | None:
    labels = r.cases["label"].to_numpy()
    k = max((len(h) for h in hits), default=0)
    if k == 0:
        return None
    rows = np.array([[row for _, row in h] + [0] * (k - len(h)) for h in hits])
    valid = np.array([[True] * len(h) + [False] * (k - len(h)) for h in hits])
    p = label_precision(labels[rows], valid, qlabels)
    return float(np.nanmean(p)) if np.isfinite(p).any() else None


def audit_counterfactual(
    r,
    query_cases,
    hits,
    attrs: list[CodedAttribute],
    k: int = 5,
    max_queries: int = MAX_QUERIES,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """See the module docstring; ``hits`` are the audit's patient-excluded neighbours per query."""
    picked = _pick(query_cases, max_queries, seed)
    n_masked = (
        int(query_cases["mask"].astype(str).str.strip().ne("").sum())
        if "mask" in query_cases
        else 0
    )
    base = {"max_queries": max_queries, "n_with_mask": n_masked, "k": k}
    if not len(picked):
        return {**base, "n_queries": 0, "note": "no query in the split has a lesion mask"}
    enc = _Encoder(r)
    pre = r.preprocessor
    rec = {
        "qrows": [],
        "q_share": [],
        "c_share": [],
        "q_area": [],
        "c_area": [],
        "lesion_removed": [],
        "background_removed": [],
    }
    skipped = 0
    bar = tqdm(
        total=len(picked), desc="counterfactual", unit="query", disable=not progress, leave=False
    )
    for start in range(0, len(picked), BATCH):
        chunk = picked[start : start + BATCH]
        loaded, tensors = [], []
        for qi in chunk:
            try:
                img, tensor, geo = pre.load(query_cases.at[qi, "image"])
                mask = read_mask(query_cases.at[qi, "mask"], expected_size=img.original_size)
            except CasebaseError:
                skipped += 1
                continue
            if not mask.any():
                skipped += 1
                continue
            loaded.append((qi, img, mask))
            tensors.append(tensor)
        if loaded:
            with torch.no_grad():
                out = r.model.run(torch.stack(tensors).to(r.device), r.weighting)
            enc.ensure([row for qi, _, _ in loaded for _, row in hits[qi][:k]])
            lesion_removed, background_removed = [], []
            for j, (qi, img, mask) in enumerate(loaded):
                qF, qW = out.features[j], out.weights[j]
                qfrac = cell_fractions(mask, tuple(qF.shape[-2:]))
                q_in = q_tot = c_in = c_tot = 0.0
                c_area = []
                for _, row in hits[qi][:k]:
                    cached = enc.cache.get(row)
                    if cached is None:
                        continue
                    cF, cW, cfrac = cached
                    dec = decompose(r.model, qF, qW, cF, cW)
                    qm, cm = positive_mass(dec.terms)
                    q_in += float(qm @ qfrac)
                    q_tot += float(qm.sum())
                    if cfrac is not None:
                        c_in += float(cm @ cfrac)
                        c_tot += float(cm.sum())
                        c_area.append(float(cfrac.mean()))
                rec["qrows"].append(qi)
                rec["q_share"].append(q_in / q_tot if q_tot > 0 else np.nan)
                rec["c_share"].append(c_in / c_tot if c_tot > 0 else np.nan)
                rec["q_area"].append(float(qfrac.mean()))
                rec["c_area"].append(float(np.mean(c_area)) if c_area else np.nan)
                lesion_removed.append(replace(img, pixels=remove_lesion(img.pixels, mask)))
                background_removed.append(replace(img, pixels=remove_background(img.pixels, mask)))
            # embed the edited queries chunk by chunk: full-size pixel copies are never all held
            rec["lesion_removed"].append(_embed_images(r, lesion_removed))
            rec["background_removed"].append(_embed_images(r, background_removed))
        bar.update(len(chunk))
    bar.close()
    qrows = np.array(rec["qrows"], dtype=int)
    if not len(qrows):
        return {
            **base,
            "n_queries": 0,
            "skipped": skipped,
            "note": "no readable, non-empty query mask",
        }
    q_share, c_share = np.array(rec["q_share"]), np.array(rec["c_share"])
    q_area, c_area = np.array(rec["q_area"]), np.array(rec["c_area"])

    def _mean(x):
        return float(np.nanmean(x)) if np.isfinite(x).any() else None

    sim = {
        "query": _mean(q_share),
        "case": _mean(c_share),
        "lesion_area_query": _mean(q_area),
        "lesion_area_case": _mean(c_area),
    }
    sim["enrichment_query"] = (
        sim["query"] / sim["lesion_area_query"]
        if sim["query"] is not None and sim["lesion_area_query"]
        else None
    )
    sim["enrichment_case"] = (
        sim["case"] / sim["lesion_area_case"]
        if sim["case"] is not None and sim["lesion_area_case"]
        else None
    )

    by_group: dict[str, dict] = {}
    for a in attrs:
        codes = a.query_codes[qrows]
        by_group[a.name] = {}
        for code, name in enumerate(a.groups):
            m = codes == code
            if m.any():
                by_group[a.name][name] = {
                    "n": int(m.sum()),
                    "query": _mean(q_share[m]),
                    "case": _mean(c_share[m]),
                }

    masked = _masked_retrieval(r, query_cases, qrows, hits, attrs, k, rec)
    result = {
        **base,
        "n_queries": int(len(qrows)),
        "skipped": skipped,
        "similarity_in_lesion": sim,
        "by_group": by_group,
        "masked_retrieval": masked,
    }
    result["interpretation"] = interpret(sim, masked)
    return result


def _embed_images(r, images: list[LoadedImage]) -> np.ndarray:
    pre = r.preprocessor
    vecs = []
    for start in range(0, len(images), BATCH):
        batch = torch.stack(
            [pre.normalize(pre.resized(im)[None])[0] for im in images[start : start + BATCH]]
        )
        vecs.append(r.embed(batch).float().cpu().numpy())
    return np.concatenate(vecs)


def _masked_retrieval(r, query_cases, qrows, hits, attrs, k, rec) -> dict:
    qlabels = query_cases["label"].astype(str).to_numpy()[qrows]
    patients = query_cases["patient_id"].astype(str).tolist()
    excl = [patients[i] for i in qrows]
    index_codes = {a.name: a.index_codes for a in attrs}
    orig_hits = [hits[i][:k] for i in qrows]
    out = {
        "original": {
            "precision_at_5": _precision(r, orig_hits, qlabels),
            "attribute_concordance": _attribute_share(attrs, qrows, orig_hits, index_codes),
        }
    }
    for name in ("lesion_removed", "background_removed"):
        vecs = np.concatenate(rec[name])
        h = r.search(vecs, k, exclude_patients=excl)
        out[name] = {
            "precision_at_5": _precision(r, h, qlabels),
            "attribute_concordance": _attribute_share(attrs, qrows, h, index_codes),
        }
    index_labels = r.cases["label"].astype(str)
    prevalence = index_labels.value_counts(normalize=True)
    out["chance_precision_at_5"] = float(np.mean([prevalence.get(lab, 0.0) for lab in qlabels]))
    return out


def interpret(sim: dict, masked: dict) -> str:
    chance = masked["chance_precision_at_5"]
    orig = masked["original"]["precision_at_5"]
    les = masked["lesion_removed"]["precision_at_5"]
    bg = masked["background_removed"]["precision_at_5"]
    parts = []
    if sim.get("enrichment_query") is not None:
        parts.append(
            f"{100 * sim['query']:.0f}% of the positive similarity lies inside the query's lesion "
            f"({100 * sim['lesion_area_query']:.0f}% of the image area)"
        )
    if None not in (orig, les, bg):
        gain = orig - chance
        if gain > 0.05 and les - chance > 0.5 * gain:
            parts.append(
                f"labels survive removing the lesion (precision@5 {les:.2f} vs {orig:.2f}, chance "
                f"{chance:.2f}): retrieval matches on context"
            )
        else:
            parts.append(
                f"removing the lesion drops precision@5 to {les:.2f} (from {orig:.2f}, chance "
                f"{chance:.2f}); with the background removed it is {bg:.2f}"
            )
    return "; ".join(parts) + "." if parts else ""
