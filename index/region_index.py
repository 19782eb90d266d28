"""The region-level index: every indexed case's last-feature-map cells, projected by P.

Why these vectors: with z_j = P·F_j (the projection applied to feature-map cell j) and the
pooling weights w_j, the similarity decomposition's term between query cell i and case cell j
is w_i w_j z_i·z_j / (‖Σ w z‖_q ‖Σ w z‖_c) (retrieval.explain.similarity). Storing z and w per
case is therefore enough to (a) rebuild a neighbour's decomposition, hence its matched regions,
without decoding or re-encoding its image, and (b) search a region of the query against every
case's cells: the unit vectors z_j/‖z_j‖ go into a FAISS index (inner product = cosine).

Files, under INDEX_DIR/regions/ (covered by bundle.json's checksums like every file):

    cells.npy    (N, h·w, D) z = P·F: float32, or float16 beyond CELLS_F32_LIMIT bytes;
                 memory-mapped at load, so a query reads only its neighbours' rows
    weights.npy  (N, h·w) float32 pooling weights (each row sums to 1)
    sizes.npy    (N, 2) int32 original (H, W) of each case image (cells -> original pixels);
                 (N, 3) (D, H, W) for volumes
    cells.faiss  unit cell vectors; FAISS id = row·h·w + (i·w + j), so the mapping to
                 (case row, cell i, j) is arithmetic and costs no memory

A volume's cells are the voxels of its feature volume (d·h·w of them, row-major (k, i, j)):
the same files, the same search, boxes in voxels (4×8×8 = 256 cells per 32×64×64 volume).

Memory budget, default 8×8 grid (128 px, stride 16) and D = 128, i.e. 64 cells per case:

    cases   cells    cells.npy (disk, mmap)   cells.faiss (RAM)
    100k    6.4 M    1.6 GB (float16)         Flat 3.3 GB; IVF-PQ32 0.26 GB (32 B code + 8 B id)
    1 M     64 M     16.4 GB (float16)        Flat 33 GB;  IVF-PQ32 2.6 GB

hence `auto_region_factory`: exact `Flat` up to 2^20 cells (16k cases at 8×8), beyond that
`IVF{n},PQ{D/4}` (HNSW coarse quantizer: assigning tens of millions of cells to lists by brute
force would dominate the build on few cores). Compression costs recall only in the shortlist:
`search` takes each query cell's nearest cells as candidates and then rescores every candidate
case exactly from cells.npy (bench/refine.py measures recall@10 against exact MaxSim).

Region score (late interaction, MaxSim as in ColBERT, Khattab & Zaharia 2020): for the query
cells Q inside the box, score(case) = mean_{i∈Q} max_j cos(q_i, z_j). Every query cell in the
box counts the same: the box is the user's statement of what matters, and weighting its cells
by the model's saliency would bring back the model's own attention (on a confounded index, the
shortcut the user is trying to get away from). Case cells are not weighted either: any place
of a case may match.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from index.vector_index import _skip_polysemous
from retrieval.errors import BundleError, CasebaseError

REGION_DIR = "regions"
CELLS_FILE = f"{REGION_DIR}/cells.npy"
WEIGHTS_FILE = f"{REGION_DIR}/weights.npy"
LESION_FILE = f"{REGION_DIR}/lesion.npy"  # models with an extent head only
SIZES_FILE = f"{REGION_DIR}/sizes.npy"
INDEX_FILE = f"{REGION_DIR}/cells.faiss"
EXACT_CELLS = 1 << 20  # Flat up to this many cells (512 MB at D = 128)
CELLS_F32_LIMIT = 1 << 30  # cells.npy in float32 up to 1 GiB, float16 beyond
RESCORE_ALL = 1024  # with at most this many cases every case is rescored exactly (no shortlist)
# nearest cells per query cell whose cases are rescored, and the IVF lists probed: a fixed
# 32 lists (1.6% of them at 100k cases) left recall@10 at 0.91 (100k) and 0.66 (1M, 0.4%);
# a sixteenth of the lists with 1,024 candidates gave 0.997 at 100k (bench/refine.py sweep)
SHORTLIST = 1024
NPROBE_MIN = 32
NPROBE_SHARE = 16


def nprobe_for(nlist: int) -> int:
    """IVF lists to probe: a fixed share of them (recall falls as lists grow finer), >= 32."""
    return int(min(nlist, max(NPROBE_MIN, nlist // NPROBE_SHARE)))


TRAIN_PER_LIST = 64
MIN_TRAIN = 16_384


def auto_region_factory(n_cells: int, dim: int) -> str:
    """`Flat` up to EXACT_CELLS cells; beyond, IVF (HNSW quantizer) with PQ codes of dim/4 bytes."""
    if n_cells <= EXACT_CELLS:
        return "Flat"
    nlist = int(2 ** round(math.log2(math.sqrt(n_cells))))
    m = max(1, dim // 4)
    while dim % m:
        m -= 1
    return f"IVF{nlist}_HNSW32,PQ{m}"


def unit(z: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm (all-zero rows stay zero), float32."""
    z = np.asarray(z, np.float32)
    n = np.linalg.norm(z, axis=-1, keepdims=True)
    return z / np.maximum(n, 1e-12)


def build_cell_index(cells: np.ndarray, factory: str = "auto", seed: int = 0) -> faiss.Index:
    """FAISS inner-product index over the unit cells of (N, h·w, D) `cells`, id = row·h·w + cell."""
    n, hw, d = cells.shape
    spec = auto_region_factory(n * hw, d) if factory == "auto" else factory
    try:
        index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise CasebaseError(f"region index factory {spec!r} is not valid ({err})") from None
    if not index.is_trained:
        _skip_polysemous(index)  # polysemous codes: ~8x the training, never used by search
        ivf = faiss.try_extract_index_ivf(index)
        want = max(MIN_TRAIN, TRAIN_PER_LIST * (ivf.nlist if ivf is not None else 1))
        rng = np.random.default_rng(seed)
        flat = cells.reshape(-1, d)
        rows = np.sort(rng.choice(len(flat), min(want, len(flat)), replace=False))
        index.train(unit(flat[rows]))
    chunk = max(1, 262_144 // hw)
    for start in range(0, n, chunk):
        index.add(unit(cells[start : start + chunk].reshape(-1, d)))
    return index


def cells_dtype(n_cells: int, dim: int) -> type:
    """float32 up to CELLS_F32_LIMIT bytes of cells, float16 beyond."""
    return np.float32 if n_cells * dim * 4 <= CELLS_F32_LIMIT else np.float16


def write(
    root: Path,
    cells: np.ndarray,
    weights: np.ndarray,
    sizes: np.ndarray,
    factory="auto",
    cells_saved: bool = False,
    lesion: np.ndarray | None = None,
) -> dict:
    """Write the region files under root/regions/; returns the bundle.json entry.
    ``cells_saved``: cells is already root/regions/cells.npy, memory-mapped (a set too large
    to hold in RAM, written in place; its dtype must be :func:`cells_dtype`'s)."""
    n, hw, d = cells.shape
    (root / REGION_DIR).mkdir(exist_ok=True)
    dtype = cells_dtype(n * hw, d)
    if not cells_saved:
        np.save(root / CELLS_FILE, cells.astype(dtype, copy=False), allow_pickle=False)
    elif cells.dtype != dtype:
        raise ValueError(f"cells saved as {cells.dtype}, the bundle keeps {np.dtype(dtype)}")
    np.save(root / WEIGHTS_FILE, np.asarray(weights, np.float32), allow_pickle=False)
    np.save(root / SIZES_FILE, np.asarray(sizes, np.int32), allow_pickle=False)
    if lesion is not None:  # the extent head's cell fractions: the extent term's allocation
        np.save(root / LESION_FILE, np.asarray(lesion, np.float32), allow_pickle=False)
    index = build_cell_index(cells, factory)
    faiss.write_index(index, str(root / INDEX_FILE))
    return {
        "cells": int(n * hw),
        "cells_per_case": int(hw),
        "dim": int(d),
        "dtype": np.dtype(dtype).name,
        "factory": auto_region_factory(n * hw, d) if factory == "auto" else factory,
        "vector": "z = P·F per last-feature-map cell (unit-normalised in cells.faiss)",
        "id": "row * cells_per_case + the cell's row-major position in the grid",
        "score": "mean over the query box's cells of the best cosine with any cell of the case",
        "lesion": lesion is not None,
    }


@dataclass
class RegionHit:
    row: int
    score: float  # mean over query cells of their best cosine with one of the case's cells
    best: np.ndarray  # (m,) the case cell each query cell matched best


class RegionIndex:
    """The stored cells of a bundle: per-case decomposition factors and the cell search."""

    def __init__(self, root: Path, meta: dict, grid: tuple[int, int]):
        self.root = Path(root)
        self.meta = meta
        self.grid = grid
        try:
            self.cells = np.load(self.root / CELLS_FILE, mmap_mode="r", allow_pickle=False)
            self.weights = np.load(self.root / WEIGHTS_FILE, allow_pickle=False)
            self.sizes = np.load(self.root / SIZES_FILE, allow_pickle=False)
            self.index = faiss.read_index(str(self.root / INDEX_FILE))
            self.lesion = (
                np.load(self.root / LESION_FILE, allow_pickle=False) if meta.get("lesion") else None
            )
        except (OSError, ValueError, RuntimeError) as err:
            raise BundleError(
                f"{self.root / REGION_DIR}: unreadable region index ({err})"
            ) from None
        n, hw = self.weights.shape
        if (
            self.cells.shape[:2] != (n, hw)
            or hw != int(np.prod(grid))
            or len(self.sizes) != n
            or (self.lesion is not None and self.lesion.shape != (n, hw))
        ):
            raise BundleError(f"{self.root / REGION_DIR}: region files disagree in shape")
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None:
            ivf.nprobe = nprobe_for(ivf.nlist)
        hnsw = getattr(faiss.downcast_index(getattr(ivf, "quantizer", self.index)), "hnsw", None)
        if hnsw is not None:
            hnsw.efSearch = max(hnsw.efSearch, 64)

    @classmethod
    def load(cls, root: Path, meta: dict) -> RegionIndex | None:
        """The bundle's region index, or None for a bundle built before it (format 1)."""
        entry = meta.get("regions")
        if not entry:
            return None
        return cls(root, entry, tuple(entry["grid"]))

    def __len__(self) -> int:
        return int(self.weights.shape[0])

    def case(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(z (h·w, D) float64, w (h·w,) float64) of one case."""
        return np.asarray(self.cells[row], np.float64), self.weights[row].astype(np.float64)

    def embedding(self, row: int) -> np.ndarray:
        """The case's embedding rebuilt from its cells: normalize(Σ_j w_j z_j)."""
        z, w = self.case(row)
        p = w @ z
        return (p / max(np.linalg.norm(p), 1e-12)).astype(np.float32)

    def candidates(self, q: np.ndarray, shortlist: int = SHORTLIST) -> np.ndarray:
        """Rows of the cases owning the `shortlist` nearest cells of each unit query cell."""
        n = len(self)
        if n <= RESCORE_ALL:
            return np.arange(n)
        kk = min(shortlist, self.index.ntotal)
        _, ids = self.index.search(np.ascontiguousarray(q, np.float32), kk)
        ids = ids[ids >= 0]
        return np.unique(ids // int(np.prod(self.grid)))

    def rescore(self, q: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact MaxSim of unit query cells (m, D) against each row's cells -> (scores, best)."""
        rows = np.asarray(rows, np.int64)
        if not len(rows):
            return np.zeros(0), np.zeros((0, len(q)), np.int64)
        scores, best = np.empty(len(rows)), np.empty((len(rows), len(q)), np.int64)
        import torch

        q = np.ascontiguousarray(q, np.float32)
        qt = torch.from_numpy(q)
        hw, d = self.cells.shape[1], self.cells.shape[2]
        for start in range(0, len(rows), 1024):
            part = rows[start : start + 1024]
            order = np.argsort(part)  # sorted reads from the memory map
            # torch, not numpy's BLAS: its threads thrash on busy shared cores (bench/refine.py)
            z = torch.from_numpy(np.asarray(self.cells[part[order]], np.float32))  # (b, hw, D)
            norms = z.norm(dim=2).clamp_min(1e-12)  # (b, hw)
            sims = (z.reshape(-1, d) @ qt.T).reshape(len(part), hw, len(q)) / norms[..., None]
            top = sims.max(dim=1)  # (b, m): each query cell's best case cell
            val, arg = top.values.mean(dim=1).numpy(), top.indices.numpy()
            inv = np.empty_like(order)
            inv[order] = np.arange(len(order))
            scores[start : start + len(part)] = val[inv]
            best[start : start + len(part)] = arg[inv]
        return scores, best

    def search(
        self,
        q: np.ndarray,
        k: int,
        allowed: np.ndarray | None = None,
        shortlist: int = SHORTLIST,
    ) -> list[RegionHit]:
        """Top-k cases by MaxSim of the unit query cells q (m, D); allowed: bool per row."""
        q = unit(np.atleast_2d(q))
        if allowed is not None:  # a filter keeping 1/f of the cases: f times the shortlist
            share = max(int(allowed.sum()), 1) / max(len(self), 1)
            shortlist = int(min(self.index.ntotal, shortlist / share))
        rows = self.candidates(q, shortlist)
        if allowed is not None:
            rows = rows[allowed[rows]]
            if len(rows) < k and len(self) > RESCORE_ALL:  # filters ate the shortlist: widen
                rows = np.nonzero(allowed)[0]
        scores, best = self.rescore(q, rows)
        top = np.argsort(-scores, kind="stable")[:k]
        return [RegionHit(int(rows[t]), float(scores[t]), best[t]) for t in top]
