"""Shared helpers for the benchmarks: machine record, interleaved timing, tables, JSON.

Every benchmark runs the things it compares in one process, alternating
repetitions (the order rotates each round so no variant always runs first or
right after a warm-up), and reports medians and ratios of medians. The
machine's load is recorded before and after: on a shared machine the
absolute figures move with the load, the ratios much less.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run as `python bench/x.py` from the repository root
    sys.path.insert(0, str(ROOT))

DEFAULT_MODEL = "/tmp/m1200"
DEFAULT_INDEX = "/tmp/i1200"
DEFAULT_MANIFEST = "/tmp/ph1200/manifest.csv"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What the figures were measured on (call at the start; `finish` adds the load at the end)."""
    import numpy as np
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg_start": list(os.getloadavg()),
    }
    try:
        import faiss

        info["faiss"] = faiss.__version__
        info["faiss_omp_threads"] = faiss.omp_get_max_threads()
        info["faiss_gpu"] = hasattr(faiss, "StandardGpuResources")
    except ImportError:
        info["faiss"] = None
    return info


def interleaved(
    fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each fn, `reps` rounds; each round runs every fn once, order rotated."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        if r % 2:
            order = order[::-1]
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            out[n].append(time.perf_counter() - t0)
    return out


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(xs: list[float]) -> dict:
    return {
        "n": len(xs),
        "median": statistics.median(xs),
        "p95": percentile(xs, 95),
        "min": min(xs),
        "max": max(xs),
    }


def peak_rss_mb() -> float:
    """Peak resident set size of this process (VmHWM; ru_maxrss where /proc is absent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def table(headers: list[str], rows: list[list], title: str | None = None) -> str:
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [title] if title else []
    out += [line, "  ".join("-" * w for w in widths)]
    out += [
        "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in cells
    ]
    text = "\n".join(out)
    print(text, flush=True)
    return text


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "-"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        if abs(v) >= 0.01 or v == 0:
            return f"{v:.3f}"
        return f"{v:.2e}"
    return str(v)


def finish(name: str, info: dict, payload: dict, started: float) -> Path:
    """Write bench/results/<name>.json with the machine record and the load at the end."""
    info = dict(info)
    info["loadavg_end"] = list(os.getloadavg())
    info["wall_s"] = round(time.time() - started, 1)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    doc = {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": info,
        **payload,
    }
    path.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
    print(
        f"\nmachine: {info['cpu_model']}, {info['cpus_usable']} usable cores, torch {info['torch']}, "
        f"faiss {info.get('faiss')}, CUDA {info['cuda_device'] or 'none'}; load average "
        f"{_load(info['loadavg_start'])} at start, {_load(info['loadavg_end'])} at end; {info['wall_s']} s"
    )
    print(f"wrote {path}")
    return path


def _load(la) -> str:
    return "/".join(f"{x:.2f}" for x in la)


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


def clustered_unit_vectors(
    n: int, d: int, n_clusters: int | None = None, seed: int = 0, chunk: int = 100_000
):
    """(n, d) float32 unit vectors from a mixture of Gaussian clusters on the sphere.

    Not uniform noise (on which every ANN index looks bad and no neighbour is
    meaningfully near): ~n/250 clusters (at least 16), sizes log-normal (a few
    large classes, many small ones), each point normalize(centre + σ·g/√d)
    with σ per cluster in [0.4, 1.0] (cosine to its centre ~0.7-0.93), so
    near neighbours sit in the same cluster as on trained embeddings.
    Returns (vectors, sampler) where sampler(m, seed) draws m fresh points of
    the same mixture (queries that are not in the database); with n = 0 only the
    sampler is built, and ``sampler.fill(out, seed + 1)`` writes the n vectors
    into an array of your own (a memory map, for sets larger than RAM; give
    n_clusters then, as k depends on n).
    """
    import numpy as np

    k = n_clusters or max(16, n // 250)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    probs = rng.lognormal(0.0, 0.75, k)
    probs /= probs.sum()
    sigma = rng.uniform(0.4, 1.0, k).astype(np.float32)

    def sample(m: int, s: int) -> np.ndarray:
        return fill(np.empty((m, d), np.float32), s)

    def fill(out: np.ndarray, s: int) -> np.ndarray:
        """Draw len(out) points into out (e.g. a float16 memory map too large for RAM as
        float32); the same points as sample(len(out), s)."""
        r = np.random.default_rng(s)
        m = len(out)
        for start in range(0, m, chunk):
            stop = min(m, start + chunk)
            lab = r.choice(k, size=stop - start, p=probs)
            x = r.standard_normal((stop - start, d), dtype=np.float32)
            x *= (sigma[lab] / np.sqrt(d))[:, None]
            x += centres[lab]
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            out[start:stop] = x
        return out

    sample.fill = fill  # type: ignore[attr-defined]
    return sample(n, seed + 1), sample


def rejudge(
    runs: list[dict], alpha: float | None = None, min_probe_margin: float | None = None
) -> list[dict]:
    """The runs re-decided from their stored raw statistics by the current flag rule (Holm over
    each run's attributes, per test family), with ``alpha`` / ``min_probe_margin`` in place of
    verdict.ALPHA / verdict.MIN_PROBE_MARGIN if given: cut-offs can be compared on the same runs
    without re-running any audit."""
    import copy

    from retrieval.audit import verdict
    from retrieval.audit.concordance import holm

    out = copy.deepcopy(runs)
    for r in out:
        attrs = r["attributes"]
        names = list(attrs)
        ph = holm([attrs[n]["p_value"] for n in names])
        phq = holm([attrs[n]["p_value_query"] for n in names])
        for n, a, b in zip(names, ph, phq, strict=True):
            v = attrs[n]
            v["p_value_holm"], v["p_value_holm_query"] = a, b
            v["flagged"], v["retrieval_bias"], _ = verdict.decide(
                a,
                v["lift"],
                v["probe_balanced_accuracy"],
                v["chance"],
                (v["label_association"], v["label_association_p"]),
                b,
                v["lift_query"],
                verdict.ALPHA if alpha is None else alpha,
                verdict.MIN_PROBE_MARGIN if min_probe_margin is None else min_probe_margin,
            )
    return out


AUDIT_STATS = (
    "concordance",
    "expected",
    "lift",
    "p_value",
    "p_value_holm",
    "probe_balanced_accuracy",
    "chance",
    "label_association",
    "label_association_p",
    "flagged",
    "retrieval_bias",
)


def attribute_stats(attributes: dict) -> dict:
    """Per audited attribute, the raw statistics a run record keeps (both concordance tests,
    the probe, the label association, the verdict): enough for ``rejudge``."""
    out = {}
    for name, v in attributes.items():
        q = v.get("query_null") or {}
        out[name] = {k: v.get(k) for k in AUDIT_STATS} | {
            "lift_query": q.get("lift"),
            "p_value_query": q.get("p_value"),
            "p_value_holm_query": q.get("p_value_holm"),
            "detectable_lift": v.get("detectable_lift"),
            "detectable_lift_query": q.get("detectable_lift"),
        }
    return out
