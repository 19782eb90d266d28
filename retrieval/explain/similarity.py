"""Exact spatial decomposition of the cosine similarity between two embeddings.

With pooled features p = Σ_i w_i F_i and embedding e = P p / ‖P p‖ (P linear),

    sim(q, c) = e_q · e_c = Σ_i Σ_j  w^q_i w^c_j (P F^q_i) · (P F^c_j) / (‖P p_q‖ ‖P p_c‖)
                          = Σ_i Σ_j T_ij

so the (h·w) × (h'·w') matrix T of query-location × case-location terms sums
to the similarity exactly (completeness, up to float rounding). Its row sums
give a query map, its column sums a case map, and its largest entries the
matched regions. No library does this; it follows from the model's design.

With a lesion-extent head (retrieval.model.extent) the index's vector is [e, c cos t, c sin t]
/ sqrt(1 + c^2), so sim = (e_q · e_c + c^2 cos(t_q - t_c)) / (1 + c^2). The appearance terms
are scaled by 1 / (1 + c^2), and the extent term is split over the pairs of the two images'
lesion cells, each pair (i, j) by f^q_i f^c_j / (Σ f^q Σ f^c) with f the predicted lesion
fractions (the pooling weights stand in for an image where no cell holds a lesion): the
agreement in lesion size is carried by the lesions themselves, and T still sums to sim.

For a volume model (cnn3d) the locations are the voxels of the (d, h, w) feature volume:
the same code runs over flattened cells, grids are (d, h, w) tuples, regions are
26-connected blobs of voxels, and maps are (d, h, w).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from retrieval.model.network import CaseNet


@dataclass
class SimilarityDecomposition:
    terms: np.ndarray  # (hq*wq, hc*wc) float64, sums to `similarity` (voxels for volumes)
    similarity: float  # e_q · e_c from the embeddings themselves
    query_grid: tuple[int, ...]  # (h, w), or (d, h, w) for a volume model
    case_grid: tuple[int, ...]
    # the extent code's part of `similarity` (c^2 cos(t_q - t_c) / (1 + c^2)); 0 without one
    extent_term: float = 0.0

    @property
    def completeness_error(self) -> float:
        return abs(float(self.terms.sum()) - self.similarity)

    def query_map(self) -> np.ndarray:
        return self.terms.sum(axis=1).reshape(self.query_grid)

    def case_map(self) -> np.ndarray:
        return self.terms.sum(axis=0).reshape(self.case_grid)

    def top_pairs(self, n: int = 3) -> list[tuple[tuple[int, ...], tuple[int, ...], float]]:
        """Largest positive terms, each query cell and each case cell used once (greedy)."""
        order = np.argsort(self.terms, axis=None)[::-1]
        used_q, used_c, out = set(), set(), []
        for flat in order:
            qi, cj = divmod(int(flat), self.terms.shape[1])
            val = float(self.terms[qi, cj])
            if val <= 0 or len(out) >= n:
                break
            if qi in used_q or cj in used_c:
                continue
            used_q.add(qi)
            used_c.add(cj)
            qc = tuple(int(v) for v in np.unravel_index(qi, self.query_grid))
            cc = tuple(int(v) for v in np.unravel_index(cj, self.case_grid))
            out.append((qc, cc, val))
        return out


def decompose(
    model: CaseNet,
    q_features: torch.Tensor,
    q_weights: torch.Tensor,
    c_features: torch.Tensor,
    c_weights: torch.Tensor,
) -> SimilarityDecomposition:
    """Decompose sim(e_q, e_c) for one pair: features (C, h, w), weights (h, w) summing to 1
    (features (C, d, h, w) and weights (d, h, w) for a volume model)."""
    with torch.no_grad():
        P = model.projection.weight.double()  # (D, C)
        qf, cf = q_features.double().flatten(1), c_features.double().flatten(1)
        qz = torch.einsum("dc,cn->nd", P, qf)  # (hq*wq, D)
        cz = torch.einsum("dc,cn->nd", P, cf)
        qw, cw = q_weights.double().reshape(-1), c_weights.double().reshape(-1)
        qp, cp = (qw[:, None] * qz).sum(0), (cw[:, None] * cz).sum(0)
        norm = qp.norm().clamp_min(1e-12) * cp.norm().clamp_min(1e-12)
        terms = (qw[:, None] * qz) @ (cw[:, None] * cz).T / norm
        eq = model.embed(q_features[None].float(), q_weights[None].float())[0]
        ec = model.embed(c_features[None].float(), c_weights[None].float())[0]
        sim = float((eq.double() * ec.double()).sum())
        extent_term = 0.0
        if getattr(model, "has_extent", False):
            extent_term = float((eq[-2:].double() * ec[-2:].double()).sum())
            terms = with_extent_terms(
                terms,
                model.config.extent_weight,
                extent_term,
                extent_allocation(model.lesion_fraction(q_features[None].float()), qw[None])[0],
                extent_allocation(model.lesion_fraction(c_features[None].float()), cw[None])[0],
            )
    return SimilarityDecomposition(
        terms.cpu().numpy(),
        sim,
        tuple(q_features.shape[1:]),
        tuple(c_features.shape[1:]),
        extent_term,
    )


def extent_allocation(fractions, weights) -> torch.Tensor:
    """(B, cells) float64, each row summing to 1: how each image's side of the extent term
    spreads over its cells: its predicted lesion fractions (B, *grid), or its pooling weights
    (B, *grid) where those fractions are all ~0."""
    f = torch.as_tensor(fractions).double().flatten(1)
    w = torch.as_tensor(weights).double().to(f.device).flatten(1)
    total = f.sum(1, keepdim=True)
    return torch.where(total > 1e-6, f / total.clamp_min(1e-12), w)


def with_extent_terms(appearance, weight: float, extent_term: float, q_alloc, c_alloc):
    """T of a model with an extent code: the appearance terms (summing to e_q · e_c) over
    1 + c^2, plus the extent term spread over cell pairs by the two allocations' product."""
    c2 = float(weight) ** 2
    return appearance / (1.0 + c2) + extent_term * torch.outer(q_alloc, c_alloc).to(
        appearance.dtype
    )


# ---------------------------------------------------------------- matched regions
# A region is a connected blob (8-neighbourhood) of feature-map cells on the query map (row sums
# of T) or the case map (column sums): the fewest highest cells that together hold REGION_COVER
# of the map's positive mass, split into its connected blobs. A region pair's contribution is its
# block of T: the sum of every term between its query cells and its case cells, so distinct pairs
# never count a term twice. Single cells cannot carry the similarity: with the saliency-weighted
# pooling the mass of a map spreads over the few cells around its peak, and T's mass over the
# pairs of those cells (top-3 single cell pairs: a median 3.9% of the similarity).
REGION_COVER = 0.8
# No region covers more than this share of its feature grid (a larger blob keeps only its
# highest cells), so a region is a place in the image, never the whole image carrying everything.
MAX_REGION_FRACTION = 0.25
# A pair whose regions lie on opposite sides of their images (region centres left and right of
# the middle by more than SIDE_MARGIN of the width) is kept only if it carries at least this
# share of the similarity: a left-lung lesion matched with a right-lung area is shown only when
# that match really weighs.
CROSS_SIDE_MIN_SHARE = 0.25
# Beyond the largest pair, a pair is shown only if it carries at least this share (a 1% box is
# noise to a reader).
MIN_SHARE = 0.05
SIDE_MARGIN = 1 / 8


@dataclass
class RegionPair:
    query_cells: np.ndarray  # (hq, wq) bool ((d, h, w) for volumes)
    case_cells: np.ndarray  # (hc, wc) bool
    contribution: float  # Σ of T over query_cells × case_cells
    share: float  # contribution / similarity
    crosses_sides: bool


def segment(
    heat: np.ndarray,
    cover: float = REGION_COVER,
    max_fraction: float = MAX_REGION_FRACTION,
) -> list[np.ndarray]:
    """Disjoint regions (bool masks) of a map: its top cells holding ``cover`` of the positive mass.

    The selected cells are split into connected blobs (8-neighbourhood); a blob larger than
    ``max_fraction`` of the grid keeps only its highest ``max_fraction`` x grid cells (the rest
    are left out), which may split it into several regions.
    """
    heat = np.nan_to_num(np.asarray(heat, np.float64))
    pos = np.clip(heat, 0.0, None)
    total = float(pos.sum())
    if not heat.size or total <= 0:
        return []
    vals = np.sort(pos.ravel())[::-1]
    last = min(int(np.searchsorted(np.cumsum(vals), cover * total)), vals.size - 1)
    selected = (heat >= vals[last]) & (heat > 0)
    max_cells = max(1, int(max_fraction * heat.size))
    out: list[np.ndarray] = []
    eight = np.ones((3,) * heat.ndim, bool)  # 8-neighbourhood (26 in a feature volume)

    def place(within: np.ndarray, again: bool) -> None:
        labels, n = ndimage.label(within, structure=eight)
        for i in range(1, n + 1):
            blob = labels == i
            if blob.sum() <= max_cells or again:
                out.append(blob)
            else:  # keep its max_cells highest cells (the most mass a region may hold)
                kth = np.sort(heat[blob])[::-1][max_cells - 1]
                place(blob & (heat >= kth), True)

    place(selected, False)
    return out


def _side(cells: np.ndarray) -> int:
    """-1 left, +1 right, 0 central: the region's centre against the middle of the width."""
    x = (np.nonzero(cells)[-1].mean() + 0.5) / cells.shape[-1] - 0.5
    return 0 if abs(x) <= SIDE_MARGIN else (1 if x > 0 else -1)


def cell_mask_share(
    dec: SimilarityDecomposition, query_cells: np.ndarray, case_cells: np.ndarray
) -> float:
    """Share of the similarity in the terms between two cell sets (e.g. lesion x lesion)."""
    block = dec.terms[np.asarray(query_cells, bool).ravel()][
        :, np.asarray(case_cells, bool).ravel()
    ]
    total = dec.similarity if abs(dec.similarity) > 1e-12 else 1.0
    return float(block.sum() / total)


def region_pairs(
    dec: SimilarityDecomposition,
    n: int = 3,
    cover: float = REGION_COVER,
    cross_side_min_share: float = CROSS_SIDE_MIN_SHARE,
    max_fraction: float = MAX_REGION_FRACTION,
    min_share: float = MIN_SHARE,
) -> list[RegionPair]:
    """The n region pairs with the largest positive contributions, largest first.

    Regions are segmented on the query map and on the case map separately; every (query
    region, case region) pair is a candidate, so one query region may match two case regions.
    A cross-side pair below ``cross_side_min_share`` is left out, and so is any pair after the
    first below ``min_share``. Shares are of the similarity, and blocks are disjoint, so they
    sum to at most the share of the similarity in the positive blocks.
    """
    q_regions = segment(dec.query_map(), cover, max_fraction)
    c_regions = segment(dec.case_map(), cover, max_fraction)
    if not q_regions or not c_regions:
        return []
    mq = np.stack([r.ravel() for r in q_regions]).astype(np.float64)  # (Rq, nq)
    mc = np.stack([r.ravel() for r in c_regions]).astype(np.float64)  # (Rc, nc)
    blocks = mq @ dec.terms @ mc.T
    total = dec.similarity if abs(dec.similarity) > 1e-12 else 1.0
    out: list[RegionPair] = []
    for flat in np.argsort(blocks, axis=None)[::-1]:
        a, b = divmod(int(flat), blocks.shape[1])
        val = float(blocks[a, b])
        if val <= 0 or len(out) >= n:
            break
        sq, sc = _side(q_regions[a]), _side(c_regions[b])
        crosses = sq * sc < 0
        if crosses and val / total < cross_side_min_share:
            continue
        if out and val / total < min_share:  # the largest is always shown; noise never
            break
        out.append(RegionPair(q_regions[a], c_regions[b], val, val / total, crosses))
    return out


# ---------------------------------------------------------------- the similarity score
SCORE_FILE = "similarity_quantiles.npy"
SCORE_K = 10  # neighbours per calibration query: the depth `casebase query` shows by default
SCORE_QUERIES = 2000  # calibration queries sampled from the index (seeded)
SCORE_LEVELS = 1001  # quantiles stored (float64, ~8 kB)
UNCALIBRATED = "(1 + cosine) / 2: this index has no similarity calibration (rebuild it)"


@dataclass
class SimilarityScale:
    """Cosine -> ``similarity_score`` in [0, 1]: how this match ranks among the index's own matches.

    Calibrated at ``index build``: up to ``SCORE_QUERIES`` indexed cases (seeded sample) are
    searched against the index, their own patient excluded, and the cosines of each one's
    ``SCORE_K`` nearest cases are pooled; the bundle stores ``SCORE_LEVELS`` quantiles of that
    pool (``SCORE_FILE``). A score is the cosine's position in the pool, interpolated linearly
    between quantiles: 0.9 means closer than 90% of the top-10 matches that the index's own cases
    get, 0.5 a typical top-10 match, 0 anything below the weakest of them.

    Why this reference and not all pairs: a neighbour's rank among *all* of a query's pairs is
    about 1 - rank/n, so top-1 and top-10 differ by 9/n (0.009 at 1,000 cases) and the gap
    shrinks as the index grows; near-neighbour pairs are the matches users compare. Why
    empirical quantiles and not a fitted curve: after metric learning the cosines of close
    pairs pile up just below 1 with one mode per class, which no simple family fits, while
    interpolated quantiles are monotone in the cosine by construction and need no fitting.
    An index built before this calibration falls back to (1 + cosine) / 2, flagged as
    uncalibrated in the query JSON and the text.
    """

    quantiles: np.ndarray | None  # sorted cosines at levels linspace(0, 1, len); None: fallback

    @property
    def calibrated(self) -> bool:
        return self.quantiles is not None and len(self.quantiles) >= 2

    @property
    def method(self) -> str:
        if not self.calibrated:
            return UNCALIBRATED
        return (
            f"share of the index's own top-{SCORE_K} neighbour cosines below this one "
            "(calibrated at index build)"
        )

    def score(self, cosine):
        """Monotone non-decreasing in the cosine, in [0, 1]; a float for a float."""
        c = np.nan_to_num(np.asarray(cosine, np.float64), nan=-1.0)
        if self.calibrated:
            levels = np.linspace(0.0, 1.0, len(self.quantiles))
            out = np.interp(c, self.quantiles, levels, left=0.0, right=1.0)
        else:
            out = (1.0 + c) / 2.0
        out = np.clip(out, 0.0, 1.0)
        return float(out) if out.ndim == 0 else out

    @classmethod
    def load(cls, index_dir) -> SimilarityScale:
        """The bundle's calibration, or the (1 + cosine) / 2 fallback when it has none."""
        from pathlib import Path

        path = Path(index_dir) / SCORE_FILE
        if not path.is_file():
            return cls(None)
        q = np.load(path, allow_pickle=False)
        if q.ndim != 1 or len(q) < 2 or not np.all(np.isfinite(q)) or np.any(np.diff(q) < 0):
            from retrieval.errors import BundleError

            raise BundleError(f"{path}: not a sorted 1-D array of cosine quantiles")
        return cls(q.astype(np.float64))


def calibrate_scale(
    search,
    vectors: np.ndarray,
    patients: np.ndarray,
    k: int = SCORE_K,
    max_queries: int = SCORE_QUERIES,
    levels: int = SCORE_LEVELS,
    seed: int = 0,
) -> tuple[np.ndarray, dict]:
    """Quantiles of the index's top-k neighbour cosines (own patient and self excluded).

    ``search(queries, kk) -> (sims, ids)`` is the built index's search; returns the sorted
    quantiles and the metadata stored in bundle.json.
    """
    vectors = np.asarray(vectors, np.float32)
    patients = np.asarray(patients).astype(str)
    n = len(vectors)
    rng = np.random.default_rng(seed)
    rows = np.arange(n) if n <= max_queries else np.sort(rng.choice(n, max_queries, replace=False))
    pool: list[np.ndarray] = []
    kk = min(n, k + 32)
    for start in range(0, len(rows), 256):
        chunk = rows[start : start + 256]
        sims, ids = search(vectors[chunk], kk)
        for row, s, i in zip(chunk, sims, ids, strict=True):
            ok = (i >= 0) & (i != row)
            if patients[row]:
                ok &= patients[np.clip(i, 0, None)] != patients[row]
            pool.append(np.asarray(s, np.float64)[ok][:k])
    flat = np.concatenate(pool) if pool else np.zeros(0)
    meta = {
        "method": f"quantiles of the index's top-{k} neighbour cosines (own patient excluded)",
        "file": SCORE_FILE,
        "k": int(k),
        "n_queries": int(len(rows)),
        "n_pairs": int(flat.size),
        "levels": int(levels),
    }
    if flat.size < 2:
        return np.zeros(0), meta
    return np.quantile(flat, np.linspace(0.0, 1.0, levels)), meta


def lesion_cells(mask: np.ndarray, geometry, grid: tuple[int, ...]) -> np.ndarray:
    """(h, w) bool: the feature-map cells whose original-pixel footprint holds any lesion pixel
    ((d, h, w) voxels of the feature volume for a volume model)."""
    mask = np.asarray(mask, bool)
    out = np.zeros(grid, bool)
    k = len(grid)
    for cell in np.ndindex(*grid):
        box = geometry.cell_box(*cell, grid)  # [x0, y0(, z0), x1, y1(, z1)]
        lo, hi = box[:k][::-1], box[k:][::-1]  # in array order: (z,) y, x
        out[cell] = bool(mask[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))].any())
    return out
