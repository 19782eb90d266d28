"""One vector-index type behind FAISS index-factory strings.

Vectors are L2-normalised embeddings and the metric is inner product, so
scores are cosine similarities. `factory="auto"` picks by size (the rule is
`auto_factory`; bench/search_scale.py measures it). With CUDA and faiss-gpu
the index is copied onto the GPU (StandardGpuResources); with CUDA but no
faiss-gpu an exact index is searched as a torch matmul + top-k on the GPU;
otherwise FAISS on the CPU. Stored with faiss.write_index (FAISS's own binary
format, never pickle).
"""

from __future__ import annotations

import math
from pathlib import Path

import faiss
import numpy as np

from retrieval.errors import BundleError, CasebaseError

EXACT_LIMIT = 50_000


def auto_factory(n: int) -> str:
    """Exact search up to 50k vectors; beyond, IVF with ~4·√n lists (HNSW costs far more to build)."""
    if n <= EXACT_LIMIT:
        return "Flat"
    nlist = int(2 ** round(math.log2(4 * math.sqrt(n))))
    return f"IVF{nlist},Flat"


def _gpu_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


class VectorIndex:
    """A FAISS index over (N, D) float32 unit vectors, searched by inner product."""

    def __init__(self, index: faiss.Index, factory: str):
        self.index = index
        self.factory = factory
        self._gpu_index = None
        self._torch_matrix = None
        self.backend = "faiss-cpu"

    @classmethod
    def build(cls, vectors: np.ndarray, factory: str = "auto", nprobe: int | None = None) -> VectorIndex:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise CasebaseError("cannot build an index from zero vectors")
        n, d = vectors.shape
        spec = auto_factory(n) if factory == "auto" else factory
        try:
            index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as err:
            raise CasebaseError(f"--factory {spec!r} is not a valid FAISS factory string ({err})") from None
        if not index.is_trained:
            if n < 40:
                raise CasebaseError(f"factory {spec!r} needs training data; {n} vectors are too few")
            try:
                index.train(vectors)
            except RuntimeError as err:
                raise CasebaseError(f"cannot train FAISS index {spec!r} on {n} vectors: {err}") from None
        index.add(vectors)
        out = cls(index, spec)
        out.tune(nprobe)
        return out

    def tune(self, nprobe: int | None = None) -> None:
        """Search-time knobs: nprobe for IVF (default 32), efSearch for HNSW (default 128)."""
        ivf = faiss.try_extract_index_ivf(self.index) if hasattr(faiss, "try_extract_index_ivf") else None
        if ivf is not None:
            ivf.nprobe = nprobe or min(ivf.nlist, 32)
        hnsw = getattr(faiss.downcast_index(self.index), "hnsw", None)
        if hnsw is not None:
            hnsw.efSearch = max(hnsw.efSearch, 128)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def use_gpu(self) -> str:
        """Move search onto a GPU when one is present; returns the backend in use."""
        if not _gpu_available():
            return self.backend
        if hasattr(faiss, "StandardGpuResources"):
            try:
                self._res = faiss.StandardGpuResources()
                self._gpu_index = faiss.index_cpu_to_gpu(self._res, 0, self.index)
                self.backend = "faiss-gpu"
                return self.backend
            except Exception:  # noqa: BLE001 - an index type the GPU lacks: fall through
                self._gpu_index = None
        if self.factory == "Flat":
            import torch

            mat = self.index.reconstruct_n(0, self.ntotal)
            self._torch_matrix = torch.from_numpy(mat).cuda()
            self.backend = "torch-cuda"
        return self.backend

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, ids), each (Q, k); ids are -1 where fewer than k exist."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = max(1, min(int(k), self.ntotal))
        if self._torch_matrix is not None:
            import torch

            sims = torch.from_numpy(q).to(self._torch_matrix.device) @ self._torch_matrix.T
            top = torch.topk(sims, k, dim=1)
            return top.values.cpu().numpy(), top.indices.cpu().numpy().astype(np.int64)
        index = self._gpu_index if self._gpu_index is not None else self.index
        return index.search(q, k)

    def reconstruct_all(self) -> np.ndarray:
        """All stored vectors in id order (exact for Flat/HNSW-Flat/IVF-Flat)."""
        ivf = faiss.try_extract_index_ivf(self.index) if hasattr(faiss, "try_extract_index_ivf") else None
        if ivf is not None:
            ivf.make_direct_map()
        return self.index.reconstruct_n(0, self.ntotal)

    def save(self, path: str | Path) -> None:
        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: str | Path, factory: str) -> VectorIndex:
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as err:
            raise BundleError(f"{path}: not a readable FAISS index ({err})") from None
        out = cls(index, factory)
        out.tune()
        return out
