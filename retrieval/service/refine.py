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


def parse_box(text: str) -> tuple[float, float, float, float]:
    """'X0,Y0,X1,Y1' -> four numbers (CasebaseError otherwise)."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        vals = []
    if len(vals) != 4 or not all(np.isfinite(vals)):
        raise CasebaseError(f"--region {text!r}: use X0,Y0,X1,Y1 (pixels of the query image)")
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
    cells: np.ndarray  # (h, w) bool: the feature cells searched
    searched: list[int]  # original-pixel bounding box of those cells
    clip: list[int]  # matched regions' query boxes are clipped to this box
    note: str = ""  # e.g. widened to one cell


def select_cells(box, geometry, grid: tuple[int, int]) -> RegionSelection:
    """Feature cells of a query box in original pixels; clear errors for unusable boxes.

    A cell belongs to the region when the box covers at least MIN_CELL_OVERLAP of it. A box
    that covers no cell that much (smaller than a cell, or a thin strip) is widened to the cell
    under its centre, and the note says so.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    h_img, w_img = geometry.original_size
    asked = [int(round(v)) for v in (x0, y0, x1, y1)]
    if x1 <= x0 or y1 <= y0:
        kind = "empty" if (x1 == x0 or y1 == y0) else "inverted"
        raise CasebaseError(f"region {asked} is {kind}: give X0,Y0,X1,Y1 with X0 < X1 and Y0 < Y1")
    if x0 < 0 or y0 < 0 or x1 > w_img or y1 > h_img:
        raise CasebaseError(
            f"region {asked} lies outside the image (width {w_img}, height {h_img}; "
            f"boxes run from 0,0 to {w_img},{h_img})"
        )
    gh, gw = grid
    sx, sy = geometry.scale  # original pixels per model-input pixel
    cw, ch = geometry.input_size / gw * sx, geometry.input_size / gh * sy  # cell in original px
    cols = np.arange(gw)
    rows = np.arange(gh)
    ox = np.clip(np.minimum(x1, (cols + 1) * cw) - np.maximum(x0, cols * cw), 0, None) / cw
    oy = np.clip(np.minimum(y1, (rows + 1) * ch) - np.maximum(y0, rows * ch), 0, None) / ch
    cells = np.outer(oy, ox) >= MIN_CELL_OVERLAP
    note = ""
    clip = asked
    if not cells.any():
        r = int(min(gh - 1, (y0 + y1) / 2 // ch))
        c = int(min(gw - 1, (x0 + x1) / 2 // cw))
        cells[r, c] = True
        clip = geometry.cell_box(r, c, grid)
        note = (
            f"region {asked} covers less than half of any feature cell "
            f"({cw:.0f}×{ch:.0f} px); widened to the cell {clip}"
        )
    rr, cc = np.nonzero(cells)
    a = geometry.cell_box(int(rr.min()), int(cc.min()), grid)
    b = geometry.cell_box(int(rr.max()), int(cc.max()), grid)
    return RegionSelection(asked, cells, [a[0], a[1], b[2], b[3]], list(clip), note)


def clip_box(box: list[int], clip: list[int]) -> list[int]:
    """The part of box inside clip (the two always overlap for a region's own cells)."""
    x0, y0 = max(box[0], clip[0]), max(box[1], clip[1])
    x1, y1 = min(box[2], clip[2]), min(box[3], clip[3])
    if x1 <= x0 or y1 <= y0:
        return list(clip)
    return [x0, y0, x1, y1]


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
) -> list[SimilarityDecomposition]:
    """stored_decomposition for k cases at once: cz (k, n, D), cw (k, n) -> k decompositions
    (one batched matmul; a query's neighbours are decomposed together)."""
    import torch

    qa = torch.as_tensor(np.asarray(qw, np.float64).reshape(-1, 1) * np.asarray(qz, np.float64))
    ca = torch.as_tensor(np.asarray(cw, np.float64)[..., None] * np.asarray(cz, np.float64))
    norm = qa.sum(0).norm().clamp_min(1e-12) * ca.sum(1).norm(dim=1).clamp_min(1e-12)  # (k,)
    terms = (torch.matmul(qa, ca.transpose(1, 2)) / norm[:, None, None]).numpy()  # (k, m, n)
    return [
        SimilarityDecomposition(t, float(s), tuple(query_grid), tuple(case_grid))
        for t, s in zip(terms, similarities, strict=True)
    ]


def maps_to_original(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Geometry.map_to_original for a stack (k, h, w) of maps of one original size -> (k, H, W)."""
    import torch
    import torch.nn.functional as F

    t = torch.as_tensor(np.asarray(maps, dtype=np.float32))[:, None]
    out = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)
    return np.nan_to_num(out[:, 0].numpy())


def restrict_rows(dec: SimilarityDecomposition, cells: np.ndarray) -> SimilarityDecomposition:
    """The decomposition with every term whose query cell lies outside `cells` set to zero:
    matched regions of a region query then start inside the region."""
    terms = dec.terms * np.asarray(cells, bool).reshape(-1, 1)
    return SimilarityDecomposition(terms, dec.similarity, dec.query_grid, dec.case_grid)
