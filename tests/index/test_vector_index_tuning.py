"""VectorIndex.build's training sample, IVF-PQ training and refine knobs (bench/search_scale.py)."""

from __future__ import annotations

import faiss
import numpy as np

import index.vector_index as vi
from index.vector_index import VectorIndex


def _unit(n, d, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_ivf_trains_on_a_fixed_sample_of_per_list_times_nlist():
    v = _unit(20_000, 8)
    index = faiss.index_factory(8, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    a = vi._training_sample(index, v, per_list=64)
    b = vi._training_sample(index, v, per_list=64)
    assert len(a) == max(64 * 16, vi.MIN_TRAIN) < len(v)
    np.testing.assert_array_equal(a, b)  # same seed, same index
    assert len(vi._training_sample(index, v[:500], per_list=64)) == 500  # fewer: all of them
    flat = faiss.index_factory(8, "Flat", faiss.METRIC_INNER_PRODUCT)
    assert vi._training_sample(flat, v, per_list=64) is v


def test_ivfpq_skips_polysemous_training_and_refine_reranks(tmp_path):
    v = _unit(3000, 16, seed=1)
    idx = VectorIndex.build(v, "IVF16,PQ4,RFlat")
    ivfpq = faiss.downcast_index(faiss.try_extract_index_ivf(idx.index))
    assert not ivfpq.do_polysemous_training
    assert faiss.downcast_index(idx.index).k_factor == vi.REFINE_K_FACTOR
    _, ids = idx.search(v[:20], 1)
    assert (ids[:, 0] == np.arange(20)).mean() >= 0.9  # exact re-ranking finds the vector itself
    idx.save(tmp_path / "x.faiss")
    back = VectorIndex.load(tmp_path / "x.faiss", "IVF16,PQ4,RFlat")
    assert faiss.downcast_index(back.index).k_factor == vi.REFINE_K_FACTOR


def test_single_query_search_runs_on_one_thread_and_restores_the_count():
    v = _unit(3000, 16, seed=2)
    idx = VectorIndex.build(v, "Flat")
    batch = idx.search(v[:4], 5)
    real, seen = idx.index, []

    class Spy:  # records the OpenMP thread count FAISS would use for each search
        ntotal = real.ntotal

        def search(self, q, k):
            seen.append((len(q), faiss.omp_get_max_threads()))
            return real.search(q, k)

    before = faiss.omp_get_max_threads()
    idx.index = Spy()
    for i in range(4):
        s, ids = idx.search(v[i], 5)
        np.testing.assert_array_equal(ids[0], batch[1][i])
    idx.search(v[:4], 5)
    assert faiss.omp_get_max_threads() == before
    assert seen[:4] == [(1, 1)] * 4
    assert seen[4] == (4, before)
