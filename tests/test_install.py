"""Install hygiene: `make demo` installs only what the demo needs; `make test` adds the test
extras; the package metadata uses an SPDX license string (no setuptools deprecation)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]
TEST_ONLY = ("ray", "playwright", "grad-cam", "pytest", "hypothesis", "ruff")


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _dry_run(target: str, venv: Path) -> str:
    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    out = subprocess.run(
        ["make", "-n", target, f"VENV={venv}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower()


def test_base_dependencies_hold_no_test_extra():
    base = {_name(r) for r in _pyproject()["project"]["dependencies"]}
    assert not base & set(TEST_ONLY)
    extras = {_name(r) for r in _pyproject()["project"]["optional-dependencies"]["test"]}
    assert {"ray", "playwright", "grad-cam", "pytest"} <= extras


def test_make_demo_installs_without_the_test_extras(tmp_path):
    cmds = _dry_run("demo", tmp_path / "venv")
    installs = [c for c in cmds.splitlines() if "pip install" in c and "-e" in c.split()]
    assert installs, cmds
    assert all("[test]" not in c for c in installs), cmds
    assert "casebase demo" in cmds


def test_make_test_installs_the_test_extras(tmp_path):
    cmds = _dry_run("test", tmp_path / "venv")
    assert any("pip install" in c and re.search(r"\.\[[^]]*\btest\b", c) for c in cmds.splitlines())
    assert "pytest" in cmds


def test_faiss_flavour_is_a_choice(tmp_path):
    """Base dependencies carry no FAISS; `cpu` and `gpu` each carry one flavour, never both, and
    no other extra drags faiss-cpu in beside faiss-gpu-cu12; make installs exactly one."""
    doc = _pyproject()["project"]
    flavours = {"faiss-cpu", "faiss-gpu-cu12"}
    assert not {_name(r) for r in doc["dependencies"]} & flavours
    extras = {k: {_name(r) for r in v} for k, v in doc["optional-dependencies"].items()}
    assert extras["cpu"] & flavours == {"faiss-cpu"}
    assert extras["gpu"] & flavours == {"faiss-gpu-cu12"}
    for name, reqs in extras.items():
        if name not in ("cpu", "gpu"):
            assert not reqs & flavours, name
    for target in ("demo", "test"):
        installs = [
            c
            for c in _dry_run(target, tmp_path / target).splitlines()
            if "pip install" in c and "-e" in c.split()
        ]
        assert installs and all("[cpu" in c and "gpu" not in c for c in installs), installs
    gpu = subprocess.run(
        ["make", "-n", "demo", f"VENV={tmp_path / 'g'}", "FAISS=gpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "'.[gpu]'" in gpu and "cpu" not in gpu.replace("casebase-", "")


def test_pyarrow_is_past_cve_2023_47248():
    req = [r for r in _pyproject()["project"]["dependencies"] if _name(r) == "pyarrow"]
    m = re.search(r">=\s*([\d.]+)", req[0]) if req else None
    assert m and tuple(int(x) for x in m.group(1).split(".")) >= (14, 0, 1)


def test_license_is_an_spdx_string_with_a_setuptools_that_reads_it():
    doc = _pyproject()
    assert doc["project"]["license"] == "Apache-2.0"
    req = [r for r in doc["build-system"]["requires"] if _name(r) == "setuptools"]
    m = re.search(r">=\s*(\d+)", req[0]) if req else None
    assert m and int(m.group(1)) >= 77  # SPDX `license` strings need setuptools 77
