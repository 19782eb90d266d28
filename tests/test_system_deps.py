"""scripts/system-deps.sh fails loudly (exit 1, a clear message) when it cannot install a tool.

Runs a copy of the script that looks for Chromium at a path that does not exist, with stand-ins
for `id` (root) and `apt-get` (failing, or "succeeding" without installing anything) on PATH.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "system-deps.sh"


def _run(tmp_path: Path, apt_rc: int, **env_extra: str) -> subprocess.CompletedProcess:
    script = tmp_path / "system-deps.sh"
    text = SCRIPT.read_text()
    assert "/usr/bin/chromium" in text
    script.write_text(text.replace("/usr/bin/chromium", str(tmp_path / "no" / "chromium")))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("id", "echo 0"), ("apt-get", f"echo apt-get says no >&2; exit {apt_rc}")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "SYSTEM_DEPS_OPTIONAL")}
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}"
    env.update(env_extra)
    return subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("apt_rc", [100, 0])  # apt-get fails, or "works" but installs nothing
def test_cannot_install_fails_loudly(tmp_path, apt_rc):
    proc = _run(tmp_path, apt_rc)
    assert proc.returncode == 1, proc.stderr
    assert "system-deps: ERROR:" in proc.stderr and "chromium" in proc.stderr
    assert "SYSTEM_DEPS_OPTIONAL=1" in proc.stderr  # says how to proceed anyway


def test_optional_outside_ci_only(tmp_path):
    proc = _run(tmp_path, 100, SYSTEM_DEPS_OPTIONAL="1")
    assert proc.returncode == 0 and "will skip" in proc.stderr, proc.stderr
    proc = _run(tmp_path, 100, SYSTEM_DEPS_OPTIONAL="1", CI="true")
    assert proc.returncode == 1 and "ERROR" in proc.stderr, proc.stderr
