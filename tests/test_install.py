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
    assert any("pip install" in c and ".[test]" in c for c in cmds.splitlines()), cmds
    assert "pytest" in cmds


def test_license_is_an_spdx_string_with_a_setuptools_that_reads_it():
    doc = _pyproject()
    assert doc["project"]["license"] == "Apache-2.0"
    req = [r for r in doc["build-system"]["requires"] if _name(r) == "setuptools"]
    m = re.search(r">=\s*(\d+)", req[0]) if req else None
    assert m and int(m.group(1)) >= 77  # SPDX `license` strings need setuptools 77
