"""The GPU paths' CPU fallbacks, exercised without a GPU.

With CUDA: training runs under AMP, the model and Grad-CAM run on the device,
FAISS search moves to the GPU (StandardGpuResources) when faiss-gpu is
installed, else an exact index is searched as a torch matmul + top-k.
Without CUDA every one of these falls back to the CPU cleanly. Here
``torch.cuda.is_available`` is monkeypatched both ways; the torch top-k path
is run on the CPU by making ``Tensor.cuda`` a no-op. bench/gpu_path.py runs
the real thing when a GPU is present.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import index.vector_index as vi
from index.vector_index import GPU_MAX_K, VectorIndex
from retrieval.errors import CasebaseError
from retrieval.model.device import resolve_device


def _unit(n, d, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA 'present', but tensors stay on the CPU (so the torch search path runs here)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)


def test_device_auto_is_cpu_without_cuda_and_cuda_is_a_clear_error(no_cuda):
    assert resolve_device("auto").type == "cpu"
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(CasebaseError, match="no CUDA device"):
        resolve_device("cuda")


def test_device_auto_prefers_cuda_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "HNSW16"])
def test_use_gpu_without_cuda_keeps_faiss_cpu_and_same_results(no_cuda, factory):
    v = _unit(2000, 16, seed=1)
    idx = VectorIndex.build(v, factory)
    before = idx.search(v[:7], 5)
    assert idx.use_gpu() == "faiss-cpu"
    assert idx._gpu_index is None and idx._torch_matrix is None
    after = idx.search(v[:7], 5)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_allclose(before[0], after[0])


def test_torch_topk_path_matches_faiss_flat(fake_cuda, monkeypatch):
    """CUDA without faiss-gpu: a Flat index is searched as matmul + top-k, same answers."""
    monkeypatch.delattr(vi.faiss, "StandardGpuResources", raising=False)
    v = _unit(500, 32, seed=2)
    q = _unit(9, 32, seed=3)
    idx = VectorIndex.build(v, "Flat")
    want_s, want_i = idx.search(q, 10)
    assert idx.use_gpu() == "torch-cuda"
    got_s, got_i = idx.search(q, 10)
    assert got_i.dtype == np.int64 and got_i.shape == (9, 10)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_s, want_s, atol=1e-5)
    # k is clipped to the index size, as on the CPU
    assert idx.search(q[:1], 10_000)[1].shape == (1, 500)
    # a single 1-d query works too
    np.testing.assert_array_equal(idx.search(q[0], 3)[1], want_i[:1, :3])


def test_faiss_gpu_failure_falls_through(fake_cuda, monkeypatch):
    """faiss-gpu present but the copy fails: Flat -> torch top-k, IVF -> FAISS on the CPU."""

    class Res:  # stands in for StandardGpuResources
        pass

    def refuse(*_a, **_k):
        raise RuntimeError("this index type is not supported on the GPU")

    monkeypatch.setattr(vi.faiss, "StandardGpuResources", Res, raising=False)
    monkeypatch.setattr(vi.faiss, "index_cpu_to_gpu", refuse, raising=False)
    v = _unit(1000, 16, seed=4)
    flat = VectorIndex.build(v, "Flat")
    assert flat.use_gpu() == "torch-cuda"
    ivf = VectorIndex.build(v, "IVF16,Flat")
    want = ivf.search(v[:5], 4)
    assert ivf.use_gpu() == "faiss-cpu"
    np.testing.assert_array_equal(ivf.search(v[:5], 4)[1], want[1])


def test_gpu_index_used_up_to_its_k_limit_then_the_cpu_copy(monkeypatch):
    """faiss-gpu selects at most GPU_MAX_K neighbours; larger k (filtered searches) use the CPU."""
    v = _unit(GPU_MAX_K + 500, 8, seed=5)
    idx = VectorIndex.build(v, "Flat")
    calls = []

    class FakeGpuIndex:
        def search(self, q, k):
            calls.append(k)
            assert k <= GPU_MAX_K, "faiss-gpu would fail here"
            return idx.index.search(q, k)

    idx._gpu_index = FakeGpuIndex()
    assert idx.search(v[:1], 10)[1].shape == (1, 10)
    assert idx.search(v[:1], GPU_MAX_K + 100)[1].shape == (1, GPU_MAX_K + 100)
    assert calls == [10]


def test_retriever_loads_and_queries_on_cpu_without_cuda(no_cuda, tiny_index, phantom_dir):
    from retrieval.service.retriever import CaseRetriever

    r = CaseRetriever.load(tiny_index)  # device="auto"
    assert r.device.type == "cpu"
    assert r.index.backend == "faiss-cpu"
    assert all(p.device.type == "cpu" for p in r.model.parameters())
    img = sorted((phantom_dir / "images").rglob("*.dcm"))[0]
    res = r.query(img, k=3, explain=("gradcam", "similarity"))
    assert len(res.neighbors) == 3
    assert res.maps["gradcam"].dtype == np.float32 and np.isfinite(res.maps["gradcam"]).all()
    assert res.neighbors[0].matched_regions


def test_training_without_cuda_runs_without_amp(no_cuda, phantom_dir, tmp_path, monkeypatch):
    """On the CPU the autocast contexts are disabled and the GradScaler is a pass-through."""
    from retrieval.model import train

    autocasts, scalers = [], []
    real_autocast, real_scaler = torch.autocast, torch.amp.GradScaler

    def autocast(device_type, *a, **k):
        autocasts.append((device_type, k.get("enabled", True)))
        return real_autocast(device_type, *a, **k)

    def scaler(*a, **k):
        s = real_scaler(*a, **k)
        scalers.append(s.is_enabled())
        return s

    monkeypatch.setattr(torch, "autocast", autocast)
    monkeypatch.setattr(torch.amp, "GradScaler", scaler)
    opts = train.TrainOptions(epochs=1, progress=False, num_workers=0)  # device="auto"
    train.train_model(phantom_dir / "manifest.csv", tmp_path / "model", opts)
    assert autocasts and all(dev == "cpu" and not enabled for dev, enabled in autocasts)
    assert scalers == [False]
