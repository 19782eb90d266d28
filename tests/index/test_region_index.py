"""The region index: cell storage, factory rule, and MaxSim search against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from index import region_index as ri
from retrieval.errors import BundleError


def _cells(n=300, hw=16, d=32, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, d))
    lab = rng.integers(0, 12, (n, hw))
    z = centres[lab] + 0.6 * rng.standard_normal((n, hw, d))
    w = rng.random((n, hw))
    return z.astype(np.float32), (w / w.sum(1, keepdims=True)).astype(np.float32)


def _brute(cells, q, k):
    z = ri.unit(cells)
    qu = ri.unit(q)
    scores = np.einsum("md,njd->nmj", qu, z).max(axis=2).mean(axis=1)
    return np.argsort(-scores, kind="stable")[:k], scores


def _write(tmp_path, cells, w, factory="auto", grid=(4, 4)):
    sizes = np.tile([[64, 48]], (len(cells), 1))
    entry = ri.write(tmp_path, cells, w, sizes, factory)
    return ri.RegionIndex.load(tmp_path, {"regions": {**entry, "grid": list(grid)}}), entry


def test_factory_rule_by_size():
    assert ri.auto_region_factory(1000, 128) == "Flat"
    assert ri.auto_region_factory(ri.EXACT_CELLS, 128) == "Flat"
    big = ri.auto_region_factory(6_400_000, 128)  # 100k cases at 8x8
    assert big.startswith("IVF") and big.endswith(",PQ32")
    assert ri.auto_region_factory(64_000_000, 96).endswith(",PQ24")  # PQ m divides the dim


def test_roundtrip_embedding_and_exact_search(tmp_path):
    cells, w = _cells()
    idx, entry = _write(tmp_path, cells, w)
    assert entry["factory"] == "Flat" and entry["cells"] == 300 * 16 and entry["dtype"] == "float32"
    assert idx.index.ntotal == 300 * 16
    z, ww = idx.case(7)
    np.testing.assert_allclose(z, cells[7], rtol=0, atol=0)
    e = w[7] @ cells[7].astype(np.float64)
    np.testing.assert_allclose(idx.embedding(7), e / np.linalg.norm(e), atol=1e-6)
    # FAISS ids are row * h*w + cell: the stored unit vector of (row 5, cell 3)
    np.testing.assert_allclose(idx.index.reconstruct(5 * 16 + 3), ri.unit(cells[5, 3]), atol=1e-6)
    q = cells[11, [0, 1, 4, 5]] + 0.1
    top, scores = _brute(cells, q, 10)
    hits = idx.search(q, 10)  # 300 cases <= RESCORE_ALL: every case rescored
    assert [h.row for h in hits] == top.tolist()
    np.testing.assert_allclose([h.score for h in hits], scores[top], atol=1e-5)


def test_shortlist_path_and_filters(tmp_path, monkeypatch):
    cells, w = _cells(n=400)
    idx, _ = _write(tmp_path, cells, w)
    monkeypatch.setattr(ri, "RESCORE_ALL", 0)  # force FAISS candidates + exact rescoring
    rng = np.random.default_rng(1)
    recall = []
    for _ in range(10):
        q = cells[rng.integers(400), rng.choice(16, 4, replace=False)]
        q = q + 0.3 * rng.standard_normal(q.shape).astype(np.float32)
        top, _ = _brute(cells, q, 10)
        got = [h.row for h in idx.search(q, 10, shortlist=64)]
        recall.append(len(set(got) & set(top.tolist())) / 10)
    assert np.mean(recall) >= 0.9
    allowed = np.zeros(400, bool)
    allowed[::7] = True  # a filter that the shortlist mostly misses: the search widens
    q = cells[3, :4]
    hits = idx.search(q, 5, allowed=allowed, shortlist=16)
    assert len(hits) == 5 and all(allowed[h.row] for h in hits)
    sub = np.nonzero(allowed)[0]
    top, _ = _brute(cells[sub], q, 5)
    assert len({h.row for h in hits} & set(sub[top].tolist())) >= 4  # shortlist scaled by 7


def test_compressed_factory_builds_and_keeps_recall(tmp_path, monkeypatch):
    import faiss

    cells, w = _cells(n=600, d=32)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # OpenMP spin-waits cost 50x on a shared, loaded machine
    try:
        idx, entry = _write(tmp_path, cells, w, factory="IVF8,PQ8x4")
    finally:
        faiss.omp_set_num_threads(threads)
    assert entry["factory"] == "IVF8,PQ8x4"
    monkeypatch.setattr(ri, "RESCORE_ALL", 0)
    q = cells[42, [2, 3, 6, 7]]
    top, _ = _brute(cells, q, 10)
    got = [h.row for h in idx.search(q, 10)]
    assert len(set(got) & set(top.tolist())) >= 9


def test_large_cells_are_stored_in_float16(tmp_path, monkeypatch):
    cells, w = _cells(n=50)
    monkeypatch.setattr(ri, "CELLS_F32_LIMIT", 1)
    idx, entry = _write(tmp_path, cells, w)
    assert entry["dtype"] == "float16" and idx.cells.dtype == np.float16
    np.testing.assert_allclose(idx.case(3)[0], cells[3], rtol=2e-3, atol=2e-3)


def test_disagreeing_files_are_refused(tmp_path):
    cells, w = _cells(n=20)
    _, entry = _write(tmp_path, cells, w)
    np.save(tmp_path / ri.WEIGHTS_FILE, w[:10], allow_pickle=False)
    with pytest.raises(BundleError, match="disagree"):
        ri.RegionIndex.load(tmp_path, {"regions": {**entry, "grid": [4, 4]}})
    assert ri.RegionIndex.load(tmp_path, {}) is None  # a format-1 bundle has none


def test_cells_written_in_place_give_the_same_index(tmp_path, monkeypatch):
    """A set too large for RAM is drawn straight into cells.npy (bench/refine.py at 1M cases):
    write(cells_saved=True) keeps that file and indexes it as if it had been handed over."""
    cells, w = _cells(n=60)
    monkeypatch.setattr(ri, "CELLS_F32_LIMIT", 1)  # float16, as at scale
    sizes = np.tile([[64, 48]], (len(cells), 1))
    ref = tmp_path / "ref"
    ref.mkdir()
    entry_ref = ri.write(ref, cells, w, sizes)
    mine = tmp_path / "mine"
    (mine / ri.REGION_DIR).mkdir(parents=True)
    mm = np.lib.format.open_memmap(mine / ri.CELLS_FILE, "w+", np.float16, cells.shape)
    mm[:] = cells
    mm.flush()
    entry = ri.write(mine, mm, w, sizes, cells_saved=True)
    assert entry == entry_ref
    a = ri.RegionIndex.load(ref, {"regions": {**entry_ref, "grid": [4, 4]}})
    b = ri.RegionIndex.load(mine, {"regions": {**entry, "grid": [4, 4]}})
    np.testing.assert_array_equal(np.asarray(a.cells), np.asarray(b.cells))
    q = cells[5, [0, 1]]
    assert [h.row for h in a.search(q, 5)] == [h.row for h in b.search(q, 5)]
    # a saved file of another dtype than the bundle keeps is refused, not silently indexed
    bad = tmp_path / "bad"
    (bad / ri.REGION_DIR).mkdir(parents=True)
    mm32 = np.lib.format.open_memmap(bad / ri.CELLS_FILE, "w+", np.float32, cells.shape)
    with pytest.raises(ValueError, match="float16"):
        ri.write(bad, mm32, w, sizes, cells_saved=True)


def test_probed_lists_grow_with_the_list_count():
    assert ri.nprobe_for(64) == 32  # never under 32 lists ...
    assert ri.nprobe_for(16) == 16  # ... nor more than there are
    assert ri.nprobe_for(2048) == 128 and ri.nprobe_for(8192) == 512  # 100k, 1M cases
