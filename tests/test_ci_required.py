"""The CI hook: under CI=true a browser/Orthanc/Ray test that skips fails; other skips stay skips."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

SAMPLE = """
import pytest

@pytest.mark.browser
def test_needs_a_browser():
    pytest.skip("/usr/bin/chromium is absent")

@pytest.fixture
def orthanc():
    pytest.skip("Orthanc is not installed")

@pytest.mark.orthanc
def test_needs_orthanc(orthanc):
    pass

@pytest.mark.ray
def test_needs_ray():
    pytest.importorskip("no_such_module_for_the_ci_hook_test")

def test_other_skip():
    pytest.skip("needs a GPU")

@pytest.mark.browser
@pytest.mark.xfail(reason="known")
def test_xfail():
    assert False

@pytest.mark.browser
def test_runs():
    assert True
"""


def _run(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    shutil.copy(HERE / "ci_required.py", tmp_path / "ci_required_plugin.py")
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = str(tmp_path)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "ci_required_plugin", "-p", "no:cacheprovider"]
        + ["-rfEs", "-q", "test_sample.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_required_skips_fail_under_ci(tmp_path):
    proc = _run(tmp_path, "true")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    # a skip in a fixture fails the test's setup: pytest reports that as an error
    assert "2 failed, 1 passed, 1 skipped, 1 xfailed, 1 error" in out, out
    for name in ("test_needs_a_browser", "test_needs_ray"):
        assert f"FAILED test_sample.py::{name}" in out, out
    assert "ERROR test_sample.py::test_needs_orthanc" in out, out
    assert "chromium is absent" in out and "Orthanc is not installed" in out
    assert "SKIPPED" in out and "needs a GPU" in out  # an unmarked skip stays a skip


@pytest.mark.parametrize("ci", [None, "false", ""])
def test_outside_ci_they_skip(tmp_path, ci):
    proc = _run(tmp_path, ci)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "1 passed, 4 skipped, 1 xfailed" in out, out
