"""Refining a search like a clinician: by example (Rocchio) and by region (late interaction).

SMILY (Hegde et al. 2019; Cai et al., CHI 2019) made similar-image search useful to
pathologists through refine-by-region and refine-by-example; this module holds the pieces
CaseRetriever.query(..., like=, unlike=, region=) uses.

Refine by example, Rocchio (1971) relevance feedback on the unit query embedding:

    q' = normalize(ALPHA·q + BETA·mean(liked) − GAMMA·mean(unliked))

with the textbook weights ALPHA = 1, BETA = 0.75, GAMMA = 0.15 (Manning, Raghavan & Schütze,
Introduction to IR, §9.1.1): a case marked good says where relevant cases are, while cases
marked bad are diverse (bad for different reasons), so their mean is a weak direction and is
only allowed to nudge; what the user rejected is in any case removed outright (an `unlike` case
never comes back). With a region, the same update is made per query cell of the box, toward /
away from the cell of each liked / unliked case that matches it best.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from index.region_index import unit
from retrieval.errors import CasebaseError
from retrieval.explain.similarity import SimilarityDecomposition
from retrieval.model.cells import cell_span

ALPHA, BETA, GAMMA = 1.0, 0.75, 0.15
FEEDBACK_FORMULA = (
    f"q' = normalize({ALPHA:g}·q + {BETA:g}·mean(like) − {GAMMA:g}·mean(unlike)) (Rocchio)"
)
MIN_CELL_OVERLAP = 0.5  # a feature cell is in the region when the box covers half of it


def parse_ids(items: Iterable[str] | str | None) -> list[str]:
    """'a,b' / ['a,b', 'c'] -> ['a', 'b', 'c'] (order kept, duplicates dropped)."""
    if items is None:
        return []
    if isinstance(items, str):
        items = [items]
    out: list[str] = []
    for item in items:
        out += [s.strip() for s in str(item).split(",") if s.strip()]
    return list(dict.fromkeys(out))


def parse_box(text: str) -> tuple[float, ...]:
    """'X0,Y0,X1,Y1' (an image) or 'X0,Y0,Z0,X1,Y1,Z1' (a volume) -> the numbers (CasebaseError
    otherwise); select_cells checks that the count fits the query."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        vals = []
    if len(vals) not in (4, 6) or not all(np.isfinite(vals)):
        raise CasebaseError(
            f"--region {text!r}: use X0,Y0,X1,Y1 (pixels of the query image) or "
            "X0,Y0,Z0,X1,Y1,Z1 (voxels of a query volume)"
        )
    return tuple(vals)


def rocchio(q: np.ndarray, like: np.ndarray, unlike: np.ndarray) -> np.ndarray:
    """Unit q' from unit q (D,) and unit (n, D) liked / unliked vectors (either may be empty)."""
    out = ALPHA * np.asarray(q, np.float64)
    if len(like):
        out = out + BETA * np.asarray(like, np.float64).mean(axis=0)
    if len(unlike):
        out = out - GAMMA * np.asarray(unlike, np.float64).mean(axis=0)
    n = np.linalg.norm(out)
    if n < 1e-9:  # everything cancelled: keep the query as it was
        return np.asarray(q, np.float32)
    return (out / n).astype(np.float32)


def rocchio_cells(q: np.ndarray, like: Sequence[np.ndarray], unlike: Sequence[np.ndarray]):
    """Per query cell (m, D): toward/away from each example's best-matching unit cell."""
    q = unit(q)

    def best(cells_list):
        if not cells_list:
            return np.zeros((0,) + q.shape, np.float32)
        return np.stack([z[np.argmax(q @ z.T, axis=1)] for z in (unit(c) for c in cells_list)])

    pos, neg = best(like), best(unlike)
    out = ALPHA * q.astype(np.float64)
    if len(pos):
        out = out + BETA * pos.mean(axis=0)
    if len(neg):
        out = out - GAMMA * neg.mean(axis=0)
    return unit(out)


@dataclass
class RegionSelection:
    asked: list[int]  # the box as given (rounded to int pixels)
    cells: np.ndarray  # (h, w) bool, (d, h, w) for a volume: the feature cells searched
    searched: list[int]  # original-pixel bounding box of those cells
    clip: list[int]  # matched regions' query boxes are clipped to this box
    note: str = ""  # e.g. widened to one cell


def _axis_spans(n: int, size: int, scale: float) -> np.ndarray:
    """(n, 2) [lo, hi) in original pixels of the n cells along one axis of `size` input pixels
    (``cell_span``: the pixels nearer each cell's centre than any other's)."""
    return np.array([cell_span(i, n, size) for i in range(n)], np.float64) * scale


def _axis_overlap(lo: float, hi: float, spans: np.ndarray) -> np.ndarray:
    """Share of each cell's span along one axis that [lo, hi) covers."""
    a, b = spans[:, 0], spans[:, 1]
    return np.clip(np.minimum(hi, b) - np.maximum(lo, a), 0, None) / np.maximum(b - a, 1e-9)


def select_cells(box, geometry, grid: tuple[int, ...]) -> RegionSelection:
    """Feature cells of a query box in original pixels (voxels); clear errors for unusable boxes.

    An image's box is [x0, y0, x1, y1] over a (h, w) grid; a volume's [x0, y0, z0, x1, y1, z1]
    over a (d, h, w) grid. A cell belongs to the region when the box covers at least
    MIN_CELL_OVERLAP of it. A box that covers no cell that much (smaller than a cell, or a thin
    strip) is widened to the cell under its centre, and the note says so.
    """
    n = len(grid)
    vals = [float(v) for v in box]
    asked = [int(round(v)) for v in vals]
    form = "X0,Y0,Z0,X1,Y1,Z1" if n == 3 else "X0,Y0,X1,Y1"
    if len(vals) != 2 * n:
        what = "a volume" if n == 3 else "an image"
        raise CasebaseError(f"region {asked}: the query is {what}: give {form}")
    lo, hi = vals[:n], vals[n:]  # (x, y[, z])
    if any(b <= a for a, b in zip(lo, hi, strict=True)):
        kind = "empty" if any(b == a for a, b in zip(lo, hi, strict=True)) else "inverted"
        order = " and ".join(f"{c}0 < {c}1" for c in "XYZ"[:n])
        raise CasebaseError(f"region {asked} is {kind}: give {form} with {order}")
    extent = tuple(reversed(geometry.original_size))  # (W, H[, D])
    if any(a < 0 for a in lo) or any(b > e for b, e in zip(hi, extent, strict=True)):
        sides = ", ".join(
            f"{k} {e}" for k, e in zip(("width", "height", "depth")[:n], extent, strict=True)
        )
        raise CasebaseError(
            f"region {asked} lies outside the {'volume' if n == 3 else 'image'} ({sides}; "
            f"boxes run from {','.join('0' * n)} to {','.join(str(e) for e in extent)})"
        )
    g_xyz = tuple(reversed(grid))
    inputs = tuple(reversed(geometry.input_shape))  # (W, H[, D]) in input pixels
    # each cell's span in original pixels along x, y (and z)
    spans = [_axis_spans(g_xyz[a], inputs[a], geometry.scale[a]) for a in range(n)]
    overlap = [_axis_overlap(lo[a], hi[a], spans[a]) for a in range(n)]
    cover = overlap[-1]
    for a in range(n - 2, -1, -1):  # outer product in grid order (z,) y, x
        cover = np.multiply.outer(cover, overlap[a])
    cells = cover >= MIN_CELL_OVERLAP
    note = ""
    clip = asked
    if not cells.any():
        centre = tuple(  # the cell whose span holds the box's centre
            int(np.searchsorted(spans[a][1:, 0], (lo[a] + hi[a]) / 2, side="right"))
            for a in reversed(range(n))
        )
        cells[centre] = True
        clip = geometry.cell_box(*centre, grid)
        size = "×".join(f"{inputs[a] / g_xyz[a] * geometry.scale[a]:.0f}" for a in range(n))
        note = (
            f"region {asked} covers less than half of any feature cell ({size} px); widened "
            f"to the cell {clip}"
        )
    return RegionSelection(asked, cells, cells_box(geometry, cells), list(clip), note)


def cells_box(geometry, cells: np.ndarray) -> list[int]:
    """Original-pixel bounding box of a region's feature-map cells (bool (h, w)): [x0, y0, x1, y1];
    of a volume's feature voxels (bool (d, h, w)): [x0, y0, z0, x1, y1, z1] in original voxels."""
    idx = np.nonzero(cells)
    grid = tuple(cells.shape)
    a = list(geometry.cell_box(*(int(i.min()) for i in idx), grid))  # the first cell's box
    b = list(geometry.cell_box(*(int(i.max()) for i in idx), grid))  # the last cell's box
    return a[: cells.ndim] + b[cells.ndim :]


def clip_box(box: list[int], clip: list[int]) -> list[int]:
    """The part of box inside clip (the two always overlap for a region's own cells); boxes are
    [x0, y0, x1, y1] or [x0, y0, z0, x1, y1, z1]."""
    n = len(box) // 2
    lo = [max(box[a], clip[a]) for a in range(n)]
    hi = [min(box[n + a], clip[n + a]) for a in range(n)]
    if any(h <= low for low, h in zip(lo, hi, strict=True)):
        return list(clip)
    return lo + hi


def stored_decomposition(
    qz: np.ndarray,
    qw: np.ndarray,
    cz: np.ndarray,
    cw: np.ndarray,
    similarity: float,
    query_grid: tuple[int, int],
    case_grid: tuple[int, int],
) -> SimilarityDecomposition:
    """The decomposition of retrieval.explain.similarity from projected cells z = P·F and
    pooling weights (query: this query's pass; case: the region index), no image involved.

    T_ij = w_i w_j z_i·z_j / (‖Σ w z‖_q ‖Σ w z‖_c); `similarity` is the index's cosine, so the
    completeness error still checks the stored cells against the stored embedding.
    """
    import torch  # torch's matmul, like decompose(): numpy's BLAS threads thrash on busy cores

    qa = torch.as_tensor(np.asarray(qw, np.float64).reshape(-1, 1) * np.asarray(qz, np.float64))
    ca = torch.as_tensor(np.asarray(cw, np.float64).reshape(-1, 1) * np.asarray(cz, np.float64))
    norm = qa.sum(0).norm().clamp_min(1e-12) * ca.sum(0).norm().clamp_min(1e-12)
    terms = (qa @ ca.T / norm).numpy()
    return SimilarityDecomposition(terms, float(similarity), tuple(query_grid), tuple(case_grid))


def stored_decompositions(
    qz: np.ndarray,
    qw: np.ndarray,
    cz: np.ndarray,
    cw: np.ndarray,
    similarities,
    query_grid: tuple[int, int],
    case_grid: tuple[int, int],
    extent: StoredExtent | None = None,
) -> list[SimilarityDecomposition]:
    """stored_decomposition for k cases at once: cz (k, n, D), cw (k, n) -> k decompositions
    (one batched matmul; a query's neighbours are decomposed together). ``extent``: the model's
    extent code, split over the lesion cells as retrieval.explain.similarity does."""
    import torch

    qa = torch.as_tensor(np.asarray(qw, np.float64).reshape(-1, 1) * np.asarray(qz, np.float64))
    ca = torch.as_tensor(np.asarray(cw, np.float64)[..., None] * np.asarray(cz, np.float64))
    norm = qa.sum(0).norm().clamp_min(1e-12) * ca.sum(1).norm(dim=1).clamp_min(1e-12)  # (k,)
    terms = torch.matmul(qa, ca.transpose(1, 2)) / norm[:, None, None]  # (k, m, n)
    extents = [0.0] * len(terms)
    if extent is not None:
        from retrieval.explain.similarity import extent_allocation, with_extent_terms

        q_alloc = extent_allocation(extent.query_fraction[None], np.asarray(qw)[None])[0]
        c_alloc = extent_allocation(extent.case_fractions, np.asarray(cw))
        extents = [float(v) for v in extent.case_codes @ extent.query_code]
        for i in range(len(terms)):
            terms[i] = with_extent_terms(terms[i], extent.weight, extents[i], q_alloc, c_alloc[i])
    return [
        SimilarityDecomposition(t, float(s), tuple(query_grid), tuple(case_grid), e)
        for t, s, e in zip(terms.numpy(), similarities, extents, strict=True)
    ]


@dataclass
class StoredExtent:
    """The extent code of a query and of k stored cases (retrieval.model.extent)."""

    weight: float  # c
    query_code: np.ndarray  # (2,) extent.code of the query: the vector's last two entries
    case_codes: np.ndarray  # (k, 2); case i's extent term is case_codes[i] · query_code
    query_fraction: np.ndarray  # (m,) predicted lesion share per query cell
    case_fractions: np.ndarray  # (k, n)


def restrict_rows(dec: SimilarityDecomposition, cells: np.ndarray) -> SimilarityDecomposition:
    """The decomposition with every term whose query cell lies outside `cells` set to zero:
    matched regions of a region query then start inside the region."""
    terms = dec.terms * np.asarray(cells, bool).reshape(-1, 1)
    return SimilarityDecomposition(terms, dec.similarity, dec.query_grid, dec.case_grid)
