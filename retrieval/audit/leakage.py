"""Leakage between the audited split and the index.

* **near_duplicates**: a query-split case whose embedding has cosine
  similarity ≥ the threshold with an indexed case (searched with *no*
  exclusions). The threshold is 0.995, raised to the 99.9th percentile of the
  similarity between indexed cases and their nearest indexed case *of another
  patient* when that is higher: a metric-learning model may pack whole classes
  that tightly, and then 0.995 says nothing about duplication;
* **near_duplicate_pixels**: a query-split case whose 32 × 32 grey thumbnail,
  minus the index's mean thumbnail (the shared anatomy), correlates ≥ 0.98
  with an indexed case's (re-encoded, re-windowed or slightly noisy copies
  score > 0.99; distinct phantom patients stay below 0.91);
* **identical_pixels**: a query-split case whose decoded pixels (quantised to
  8 bits, with the image shape) hash to the same SHA-256 as an indexed case's;
* **shared_case_ids**: a case id both in the query split and in the index;
* **own_patient_neighbors**: with patient exclusion switched *off*, top-5
  neighbours that come from the query's own patient (any is a patient-level
  split leak: the same person on both sides);
* **index_same_patient**: among the indexed cases themselves (up to 2,000
  sampled), the share of top-5 neighbours (self excluded) from the same
  patient, against the share random retrieval would give; a large lift means
  retrieval recognises *patients*, which is why evaluation must exclude them.

Only case ids appear in the listings, never patient ids.
"""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from retrieval.data.imageio import read_image
from retrieval.errors import CasebaseError

COSINE_THRESHOLD = 0.995
THUMB_THRESHOLD = 0.98
THUMB_SIDE = 32
MAX_LISTED = 100
SELF_SAMPLE = 2000


def fingerprint(pixels: np.ndarray) -> tuple[str, np.ndarray]:
    """(SHA-256 of the 8-bit quantised pixels + shape, unit-norm zero-mean grey thumbnail)."""
    q = np.clip(np.round(pixels * 255.0), 0, 255).astype(np.uint8)
    h = hashlib.sha256(repr(q.shape).encode())
    h.update(np.ascontiguousarray(q).tobytes())
    grey = np.asarray(pixels, np.float32).mean(axis=2)
    t = np.asarray(
        Image.fromarray(grey).resize((THUMB_SIDE, THUMB_SIDE), Image.BOX), np.float64
    ).ravel()
    t -= t.mean()
    return h.hexdigest(), t / max(float(np.linalg.norm(t)), 1e-12)


def fingerprint_all(paths, progress: bool = False, desc: str = "fingerprinting pixels"):
    """([hash or None], (n, THUMB_SIDE²) thumbnails, zero rows where unreadable)."""
    hashes: list[str | None] = []
    thumbs = np.zeros((len(paths), THUMB_SIDE * THUMB_SIDE))
    for i, p in enumerate(
        tqdm(list(paths), desc=desc, unit="img", disable=not progress, leave=False)
    ):
        try:
            h, t = fingerprint(read_image(p).pixels)
        except CasebaseError:
            hashes.append(None)
            continue
        hashes.append(h)
        thumbs[i] = t
    return hashes, thumbs


def thumbnail_duplicates(
    q_thumbs: np.ndarray,
    i_thumbs: np.ndarray,
    query_ids,
    index_ids,
    threshold: float = THUMB_THRESHOLD,
) -> list[dict]:
    """Pairs whose thumbnails, minus the index's mean thumbnail, correlate >= threshold."""
    ok_i = np.abs(i_thumbs).sum(1) > 0
    if not ok_i.any():
        return []
    mean = i_thumbs[ok_i].mean(0)

    def resid(t):
        r = t - mean
        n = np.linalg.norm(r, axis=1, keepdims=True)
        return np.where(n > 1e-9, r / np.maximum(n, 1e-12), 0.0)

    rq, ri = resid(q_thumbs), resid(i_thumbs)
    ri[~ok_i] = 0.0
    rq[np.abs(q_thumbs).sum(1) == 0] = 0.0
    out = []
    for start in range(0, len(rq), 512):
        sims = rq[start : start + 512] @ ri.T
        for a, b in zip(*np.nonzero(sims >= threshold), strict=True):
            out.append(
                {
                    "query_case": str(query_ids[start + a]),
                    "index_case": str(index_ids[b]),
                    "correlation": round(float(sims[a, b]), 6),
                }
            )
    return out


def near_duplicates(
    hits: list[list[tuple[float, int]]], query_ids, index_ids, threshold: float = COSINE_THRESHOLD
) -> list[dict]:
    out = []
    for qi, hs in enumerate(hits):
        for sim, row in hs:
            if sim >= threshold:
                out.append(
                    {
                        "query_case": str(query_ids[qi]),
                        "index_case": str(index_ids[row]),
                        "cosine": round(float(sim), 6),
                    }
                )
    return out


def identical_pixels(query_hashes, index_hashes, query_ids, index_ids) -> list[dict]:
    where: dict[str, list[int]] = {}
    for row, h in enumerate(index_hashes):
        if h is not None:
            where.setdefault(h, []).append(row)
    out = []
    for qi, h in enumerate(query_hashes):
        for row in where.get(h, []) if h is not None else []:
            out.append({"query_case": str(query_ids[qi]), "index_case": str(index_ids[row])})
    return out


def own_patient_neighbors(
    hits: list[list[tuple[float, int]]],
    query_patients,
    index_patients,
    query_ids,
    index_ids,
    k: int = 5,
) -> list[dict]:
    out = []
    for qi, hs in enumerate(hits):
        p = str(query_patients[qi])
        if not p:
            continue
        for rank, (sim, row) in enumerate(hs[:k]):
            if str(index_patients[row]) == p:
                out.append(
                    {
                        "query_case": str(query_ids[qi]),
                        "index_case": str(index_ids[row]),
                        "rank": rank + 1,
                        "cosine": round(float(sim), 6),
                    }
                )
    return out


def index_self_search(
    vindex, patients: np.ndarray, k: int = 5, sample: int = SELF_SAMPLE, seed: int = 0
) -> tuple[dict | None, np.ndarray]:
    """Indexed cases searched against the index (self excluded), up to ``sample`` of them.

    Returns (same-patient statistics or None, cosine of each sampled case's nearest
    indexed case of *another* patient): the share of top-k neighbours from the case's own
    patient vs what random retrieval gives, and the calibration for near-duplicates.
    """
    patients = np.asarray(patients).astype(str)
    n = len(patients)
    if n < 2:
        return None, np.zeros(0)
    rng = np.random.default_rng(seed)
    rows = np.arange(n) if n <= sample else np.sort(rng.choice(n, sample, replace=False))
    sims, ids = vindex.search(vindex.reconstruct_all()[rows], min(n, k + 16))
    _, inv, sizes = np.unique(patients, return_inverse=True, return_counts=True)
    shares, expect, cross = [], [], []
    for j, row in enumerate(rows):
        hits = [
            (float(s), int(i)) for s, i in zip(sims[j], ids[j], strict=True) if i >= 0 and i != row
        ]
        other = [s for s, i in hits if not patients[row] or patients[i] != patients[row]]
        if other:
            cross.append(other[0])
        if patients[row] and n > k + 1 and hits:
            nb = [i for _, i in hits[:k]]
            shares.append(np.mean(patients[nb] == patients[row]))
            expect.append((sizes[inv[row]] - 1) / (n - 1))
    stats = None
    if shares:
        share, expected = float(np.mean(shares)), float(np.mean(expect))
        stats = {
            "n_queries": len(shares),
            "share_at_5": share,
            "expected": expected,
            "lift": share / expected if expected > 0 else None,
        }
    return stats, np.asarray(cross)


def _listing(items: list[dict]) -> dict:
    return {"n": len(items), "pairs": items[:MAX_LISTED], "truncated": len(items) > MAX_LISTED}


def audit_leakage(
    r,
    query_cases,
    query_vectors: np.ndarray,
    k: int = 5,
    progress: bool = False,
    seed: int = 0,
    hash_pixels: bool = True,
) -> dict:
    """Every leakage check on the embedded query split against the retriever's index."""
    qids = query_cases["case_id"].astype(str).to_numpy()
    iids = r.cases["case_id"].astype(str).to_numpy()
    qpat = query_cases["patient_id"].astype(str).to_numpy()
    ipat = r.cases["patient_id"].astype(str).to_numpy()
    open_hits = r.search(query_vectors, k)  # no patient exclusion on purpose
    same_patient, cross = index_self_search(r.index, ipat, k, seed=seed)
    threshold = COSINE_THRESHOLD
    if len(cross):
        threshold = max(threshold, float(np.percentile(cross, 99.9)))
    dups = near_duplicates(open_hits, qids, iids, threshold)
    own = own_patient_neighbors(open_hits, qpat, ipat, qids, iids, k)
    shared = sorted(set(qids) & set(iids))
    out = {
        "near_duplicates": {
            "threshold": threshold,
            "base_threshold": COSINE_THRESHOLD,
            "index_cross_patient_share_above_base": float(np.mean(cross >= COSINE_THRESHOLD))
            if len(cross)
            else None,
            **_listing(dups),
        },
        "own_patient_neighbors": {
            **_listing(own),
            "n_queries_affected": len({d["query_case"] for d in own}),
        },
        "shared_case_ids": {
            "n": len(shared),
            "case_ids": shared[:MAX_LISTED],
            "truncated": len(shared) > MAX_LISTED,
        },
    }
    if hash_pixels:
        qh, qt = fingerprint_all(
            query_cases["image"].tolist(), progress, "fingerprinting query pixels"
        )
        ih, it = fingerprint_all(r.cases["image"].tolist(), progress, "fingerprinting index pixels")
        out["identical_pixels"] = {
            **_listing(identical_pixels(qh, ih, qids, iids)),
            "unreadable": int(sum(h is None for h in qh + ih)),
        }
        out["near_duplicate_pixels"] = {
            "threshold": THUMB_THRESHOLD,
            **_listing(thumbnail_duplicates(qt, it, qids, iids)),
        }
    out["index_same_patient"] = same_patient
    out["n_flags"] = int(
        out["near_duplicates"]["n"]
        + out["own_patient_neighbors"]["n"]
        + out["shared_case_ids"]["n"]
        + out.get("identical_pixels", {}).get("n", 0)
        + out.get("near_duplicate_pixels", {}).get("n", 0)
    )
    return out
