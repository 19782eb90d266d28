"""`casebase demo [--out casebase-demo] [--no-app] [--port 8501]`: the README's main job.

On an embedded default (a synthetic chest-film phantom with lesion masks) it
runs every stage a real project runs, then opens the app on the result:

    phantom  OUT/phantom/manifest.csv  (DICOM images + lesion masks)
    train    OUT/model                 (the CLI defaults: `casebase train` on the phantom)
    index    OUT/index                 (saliency-weighted embeddings, FAISS, case table)
    trust    OUT/index/trust.json      (`casebase explain-eval` on the test split)
    audit    OUT/index/audit/          (`casebase audit`: shortcut audit, shown in the app's Audit tab)
    app      streamlit run app.py -- --index OUT/index --manifest OUT/phantom/manifest.csv

Every stage is reused when its output is already there and sound (a phantom
whose manifest was written, a model folder that loads, a bundle that
verifies, a trust table that covers every method, an audit report), so a second run goes
straight to the app. Delete OUT (or pass another --out) to start over.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from retrieval.errors import BundleError, CasebaseError

# The embedded default, sized for a 2-core CPU: 600 cases of 128 px, trained with the
# CLI defaults (EPOCHS None: the schedule `casebase train` sizes to the data, early
# stopping on the val split), explain-eval (every method) on 12 test cases with lesion
# masks. The randomisation sanity check runs on 2 of them x 3 seeds (explain-eval's
# default is 4 x 3): its cascade re-explains each case once per block and seed, which for
# the perturbation and Shapley methods was over half of the demo's time; the verdicts
# state the cases they rest on, and `casebase explain-eval` re-measures with more.
PHANTOM = {"n": 600, "size": 128, "seed": 0, "modality": "xray", "confounder": "none"}
EPOCHS: int | None = None
EXPLAIN_CASES = 12
SANITY_CASES = 2
STAMP = "demo.json"
AUDIT_REPORT = Path("audit") / "report.html"


def app_path() -> Path:
    """app.py lives at the repository root, beside the installed packages' sources."""
    return Path(__file__).resolve().parents[2] / "app.py"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _Stage:
    """Prints `[i/N] name ...` before and `... done in Xs` after; records the timing."""

    def __init__(self, timings: dict, index: int, total: int, name: str, what: str):
        self.timings, self.name = timings, name
        self.head = f"[{index}/{total}] {name:<8}"
        self.what = what

    def __enter__(self):
        _say(f"{self.head} {self.what}")
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb):
        dt = time.perf_counter() - self.t0
        if exc_type is None:
            self.timings[self.name] = round(dt, 1)
            _say(f"{self.head} done in {dt:.1f} s")
        return False


def _phantom_ok(root: Path) -> bool:
    manifest = root / "manifest.csv"  # written last, atomically: present means complete
    if not manifest.is_file():
        return False
    try:
        from retrieval.data.manifest import load_manifest

        return len(load_manifest(manifest)) == PHANTOM["n"]
    except CasebaseError:
        return False


def _model_ok(model_dir: Path) -> bool:
    try:
        from retrieval.model.network import load_model

        load_model(model_dir, "cpu")
        return True
    except (CasebaseError, OSError):
        return False


def _index_problem(index_dir: Path) -> str | None:
    """None when the bundle verifies, else why not (None also means: reuse it)."""
    if not (index_dir / "bundle.json").is_file():
        return "not built yet"
    from index import bundle

    try:
        bundle.verify(index_dir)
        return None
    except BundleError as err:
        return str(err)


def _methods() -> list[str]:
    try:
        from retrieval.explain import registry

        return list(registry.METHODS)
    except ImportError:
        return [
            "gradcam",
            "gradient",
            "smoothgrad",
            "integrated_gradients",
            "occlusion",
            "lime",
            "similarity",
        ]


def _trust_missing(index_dir: Path) -> list[str]:
    from retrieval.service.retriever import TRUST_FILE

    path = index_dir / TRUST_FILE
    have = {}
    if path.is_file():
        try:
            have = json.loads(path.read_text())
        except ValueError:
            have = {}
    return [m for m in _methods() if m not in have]


def _explain_eval(index_dir: Path, manifest: Path, methods: list[str]) -> bool:
    """Run `casebase explain-eval` (stores trust.json in the bundle); False when it is unavailable."""
    try:
        from retrieval.commands import explain_eval
        from retrieval.explain import trust  # noqa: F401 - the measuring code itself
    except ImportError as err:
        _say(
            f"           explain-eval is not available in this installation ({err}); skipped: "
            "the app will say 'not measured yet' under every map"
        )
        return False
    from retrieval.cli import build_parser

    # the real parser, so every option the command grows gets its default
    args = build_parser().parse_args(
        [
            "explain-eval",
            str(index_dir),
            str(manifest),
            "--split",
            "test",
            "--methods",
            ",".join(methods),
            "--max-cases",
            str(EXPLAIN_CASES),
            "--sanity-cases",
            str(SANITY_CASES),
        ]
    )
    try:
        explain_eval.run(args)
    except CasebaseError as err:  # the app works without it: say why and go on
        _say(f"           explain-eval failed ({err}); the app will say 'not measured yet'")
        return False
    return True


def _audit_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("retrieval.commands.audit") is not None
    except ImportError:
        return False


def _audit_done(index_dir: Path) -> bool:
    return (index_dir / AUDIT_REPORT).is_file() or not _audit_available()


def _audit(index_dir: Path, manifest: Path) -> bool:
    """Run `casebase audit` (stores audit/report.html in the bundle); False when unavailable."""
    try:
        from retrieval.commands import audit
    except ImportError as err:
        _say(f"           the audit is not available in this installation ({err}); skipped")
        return False
    from retrieval.cli import build_parser

    try:
        audit.run(build_parser().parse_args(["audit", str(index_dir), str(manifest)]))
    except CasebaseError as err:  # the app works without it: say why and go on
        _say(f"           the audit failed ({err}); the app's Audit tab will say how to rerun it")
        return False
    return True


def _write_stamp(out: Path, timings: dict, trained: dict | None = None) -> None:
    stamp = {
        "phantom": PHANTOM,
        "epochs": EPOCHS,
        "training": trained or {},
        "explain_cases": EXPLAIN_CASES,
        "sanity_cases": SANITY_CASES,
        "timings_s": timings,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (out / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")


def build(out: Path) -> dict:
    """Make (or reuse) every artefact under ``out``; returns the stage timings in seconds."""
    out.mkdir(parents=True, exist_ok=True)
    phantom_dir, model_dir, index_dir = out / "phantom", out / "model", out / "index"
    manifest = phantom_dir / "manifest.csv"
    timings: dict[str, float] = {}
    trained: dict = {}
    n = 5
    t_all = time.perf_counter()

    problem = _index_problem(index_dir)
    missing = _trust_missing(index_dir) if problem is None else _methods()
    if problem is None and not missing and _audit_done(index_dir) and _phantom_ok(phantom_dir):
        _say(
            f"reusing {index_dir} (bundle verified, trust measured for every method, audit "
            "done): nothing to build"
        )
        return timings

    with _Stage(
        timings,
        1,
        n,
        "phantom",
        f"{PHANTOM['n']} synthetic chest films "
        f"({PHANTOM['size']} px, seed {PHANTOM['seed']}) -> {phantom_dir}",
    ) as st:
        if _phantom_ok(phantom_dir):
            _say(f"{st.head} reusing {manifest}")
        else:
            from retrieval.data.phantom import make_phantom

            make_phantom(phantom_dir, progress=True, **PHANTOM)

    if problem is None:
        _say(f"[2/{n}] train    reusing the model inside {index_dir} (bundle verified)")
        _say(f"[3/{n}] index    reusing {index_dir}")
    else:
        schedule = f"{EPOCHS} epochs" if EPOCHS else "the CLI's default schedule"
        with _Stage(timings, 2, n, "train", f"{schedule} -> {model_dir}") as st:
            if _model_ok(model_dir):
                _say(f"{st.head} reusing {model_dir}")
            else:
                from retrieval.model.train import TrainOptions, train_model

                report = train_model(manifest, model_dir, TrainOptions(epochs=EPOCHS))
                best = report.best_val or {}
                _say(
                    f"{st.head} {report.summary()} on {report.n_train} cases; "
                    f"val precision@1 {best.get('precision_at_1', float('nan')):.3f}"
                )
                trained = {
                    "epochs_run": report.epochs_run,
                    "epochs_total": report.epochs_total,
                    "max_epochs": report.max_epochs,
                    "restarts": len(report.attempts) - 1,
                    "val_precision_at_1": best.get("precision_at_1"),
                }
        with _Stage(timings, 3, n, "index", f"embed train+val cases -> {index_dir}") as st:
            if problem != "not built yet":
                _say(f"{st.head} rebuilding: {problem}")
            from index.builder import build_index

            rep = build_index(model_dir, manifest, index_dir)
            _say(
                f"{st.head} {rep.n_indexed} cases ({rep.factory}), {rep.images_per_second:.0f} img/s"
            )
        missing = _methods()

    if missing:
        with _Stage(
            timings,
            4,
            n,
            "trust",
            f"explain-eval of {', '.join(missing)} on {EXPLAIN_CASES} test cases with lesion masks",
        ):
            _explain_eval(index_dir, manifest, missing)
    else:
        _say(f"[4/{n}] trust    reusing {index_dir / 'trust.json'} (every method measured)")

    if not (index_dir / AUDIT_REPORT).is_file():
        with _Stage(
            timings,
            5,
            n,
            "audit",
            f"shortcut audit of the test split -> {index_dir / AUDIT_REPORT}",
        ):
            _audit(index_dir, manifest)
    else:
        _say(f"[5/{n}] audit    reusing {index_dir / AUDIT_REPORT}")

    timings["total"] = round(time.perf_counter() - t_all, 1)
    _write_stamp(out, timings, trained)
    _say(f"demo built in {timings['total']:.0f} s -> {out}")
    return timings


def launch_app(out: Path, port: int) -> int:
    app = app_path()
    if not app.is_file():
        raise CasebaseError(
            f"{app}: the Streamlit app is missing (casebase demo runs app.py from the "
            "repository root; run it from a source checkout, or pass --no-app)"
        )
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(app),
        "--server.headless",
        "true",
        "--server.address",
        "localhost",
        "--server.port",
        str(port),
        "--browser.gatherUsageStats",
        "false",
        "--server.fileWatcherType",
        "none",
        "--",
        "--index",
        str((out / "index").resolve()),
        "--manifest",
        str((out / "phantom" / "manifest.csv").resolve()),
    ]
    env = dict(os.environ, STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
    _say(f"app: http://localhost:{port}  (Ctrl+C to stop)")
    try:
        return subprocess.call(cmd, cwd=str(app.parent), env=env)
    except KeyboardInterrupt:
        return 0


def run(args) -> int:
    out = Path(args.out)
    if not args.no_app and not app_path().is_file():
        raise CasebaseError(
            f"{app_path()}: the Streamlit app is missing; pass --no-app to build "
            "the demo without it"
        )
    if not 1 <= args.port <= 65535:
        raise CasebaseError(f"--port {args.port}: not a TCP port")
    build(out)
    if args.no_app:
        _say(
            f"open it with: streamlit run {app_path()} -- --index {out / 'index'} "
            f"--manifest {out / 'phantom' / 'manifest.csv'}"
        )
        return 0
    return launch_app(out, args.port)
