"""A SIGKILL at any moment never loses the previous bundle or model, nor leaves a half-written one.

``casebase index build`` and ``casebase train`` run as subprocesses (``python -m
retrieval.cli``) and are killed with SIGKILL (the whole process group: the
command and its decode workers) at seeded random moments, calibrated by one
full run of each: a third at a random time over the whole run (start-up to
finish), the rest at a random moment from when the output's temporary folder
appears until just after it is swapped in (the window where a kill could hurt;
on 2 cores it is tens of milliseconds, which time-based kills alone would
almost never hit). After every kill:

* the previous bundle still verifies and loads (``CaseRetriever.load``), the
  previous model still loads (``load_model``), whichever of old or new is in place;
* beside it there is nothing but hidden ``.NAME.tmp-*`` temporaries (no
  ``NAME.old-*``, no half-written folder in its place);
* the next complete build sweeps those temporaries.

The same holds for ``index.bundle.update`` (what explain-eval and audit use to
add files to a bundle) and ``retrieval.atomic.write_bytes``, driven in a loop by
a small script and killed mid-loop; and for the two-rename fallback that
``atomic_dir`` uses where ``renameat2(RENAME_EXCHANGE)`` is missing.

The counts go to ``artifacts/robustness_counts.json`` ("crash_safety").
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from index import bundle
from retrieval.model.network import CONFIG_FILE, WEIGHTS_FILE, load_model
from retrieval.service.retriever import CaseRetriever

REPO = Path(__file__).resolve().parents[2]
COUNTS_FILE = REPO / "artifacts" / "robustness_counts.json"
SEED = 20240607
N_INDEX_KILLS = int(os.environ.get("CASEBASE_CRASH_INDEX_TRIALS", "12"))
N_TRAIN_KILLS = int(os.environ.get("CASEBASE_CRASH_TRAIN_TRIALS", "8"))
N_LOOP_KILLS = int(os.environ.get("CASEBASE_CRASH_LOOP_TRIALS", "8"))

RESULTS: dict[str, dict] = {}


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CASEBASE_DEBUG", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _start(argv: list[str], log: Path | None = None) -> subprocess.Popen:
    """Start `python argv` in its own process group (the kill takes its decode workers too).

    Output goes to `log` (a full pipe must never stall the command), else to a pipe.
    """
    out = open(log, "ab") if log is not None else subprocess.PIPE  # noqa: SIM115
    try:
        return subprocess.Popen(
            [sys.executable, *argv],
            cwd=REPO,
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        if log is not None:
            out.close()


def _kill(proc: subprocess.Popen) -> bool:
    """SIGKILL the process group; True if it was still running."""
    running = proc.poll() is None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    return running


def _calibrate(argv: list[str], out: Path, log: Path) -> tuple[float, float]:
    """Run to the end once: (seconds to exit, seconds its temporary output folder existed)."""
    t0 = time.perf_counter()
    proc = _start(argv, log)
    seen: list[float] = []
    try:
        while proc.poll() is None and time.perf_counter() - t0 < 600:
            if _temporaries(out):
                seen.append(time.perf_counter())
            time.sleep(0.002)
    finally:
        _kill(proc)
    full = time.perf_counter() - t0
    assert proc.returncode == 0, f"{argv} failed ({proc.returncode}):\n{log.read_text()[-2000:]}"
    window = (seen[-1] - seen[0]) if seen else 0.0
    return full, max(window, 0.02)


def _kill_trial(
    argv: list[str], target: Path, log: Path, mode: str, delay: float
) -> tuple[bool, bool]:
    """Start the command, SIGKILL it; (was it still running, did its temporary folder exist).

    mode "time": kill `delay` seconds after the start (start-up included);
    mode "write": kill `delay` seconds after its temporary output folder appears (mid-write).
    """
    proc = _start(argv, log)
    t0 = time.perf_counter()
    saw_tmp = False
    if mode == "time":
        time.sleep(delay)
    else:
        while proc.poll() is None and not (saw_tmp := bool(_temporaries(target))):
            if time.perf_counter() - t0 > 600:
                break
            time.sleep(0.002)
        time.sleep(delay)
    saw_tmp = saw_tmp or bool(_temporaries(target))
    return _kill(proc), saw_tmp


def _plan(rng: random.Random, n: int, full: float, window: float) -> list[tuple[str, float]]:
    """A third of the kills at a random time over the whole run (start-up to finish); the rest
    at a random moment from when the output's temporary folder appears to just after the swap."""
    return [
        ("time", rng.uniform(0.0, 1.02 * full))
        if k % 3 == 0
        else ("write", rng.uniform(0.0, 1.5 * window))
        for k in range(n)
    ]


def _leftovers(target: Path) -> list[str]:
    """Names beside `target` other than itself and hidden temporaries of its own."""
    return sorted(
        p.name
        for p in target.parent.iterdir()
        if p.name != target.name and not p.name.startswith(f".{target.name}.tmp-")
    )


def _temporaries(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.glob(f".{target.name}.tmp-*"))


@pytest.fixture(scope="module")
def small_manifest(phantom_dir, tmp_path_factory) -> Path:
    """24 of the phantom's cases (absolute paths): a build or a 1-epoch training takes seconds."""
    df = pd.read_csv(phantom_dir / "manifest.csv", dtype=str, keep_default_na=False)
    df = df.groupby("label", group_keys=False).head(8).reset_index(drop=True)
    df["image"] = [str(phantom_dir / p) for p in df["image"]]
    df["mask"] = [str(phantom_dir / p) if p else "" for p in df["mask"]]
    path = tmp_path_factory.mktemp("crash_manifest") / "manifest.csv"
    df.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    previous = {}
    if COUNTS_FILE.is_file():
        with contextlib.suppress(ValueError, OSError):
            previous = json.loads(COUNTS_FILE.read_text())
    previous["crash_safety"] = RESULTS
    COUNTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    COUNTS_FILE.write_text(json.dumps(previous, indent=2, sort_keys=True) + "\n")
    print("\ncrash safety:", json.dumps(RESULTS, indent=2, sort_keys=True))


# --------------------------------------------------------------------------- index build


@pytest.mark.slow
def test_killed_index_builds_keep_the_previous_bundle(tiny_index, small_manifest, tmp_path):
    target = tmp_path / "live" / "index"
    shutil.copytree(tiny_index, target)  # the previous bundle
    CaseRetriever.load(target, device="cpu")

    def argv(out: Path) -> list[str]:
        return [
            "-m",
            "retrieval.cli",
            "index",
            "build",
            str(tiny_index / "model"),
            str(small_manifest),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--batch-size",
            "8",
        ]

    log = tmp_path / "log.txt"
    full, window = _calibrate(
        argv(tmp_path / "calibration" / "index"), tmp_path / "calibration" / "index", log
    )
    plan = _plan(random.Random(SEED), N_INDEX_KILLS, full, window)
    killed, finished, failures, mid_write = 0, 0, [], 0
    for mode, delay in plan:
        running, saw_tmp = _kill_trial(argv(target), target, log, mode, delay)
        killed += running
        finished += not running
        mid_write += running and saw_tmp
        try:
            CaseRetriever.load(target, device="cpu")
        except Exception as err:  # noqa: BLE001
            failures.append(f"kill ({mode} +{delay:.3f}s): the bundle no longer loads: {err}")
        if _leftovers(target):
            failures.append(
                f"kill ({mode} +{delay:.3f}s): left {_leftovers(target)} beside the bundle"
            )
    # the next complete build sweeps the temporaries and replaces the bundle (in-process: quicker)
    from index.builder import build_index

    build_index(tiny_index / "model", small_manifest, target, device="cpu", progress=False)
    meta = bundle.verify(target)
    assert meta["counts"]["cases"] == len(pd.read_csv(small_manifest).query("split != 'test'"))
    RESULTS["index_build"] = {
        "trials": N_INDEX_KILLS,
        "killed_mid_run": killed,
        "finished_before_kill": finished,
        "survived": N_INDEX_KILLS - len(failures),
        "killed_while_writing_output": mid_write,
        "full_run_seconds": round(full, 2),
        "write_window_seconds": round(window, 3),
        "kills": [f"{m} +{d:.3f}s" for m, d in plan],
    }
    assert not failures, "\n".join(failures)
    assert _temporaries(target) == [] and _leftovers(target) == []
    assert killed >= N_INDEX_KILLS // 2, RESULTS["index_build"]
    assert mid_write >= N_INDEX_KILLS // 4, RESULTS["index_build"]  # kills did land mid-write


# --------------------------------------------------------------------------- train


@pytest.mark.slow
def test_killed_trainings_keep_the_previous_model(tiny_index, small_manifest, tmp_path):
    target = tmp_path / "live" / "model"
    shutil.copytree(tiny_index / "model", target)  # the previous model
    load_model(target)

    def argv(out: Path) -> list[str]:
        return [
            "-m",
            "retrieval.cli",
            "train",
            str(small_manifest),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--image-size",
            "32",
            "--device",
            "cpu",
            "--seed",
            "3",
        ]

    log = tmp_path / "log.txt"
    full, window = _calibrate(
        argv(tmp_path / "calibration" / "model"), tmp_path / "calibration" / "model", log
    )
    plan = _plan(random.Random(SEED + 1), N_TRAIN_KILLS, full, window)
    killed, finished, failures, mid_write = 0, 0, [], 0
    for mode, delay in plan:
        running, saw_tmp = _kill_trial(argv(target), target, log, mode, delay)
        killed += running
        finished += not running
        mid_write += running and saw_tmp
        try:
            load_model(target)
            names = sorted(p.name for p in target.iterdir())
            if names != sorted([CONFIG_FILE, WEIGHTS_FILE]):
                failures.append(f"kill ({mode} +{delay:.3f}s): the model folder holds {names}")
        except Exception as err:  # noqa: BLE001
            failures.append(f"kill ({mode} +{delay:.3f}s): the model no longer loads: {err}")
        if _leftovers(target):
            failures.append(
                f"kill ({mode} +{delay:.3f}s): left {_leftovers(target)} beside the model"
            )
    from retrieval.model.train import TrainOptions, train_model

    train_model(
        small_manifest,
        target,
        TrainOptions(epochs=1, image_size=32, device="cpu", seed=3, progress=False, num_workers=0),
    )
    assert load_model(target).config.image_size == 32
    RESULTS["train"] = {
        "trials": N_TRAIN_KILLS,
        "killed_mid_run": killed,
        "finished_before_kill": finished,
        "survived": N_TRAIN_KILLS - len(failures),
        "killed_while_writing_output": mid_write,
        "full_run_seconds": round(full, 2),
        "write_window_seconds": round(window, 3),
        "kills": [f"{m} +{d:.3f}s" for m, d in plan],
    }
    assert not failures, "\n".join(failures)
    assert _temporaries(target) == [] and _leftovers(target) == []
    assert killed >= N_TRAIN_KILLS // 2, RESULTS["train"]
    assert mid_write >= N_TRAIN_KILLS // 4, RESULTS["train"]  # kills did land mid-write


# --------------------------------------------------------------------------- bundle.update, write_bytes

_UPDATE_LOOP = r"""
import os, sys
from index import bundle
root = sys.argv[1]
i = 0
print("ready", flush=True)
while True:
    i += 1
    blob = bundle.canonical_json({"iteration": i, "pad": "x" * (1 << 20)})  # 1 MiB per iteration
    bundle.update(root, files={"trust.json": blob, f"audit/report-{i % 3}.html": blob[:4096]},
                  meta_updates={"iteration": i})
    print(i, flush=True)
"""

_WRITE_LOOP = r"""
import sys
from retrieval import atomic
path = sys.argv[1]
blobs = [b"A" * (4 << 20), b"B" * (4 << 20)]
atomic.write_bytes(path, blobs[0])
print("ready", flush=True)
i = 0
while True:
    i += 1
    atomic.write_bytes(path, blobs[i % 2])
    print(i, flush=True)
"""


def _loop_trials(script: str, target: Path, rng: random.Random, n: int, check) -> dict:
    failures, iterations = [], []
    for _ in range(n):
        proc = _start(["-c", script, str(target)])
        line = proc.stdout.readline().decode().strip()
        assert line == "ready", f"driver did not start: {line!r} {proc.stdout.read()[-2000:]!r}"
        time.sleep(rng.uniform(0.05, 0.8))
        _kill(proc)
        done = [ln for ln in proc.stdout.read().decode().split() if ln.isdigit()]
        proc.stdout.close()
        iterations.append(int(done[-1]) if done else 0)
        try:
            check()
        except Exception as err:  # noqa: BLE001
            failures.append(f"after a kill: {type(err).__name__}: {err}")
        if _leftovers(target):
            failures.append(f"left {_leftovers(target)} beside {target.name}")
    return {"failures": failures, "iterations": iterations}


@pytest.mark.slow
def test_killed_bundle_updates_keep_a_loadable_bundle(tiny_index, tmp_path):
    target = tmp_path / "index"
    shutil.copytree(tiny_index, target)

    def check():
        meta = bundle.verify(target)
        CaseRetriever.load(target, device="cpu")
        trust = target / "trust.json"
        if "iteration" in meta:  # an update landed: its files are whole and match its iteration
            assert json.loads(trust.read_bytes())["iteration"] == meta["iteration"]

    res = _loop_trials(_UPDATE_LOOP, target, random.Random(SEED + 2), N_LOOP_KILLS, check)
    bundle.update(target, meta_updates={"after": "kills"})  # the next update sweeps temporaries
    assert _temporaries(target) == []
    RESULTS["bundle_update"] = {
        "trials": N_LOOP_KILLS,
        "survived": N_LOOP_KILLS - len(res["failures"]),
        "updates_completed_before_each_kill": res["iterations"],
    }
    assert not res["failures"], "\n".join(res["failures"])


@pytest.mark.slow
def test_killed_write_bytes_leaves_old_or_new_content(tmp_path):
    target = tmp_path / "maps" / "gradcam.npy"
    target.parent.mkdir()
    whole = {b"A" * (4 << 20), b"B" * (4 << 20)}

    def check():
        assert target.read_bytes() in whole, "the file holds neither the old nor the new content"

    def beside():
        return sorted(
            p.name
            for p in target.parent.iterdir()
            if p.name != target.name
            and not (p.name.startswith(f".{target.name}.") and p.name.endswith(".tmp"))
        )

    failures, iterations = [], []
    rng = random.Random(SEED + 3)
    for _ in range(N_LOOP_KILLS):
        proc = _start(["-c", _WRITE_LOOP, str(target)])
        assert proc.stdout.readline().decode().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.8))
        _kill(proc)
        done = [ln for ln in proc.stdout.read().decode().split() if ln.isdigit()]
        proc.stdout.close()
        iterations.append(int(done[-1]) if done else 0)
        try:
            check()
        except Exception as err:  # noqa: BLE001
            failures.append(str(err))
        if beside():
            failures.append(f"left {beside()} beside {target.name}")
    RESULTS["write_bytes"] = {
        "trials": N_LOOP_KILLS,
        "survived": N_LOOP_KILLS - len(failures),
        "writes_completed_before_each_kill": iterations,
        # hidden temporaries of killed writes stay (nothing sweeps them); harmless but counted
        "temporaries_left_behind": len(list(target.parent.glob(f".{target.name}.*.tmp"))),
    }
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------- no RENAME_EXCHANGE


def _fallback_with_a_crash_between_the_renames(monkeypatch, target: Path, exc: type[BaseException]):
    """The two-rename fallback (filesystems without renameat2 RENAME_EXCHANGE), failing after
    the previous content was moved aside and before the new one was moved in."""
    from retrieval import atomic

    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise exc("killed between the two renames")
        return real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(exc), atomic.atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    monkeypatch.setattr(atomic.os, "rename", real_rename)


def test_fallback_failure_between_renames_puts_the_previous_back(tmp_path, monkeypatch):
    from retrieval import atomic

    target = tmp_path / "out"
    with atomic.atomic_dir(target) as tmp:
        (tmp / "old.txt").write_text("old")
    _fallback_with_a_crash_between_the_renames(monkeypatch, target, KeyboardInterrupt)
    assert (target / "old.txt").read_text() == "old" and not (target / "new.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_fallback_kill_between_renames_is_recovered_by_the_next_build(tmp_path, monkeypatch):
    """A SIGKILL there runs no handler: the previous content sits in .out.old-PID until the next
    build of the same target puts it back before doing anything else."""
    from retrieval import atomic

    target = tmp_path / "out"
    with atomic.atomic_dir(target) as tmp:
        (tmp / "old.txt").write_text("old")
    old = tmp_path / ".out.old-12345"
    os.rename(target, old)  # the state a kill between the renames leaves
    (tmp_path / ".out.tmp-dead").mkdir()
    with pytest.raises(RuntimeError), atomic.atomic_dir(target):
        assert (target / "old.txt").read_text() == "old"  # recovered before the build starts
        raise RuntimeError("this build fails too")
    assert (target / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
