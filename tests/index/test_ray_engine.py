"""Index builds on a real local Ray cluster (head + worker, loopback only) equal the local build;
`--strict` and `--device` are honoured (on the real cluster, and fast on a stand-in for Ray Data
that runs the same decode and embed steps in process).

The skips happen inside the tests (not at import) so that under CI=true the conftest hook can
turn them into failures (marker ``ray``).
"""

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from index import ray_engine
from index.builder import build_index
from retrieval import CaseRetriever
from retrieval.errors import CasebaseError

pytestmark = pytest.mark.ray

SCRIPT = Path(__file__).with_name("ray_cluster.sh")


def _can_unshare() -> bool:
    if not shutil.which("unshare") or not shutil.which("ip"):
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


@pytest.mark.slow
def test_ray_build_equals_local_build(tiny_index, phantom_dir, tmp_path):
    pytest.importorskip("ray", reason="the ray extra is not installed")
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists() or not _can_unshare():
        pytest.skip("needs the ray CLI and `unshare -n` (root) to keep the cluster on loopback")
    # A bad file in the batch must be skipped by both engines alike.
    df = pd.read_csv(phantom_dir / "manifest.csv", dtype=str).fillna("")
    df["image"] = [str(phantom_dir / p) for p in df["image"]]
    df["mask"] = [str(phantom_dir / p) if p else "" for p in df["mask"]]
    (tmp_path / "bad.png").write_text("not an image")
    bad = df.iloc[[0]].copy()
    bad["case_id"], bad["image"] = "bad_case", str(tmp_path / "bad.png")
    manifest = tmp_path / "m.csv"
    pd.concat([df, bad]).to_csv(manifest, index=False)
    model = tiny_index.parent / "model"
    local = build_index(model, manifest, tmp_path / "local", progress=False)

    # one cluster, three builds: --strict must fail on bad.png, --device cuda must be refused
    # on a cluster without GPUs, and the plain build (--device cpu) must equal the local one
    base = ["index", "build", str(model), str(manifest), "--engine", "ray"]
    runs = {
        "strict": base + ["--out", str(tmp_path / "ray_strict"), "--strict"],
        "cuda": base + ["--out", str(tmp_path / "ray_cuda"), "--device", "cuda"],
        "plain": base + ["--out", str(tmp_path / "ray"), "--device", "cpu"],
    }
    driver = (
        "import json, os, sys; from retrieval.cli import main; "
        "addr = ['--address', os.environ['RAY_ADDRESS_FOR_TEST']]; "
        f"runs = {runs!r}; "
        "rcs = {k: main(v + addr) for k, v in runs.items()}; "
        "print('RCS=' + json.dumps(rcs)); sys.exit(rcs['plain'])"
    )
    proc = subprocess.run(
        ["unshare", "-n", "bash", str(SCRIPT), str(ray_bin), sys.executable, "-c", driver],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bad.png" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    rcs = json.loads(proc.stdout.split("RCS=")[1].splitlines()[0])
    assert rcs["strict"] != 0 and not (tmp_path / "ray_strict").exists()
    assert "--strict" in proc.stderr
    import torch

    if not torch.cuda.is_available():  # `ray start` gives the cluster this machine's GPUs
        assert rcs["cuda"] != 0 and not (tmp_path / "ray_cuda").exists()
        assert "has no GPU" in proc.stderr
    a, b = CaseRetriever.load(tmp_path / "local"), CaseRetriever.load(tmp_path / "ray")
    assert len(local.skipped) == 1 and len(b.cases) == local.n_indexed
    assert a.cases["case_id"].tolist() == b.cases["case_id"].tolist()
    np.testing.assert_allclose(a.index.reconstruct_all(), b.index.reconstruct_all(), atol=1e-5)
    np.testing.assert_allclose(a.ood_reference, b.ood_reference, atol=1e-5)
    assert a.meta["ood"]["threshold"] == pytest.approx(b.meta["ood"]["threshold"], abs=1e-5)
    assert a.meta["files"]["cases.parquet"] == b.meta["files"]["cases.parquet"]


# --------------------------------------------------------------- fast: a stand-in for Ray Data


class _FakeDataset:
    """Runs the map_batches steps in process, batch by batch, in order (what Ray Data does)."""

    def __init__(self, items, steps=(), calls=None):
        self.items, self.steps = list(items), list(steps)
        self.calls = calls if calls is not None else []

    def map_batches(self, fn, fn_constructor_kwargs, batch_size, **kw):
        self.calls.append({"fn": fn.__name__, **fn_constructor_kwargs, **kw})
        step = (fn(**fn_constructor_kwargs), batch_size)
        return _FakeDataset(self.items, [*self.steps, step], self.calls)

    def iter_batches(self, batch_size=None, batch_format="numpy"):
        size = self.steps[0][1]
        for lo in range(0, len(self.items), size):
            chunk = self.items[lo : lo + size]
            batch = {k: np.asarray([it[k] for it in chunk], dtype=object) for k in chunk[0]}
            batch["row"] = batch["row"].astype(int)
            for fn, _ in self.steps:
                batch = fn(batch)
            yield batch


def _fake_ray(gpus: int):
    calls: list[dict] = []
    ctx = types.SimpleNamespace(
        enable_progress_bars=False, execution_options=types.SimpleNamespace(preserve_order=False)
    )
    data = types.SimpleNamespace(
        DataContext=types.SimpleNamespace(get_current=lambda: ctx),
        from_items=lambda items: _FakeDataset(items, calls=calls),
    )
    ray = types.SimpleNamespace(
        is_initialized=lambda: True,
        cluster_resources=lambda: {"CPU": 4.0, **({"GPU": float(gpus)} if gpus else {})},
        data=data,
        shutdown=lambda: None,
    )
    return ray, calls


@pytest.fixture
def paths_with_a_bad_one(phantom_dir, tmp_path):
    df = pd.read_csv(phantom_dir / "manifest.csv", dtype=str).fillna("")
    paths = [str(phantom_dir / p) for p in df["image"][:6]]
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    return paths[:3] + [str(bad)] + paths[3:]


def test_ray_strict_stops_at_the_unreadable_image(tiny_index, paths_with_a_bad_one, monkeypatch):
    ray, _ = _fake_ray(gpus=0)
    monkeypatch.setattr(ray_engine, "_import_ray", lambda: ray)
    model = tiny_index.parent / "model"
    emb = ray_engine.embed_with_ray(model, paths_with_a_bad_one, batch_size=2, progress=False)
    assert len(emb.ok) == 6 and [f.index for f in emb.failures] == [3]  # skipped, as locally
    with pytest.raises(CasebaseError, match=r"bad\.png.*--strict"):
        ray_engine.embed_with_ray(
            model, paths_with_a_bad_one, batch_size=2, progress=False, strict=True
        )


def test_ray_device_choice(tiny_index, phantom_dir, monkeypatch):
    model = tiny_index.parent / "model"
    df = pd.read_csv(phantom_dir / "manifest.csv", dtype=str).fillna("")
    paths = [str(phantom_dir / p) for p in df["image"][:4]]
    # --device cpu on a GPU cluster: no GPU asked for, the actors run on the CPU
    ray, calls = _fake_ray(gpus=2)
    monkeypatch.setattr(ray_engine, "_import_ray", lambda: ray)
    emb = ray_engine.embed_with_ray(model, paths, progress=False, device="cpu")
    assert len(emb.ok) == 4
    embed_call = next(c for c in calls if c["fn"] == "_Embedder")
    assert embed_call["num_gpus"] == 0 and embed_call["device"] == "cpu"
    # --device auto on that cluster asks for one GPU per actor and CUDA in the actor
    ray, calls = _fake_ray(gpus=2)
    monkeypatch.setattr(ray_engine, "_import_ray", lambda: ray)
    monkeypatch.setattr(ray_engine, "_Embedder", _RecordingEmbedder)
    ray_engine.embed_with_ray(model, paths, progress=False, device="auto")
    embed_call = next(c for c in calls if c["fn"] == "_RecordingEmbedder")
    assert embed_call["num_gpus"] == 1 and embed_call["device"] == "cuda"
    # --device cuda on a cluster without GPUs: refused, one line
    ray, _ = _fake_ray(gpus=0)
    monkeypatch.setattr(ray_engine, "_import_ray", lambda: ray)
    with pytest.raises(CasebaseError, match="has no GPU"):
        ray_engine.embed_with_ray(model, paths, progress=False, device="cuda")
    with pytest.raises(CasebaseError, match="unknown device"):
        ray_engine.embed_with_ray(model, paths, progress=False, device="tpu")


class _RecordingEmbedder:
    """Stands in for the embedding actor where this machine has no GPU to build one on."""

    def __init__(self, model_dir: str, weighting: str, device: str = "auto"):
        del model_dir, weighting, device

    def __call__(self, batch: dict) -> dict:
        n = len(batch["row"])
        z = np.zeros((n, 1), np.float32)
        return {"row": batch["row"], "vector": z, "prob": z, "ood": z, "error": batch["error"]}
