"""Index builds on a real local Ray cluster (head + worker, loopback only) equal the local build."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("ray", reason="the ray extra is not installed")

from index.builder import build_index  # noqa: E402
from retrieval import CaseRetriever  # noqa: E402

SCRIPT = Path(__file__).with_name("ray_cluster.sh")


def _can_unshare() -> bool:
    if not shutil.which("unshare") or not shutil.which("ip"):
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


@pytest.mark.slow
def test_ray_build_equals_local_build(tiny_index, phantom_dir, tmp_path):
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

    driver = (
        "import os, sys; from retrieval.cli import main; "
        f"sys.exit(main(['index', 'build', {str(model)!r}, {str(manifest)!r}, '--out', "
        f"{str(tmp_path / 'ray')!r}, '--engine', 'ray', '--address', os.environ['RAY_ADDRESS_FOR_TEST']]))"
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
    a, b = CaseRetriever.load(tmp_path / "local"), CaseRetriever.load(tmp_path / "ray")
    assert len(local.skipped) == 1 and len(b.cases) == local.n_indexed
    assert a.cases["case_id"].tolist() == b.cases["case_id"].tolist()
    np.testing.assert_allclose(a.index.reconstruct_all(), b.index.reconstruct_all(), atol=1e-5)
    np.testing.assert_allclose(a.ood_reference, b.ood_reference, atol=1e-5)
    assert a.meta["ood"]["threshold"] == pytest.approx(b.meta["ood"]["threshold"], abs=1e-5)
    assert a.meta["files"]["cases.parquet"] == b.meta["files"]["cases.parquet"]
