import numpy as np
import pytest

from index.vector_index import EXACT_LIMIT, VectorIndex, auto_factory
from retrieval.errors import CasebaseError


def _unit(n, d, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_auto_rule_exact_below_limit_ivf_beyond():
    assert auto_factory(10) == "Flat"
    assert auto_factory(EXACT_LIMIT) == "Flat"
    assert auto_factory(1_000_000).startswith("IVF") and auto_factory(1_000_000).endswith(",Flat")


def test_flat_search_is_exact_inner_product():
    v = _unit(200, 16)
    idx = VectorIndex.build(v, "auto")
    sims, ids = idx.search(v[:5], 3)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-5)
    brute = v[:5] @ v.T
    np.testing.assert_allclose(sims, -np.sort(-brute, axis=1)[:, :3], atol=1e-5)


def test_ivf_and_hnsw_factories_and_roundtrip(tmp_path):
    v = _unit(2000, 16, seed=1)
    for spec in ("IVF16,Flat", "HNSW16"):
        idx = VectorIndex.build(v, spec)
        _, ids = idx.search(v[:20], 1)
        assert (ids[:, 0] == np.arange(20)).mean() >= 0.9, spec
        idx.save(tmp_path / "x.faiss")
        back = VectorIndex.load(tmp_path / "x.faiss", spec)
        assert back.ntotal == 2000
        np.testing.assert_allclose(back.reconstruct_all()[:3], v[:3], atol=1e-6)


def test_bad_factory_is_a_user_error():
    with pytest.raises(CasebaseError, match="factory"):
        VectorIndex.build(_unit(50, 8), "NotAnIndex123")


def test_k_larger_than_index_is_clipped():
    idx = VectorIndex.build(_unit(4, 8), "Flat")
    sims, ids = idx.search(_unit(1, 8), 10)
    assert ids.shape == (1, 4)


def test_gpu_fallback_without_cuda_keeps_cpu_backend():
    idx = VectorIndex.build(_unit(10, 8), "Flat")
    import torch

    backend = idx.use_gpu()
    assert backend == ("faiss-cpu" if not torch.cuda.is_available() else backend)
    assert idx.search(_unit(1, 8), 2)[1].shape == (1, 2)


def test_ondisk_ivf_roundtrip_from_another_folder(tmp_path, monkeypatch):
    import index.vector_index as vi

    monkeypatch.setattr(vi, "SHARD_SIZE", 700)  # three shards merged into one lists file
    v = _unit(2000, 16, seed=3)
    idx = VectorIndex.build(v, "OnDisk:IVF16,Flat")
    (tmp_path / "b").mkdir()
    idx.save(tmp_path / "b" / "vectors.faiss")
    assert (tmp_path / "b" / vi.IVFDATA).is_file()
    monkeypatch.chdir(tmp_path)
    back = VectorIndex.load(tmp_path / "b" / "vectors.faiss", "OnDisk:IVF16,Flat")
    back.tune(16)
    _, ids = back.search(v[:50], 10)
    exact = np.argsort(-(v[:50] @ v.T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact, strict=True)])
    assert recall == 1.0  # nprobe = nlist: exhaustive


def test_auto_goes_on_disk_only_beyond_a_quarter_of_ram(monkeypatch):
    import index.vector_index as vi

    monkeypatch.setattr(vi, "_ram_bytes", lambda: 4 * 128 * 4 * 1_000_000)
    assert vi.auto_factory(900_000, 128).startswith("IVF")
    assert vi.auto_factory(1_100_000, 128).startswith(vi.ONDISK)


def test_index_build_refuses_duplicate_case_ids(tiny_index, phantom_dir, tmp_path):
    import pandas as pd

    from index.builder import build_index

    df = pd.read_csv(phantom_dir / "manifest.csv", dtype=str).fillna("")
    df["image"] = [str(phantom_dir / p) for p in df["image"]]
    df.loc[1, "case_id"] = df.loc[0, "case_id"]
    df.to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(CasebaseError, match=f"duplicate case_id {df.loc[0, 'case_id']}"):
        build_index(
            tiny_index.parent / "model", tmp_path / "m.csv", tmp_path / "out", progress=False
        )
    assert not (tmp_path / "out").exists()


def test_reconstruct_is_numpy_even_after_faiss_torch_utils_import():
    import faiss.contrib.torch_utils  # noqa: F401 - patches faiss methods process-wide

    v = _unit(30, 8)
    out = VectorIndex.build(v, "Flat").reconstruct_all()
    assert isinstance(out, np.ndarray) and np.allclose(out, v, atol=1e-6)
