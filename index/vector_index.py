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

import contextlib
import math
import os
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np

from retrieval.errors import BundleError, CasebaseError

try:
    import faiss
except ImportError:  # the FAISS flavour is an extra (pyproject: cpu or gpu), not a base dependency
    raise CasebaseError(
        "FAISS is not installed: pip install -e '.[cpu]' (or '.[gpu]' with CUDA; never both)"
    ) from None

EXACT_LIMIT = 50_000
# k-means points per IVF list when training (FAISS warns below 39 and samples 256 itself).
# bench/search_scale.py, 1M clustered vectors, IVF1024: 64/list builds in 17 s vs 40 s and
# loses 0.005 recall@10 at the default nprobe 32 (0.967 vs 0.972); IVF4096 (the auto choice
# at 1M) trains on 262k instead of all 1M vectors and keeps recall@10 0.999.
TRAIN_PER_LIST = 64
MIN_TRAIN = 16_384  # PQ codebooks want ~40 x 256 points whatever the list count
REFINE_K_FACTOR = 4  # "...,RFlat": re-rank 4k approximate candidates exactly
GPU_MAX_K = 2048  # faiss-gpu's largest k (GPU_MAX_SELECTION_K)
ONDISK = "OnDisk:"  # prefix: IVF whose inverted lists live in a memory-mapped file
IVFDATA = "vectors.ivfdata"
SHARD_SIZE = 1_000_000
_CWD_LOCK = threading.Lock()


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def auto_factory(n: int, dim: int = 128) -> str:
    """The `--factory auto` rule.

    Exact `Flat` up to 50k vectors; beyond, `IVF{~4·√n},Flat` (HNSW costs far
    more to build on few cores). Measured (bench/search_scale.py, 2 shared
    cores, one query on one thread): Flat costs ~55 ns per vector (2.8 ms at
    50k, 56 ms at 1M); IVF4096 at 1M with nprobe 32 gives recall@10 0.999 at
    80x Flat's speed, IVF1024 at 100k recall 1.000 at 27x; HNSW32 took 62 s
    to build 200k vectors (IVF4096: 138 s for 1M), needs 784 vs 522 B/vector
    and answers no faster (0.82 ms at 200k, efSearch 128, recall 0.992);
    IVF-PQ (41 B/vector) reaches only 0.39 recall@10 (0.93 with 16x exact
    re-ranking, which keeps the full vectors). When the raw vectors would take more than a
    quarter of this machine's RAM, the IVF's inverted lists go to disk
    (`OnDisk:` prefix): built shard by shard, merged into one memory-mapped
    `vectors.ivfdata`, so search touches only the lists it probes.
    """
    if n <= EXACT_LIMIT:
        return "Flat"
    nlist = int(2 ** round(math.log2(4 * math.sqrt(n))))
    spec = f"IVF{nlist},Flat"
    return ONDISK + spec if n * dim * 4 > _ram_bytes() // 4 else spec


@contextlib.contextmanager
def _in_dir(path: Path):
    """FAISS resolves the on-disk lists' file name against the working directory."""
    with _CWD_LOCK:
        old = os.getcwd()
        os.chdir(path)
        try:
            yield
        finally:
            os.chdir(old)


def _build_ondisk(
    vectors: np.ndarray, inner: str, workdir: Path, train_per_list: int = TRAIN_PER_LIST
) -> faiss.Index:
    d = vectors.shape[1]
    trained = faiss.index_factory(d, inner, faiss.METRIC_INNER_PRODUCT)
    if faiss.try_extract_index_ivf(trained) is None:
        raise CasebaseError(
            f"{ONDISK}{inner}: on-disk lists need an IVF factory (e.g. IVF4096,Flat)"
        )
    _skip_polysemous(trained)
    trained.train(_training_sample(trained, vectors, train_per_list))
    from faiss.contrib.ondisk import merge_ondisk

    names = []
    with _in_dir(workdir):
        for k, start in enumerate(range(0, len(vectors), SHARD_SIZE)):
            shard = faiss.clone_index(trained)
            chunk = vectors[start : start + SHARD_SIZE]
            shard.add_with_ids(chunk, np.arange(start, start + len(chunk), dtype=np.int64))
            names.append(f"shard{k}.faiss")
            faiss.write_index(shard, names[-1])
            del shard
        merge_ondisk(trained, names, IVFDATA)
        for n in names:
            os.unlink(n)
    return trained


def _gpu_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


@contextlib.contextmanager
def _omp_threads(n: int):
    """Run FAISS with n OpenMP threads in this thread, then restore.

    A single query on a Flat index is split over every core; on a busy machine
    the threads' barrier waits then dominate (bench/search_scale.py, 2 shared
    cores: 100k Flat, one query 5.6 ms on 1 thread vs 36 ms on 2). libgomp keeps
    the thread count per calling thread, so concurrent callers do not interfere.
    """
    old = faiss.omp_get_max_threads()
    if old == n:
        yield
        return
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)


def _skip_polysemous(index: faiss.Index) -> None:
    """IVF-PQ factories train polysemous codes by default; search never uses them here
    (polysemous_ht stays 0) and they cost ~8x the rest of the training (bench/search_scale.py)."""
    ivf = faiss.try_extract_index_ivf(index) if hasattr(faiss, "try_extract_index_ivf") else None
    if ivf is not None and hasattr(faiss, "IndexIVFPQ"):
        ivfpq = faiss.downcast_index(ivf)
        if isinstance(ivfpq, faiss.IndexIVFPQ):
            ivfpq.do_polysemous_training = False


def _training_sample(
    index: faiss.Index, vectors: np.ndarray, per_list: int, seed: int = 0
) -> np.ndarray:
    """A fixed-seed sample of at most per_list x nlist vectors for IVF k-means (all if fewer)."""
    ivf = faiss.try_extract_index_ivf(index) if hasattr(faiss, "try_extract_index_ivf") else None
    if ivf is None:
        return vectors
    cap = max(per_list * int(ivf.nlist), MIN_TRAIN)
    if len(vectors) <= cap:
        return vectors
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), cap, replace=False))
    return vectors[rows]


class VectorIndex:
    """A FAISS index over (N, D) float32 unit vectors, searched by inner product."""

    def __init__(self, index: faiss.Index, factory: str):
        self.index = index
        self.factory = factory
        self._gpu_index = None
        self._torch_matrix = None
        self._workdir: Path | None = None
        self.backend = "faiss-cpu"

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        factory: str = "auto",
        nprobe: int | None = None,
        train_per_list: int = TRAIN_PER_LIST,
    ) -> VectorIndex:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise CasebaseError("cannot build an index from zero vectors")
        n, d = vectors.shape
        spec = auto_factory(n, d) if factory == "auto" else factory
        if spec.startswith(ONDISK):
            if n < 40:
                raise CasebaseError(
                    f"factory {spec!r} needs training data; {n} vectors are too few"
                )
            workdir = Path(tempfile.mkdtemp(prefix="casebase-ondisk-"))
            try:
                index = _build_ondisk(vectors, spec[len(ONDISK) :], workdir, train_per_list)
            except RuntimeError as err:
                shutil.rmtree(workdir, ignore_errors=True)
                raise CasebaseError(f"cannot build {spec!r}: {err}") from None
            out = cls(index, spec)
            out._workdir = workdir
            out.tune(nprobe)
            return out
        try:
            index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as err:
            raise CasebaseError(
                f"--factory {spec!r} is not a valid FAISS factory string ({err})"
            ) from None
        if not index.is_trained:
            if n < 40:
                raise CasebaseError(
                    f"factory {spec!r} needs training data; {n} vectors are too few"
                )
            _skip_polysemous(index)
            try:
                index.train(_training_sample(index, vectors, train_per_list))
            except RuntimeError as err:
                raise CasebaseError(
                    f"cannot train FAISS index {spec!r} on {n} vectors: {err}"
                ) from None
        index.add(vectors)
        out = cls(index, spec)
        out.tune(nprobe)
        return out

    def tune(self, nprobe: int | None = None) -> None:
        """Search-time knobs: nprobe for IVF (default 32), efSearch for HNSW (default 128),
        k_factor for a refined index (default 4)."""
        ivf = (
            faiss.try_extract_index_ivf(self.index)
            if hasattr(faiss, "try_extract_index_ivf")
            else None
        )
        if ivf is not None:
            ivf.nprobe = nprobe or min(ivf.nlist, 32)
        hnsw = getattr(faiss.downcast_index(self.index), "hnsw", None)
        if hnsw is not None:
            hnsw.efSearch = max(hnsw.efSearch, 128)
        top = faiss.downcast_index(self.index)
        if isinstance(top, faiss.IndexRefine):
            top.k_factor = max(float(top.k_factor), float(REFINE_K_FACTOR))

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

            mat = self.reconstruct_all()
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
        # FAISS's GPU indexes select at most GPU_MAX_K neighbours; the service widens k
        # past that when filters reject many hits, so such searches run on the CPU copy.
        gpu = self._gpu_index is not None and k <= GPU_MAX_K
        if gpu or len(q) > 1:
            return (self._gpu_index if gpu else self.index).search(q, k)
        with _omp_threads(1):
            return self.index.search(q, k)

    def reconstruct_all(self) -> np.ndarray:
        """All stored vectors in id order (exact for Flat/HNSW-Flat/IVF-Flat)."""
        ivf = (
            faiss.try_extract_index_ivf(self.index)
            if hasattr(faiss, "try_extract_index_ivf")
            else None
        )
        if ivf is not None:
            ivf.make_direct_map()
        out = self.index.reconstruct_n(0, self.ntotal)
        # faiss.contrib.torch_utils (imported by pytorch-metric-learning) makes this return a
        # torch tensor once anything has imported it: always hand back numpy.
        return np.ascontiguousarray(
            out.cpu().numpy() if hasattr(out, "cpu") else out, dtype=np.float32
        )

    def save(self, path: str | Path) -> None:
        """Write the index; an on-disk index also moves its lists file beside it."""
        path = Path(path)
        faiss.write_index(self.index, str(path))
        if self._workdir is not None:
            shutil.copyfile(self._workdir / IVFDATA, path.parent / IVFDATA)

    def __del__(self):
        if getattr(self, "_workdir", None) is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)

    @classmethod
    def load(cls, path: str | Path, factory: str) -> VectorIndex:
        path = Path(path)
        try:
            if factory.startswith(ONDISK):
                if not (path.parent / IVFDATA).is_file():
                    raise BundleError(
                        f"{path.parent / IVFDATA}: missing (the on-disk inverted lists)"
                    )
                with _in_dir(path.parent):
                    index = faiss.read_index(path.name, faiss.IO_FLAG_READ_ONLY)
            else:
                index = faiss.read_index(str(path))
        except RuntimeError as err:
            raise BundleError(f"{path}: not a readable FAISS index ({err})") from None
        out = cls(index, factory)
        out.tune()
        return out
