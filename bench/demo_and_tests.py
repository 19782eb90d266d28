"""How long the README's two commands take once the venv exists: `casebase demo --no-app` and the tests.

The README promises a demo that reaches the app within minutes on 2 cores and
a test suite well under 15 minutes; this measures both on a clean checkout
(``--repo``, e.g. a fresh ``git clone``) with an existing venv, so the venv's
creation (a download-bound step) is left out, as the targets say. Each stage
of the demo is timed by the demo itself (its ``demo.json``); the load average
before and after is recorded, since on a shared machine it moves every figure.

    .venv/bin/python bench/demo_and_tests.py [--repo DIR] [--skip-tests] [--skip-demo]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, finish, machine, table


def run_demo(repo: Path, venv: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="casebase-demo-") as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [str(venv / "bin" / "casebase"), "demo", "--no-app", "--out", tmp],
            cwd=repo,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"demo failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        stamp = json.loads((Path(tmp) / "demo.json").read_text())
        metrics = {}
        for name in ("eval.json", "index/eval.json"):
            if (Path(tmp) / name).is_file():
                metrics = json.loads((Path(tmp) / name).read_text())
    return {
        "wall_s": wall,
        "stages_s": stamp["timings_s"],
        "stamp": stamp,
        "eval": metrics,
        "log_tail": proc.stderr.splitlines()[-25:],
    }


def run_tests(repo: Path, venv: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    last = [ln for ln in proc.stdout.splitlines() if re.search(r"\d+ (passed|failed)", ln)]
    counts = (
        {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", last[-1])}
        if last
        else {}
    )
    return {
        "wall_s": wall,
        "exit_code": proc.returncode,
        "summary": last[-1] if last else None,
        "counts": counts,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--repo", type=Path, default=ROOT, help="checkout to run in (default: this one)"
    )
    ap.add_argument("--venv", type=Path, default=ROOT / ".venv")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--skip-tests", action="store_true")
    args = ap.parse_args()
    started, info = time.time(), machine()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=args.repo, capture_output=True, text=True
    ).stdout.strip()
    out: dict = {"repo_commit": commit}
    rows = []
    if not args.skip_demo:
        out["demo"] = run_demo(args.repo, args.venv)
        rows += [[f"demo: {k}", f"{v:.0f}"] for k, v in out["demo"]["stages_s"].items()]
    if not args.skip_tests:
        out["tests"] = run_tests(args.repo, args.venv)
        rows.append([f"tests: {out['tests']['summary']}", f"{out['tests']['wall_s']:.0f}"])
    print(table(["stage", "seconds"], rows))
    finish("demo_and_tests", info, out, started)


if __name__ == "__main__":
    main()
