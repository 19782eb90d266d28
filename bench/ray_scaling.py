"""Ray index-build throughput with 1 and 2 embedding actors vs the local engine, in one run.

    python bench/ray_scaling.py MODEL_DIR MANIFEST [--repeats 2]

Runs inside a fresh network namespace (`unshare -n`, re-executing itself) so
the local Ray cluster lives on loopback only. Prints a table, writes
bench/results/ray_scaling.json, and a plan for 10M images by arithmetic from
the measured per-image cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _reexec_in_netns() -> None:
    if os.environ.get("CASEBASE_BENCH_NETNS") or not shutil.which("unshare"):
        return
    env = {**os.environ, "CASEBASE_BENCH_NETNS": "1"}
    cmd = [
        "unshare",
        "-n",
        "bash",
        "-c",
        'ip link set lo up && exec "$@"',
        "_",
        sys.executable,
        *sys.argv,
    ]
    sys.exit(subprocess.run(cmd, env=env).returncode)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("manifest")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    _reexec_in_netns()
    import ray

    from index.builder import case_table
    from index.ray_engine import embed_with_ray
    from retrieval.data.manifest import load_manifest
    from retrieval.model.embedding import embed_paths
    from retrieval.model.network import load_model
    from retrieval.model.preprocess import Preprocessor

    m = load_manifest(args.manifest)
    paths = case_table(m, m.select(["train", "val"]))["image"].tolist()
    model = load_model(args.model_dir)
    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    runs: dict[str, list[float]] = {"local": [], "ray-1-actor": [], "ray-2-actors": []}
    for _ in range(args.repeats):  # interleaved repetitions
        t = time.perf_counter()
        embed_paths(model, Preprocessor(model.config), paths, progress=False)
        runs["local"].append(len(paths) / (time.perf_counter() - t))
        for name, actors in (("ray-1-actor", 1), ("ray-2-actors", 2)):
            t = time.perf_counter()
            embed_with_ray(args.model_dir, paths, num_actors=actors, progress=False)
            runs[name].append(len(paths) / (time.perf_counter() - t))
    ray.shutdown()
    med = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
    per_image_s = 1.0 / med["ray-1-actor"]
    result = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "loadavg": os.getloadavg(),
        },
        "n_images": len(paths),
        "images_per_second_median": med,
        "runs": runs,
        "ratio_2_vs_1_actor": med["ray-2-actors"] / med["ray-1-actor"],
        "plan_10M_hours_per_cpu_actor": 10_000_000 * per_image_s / 3600,
    }
    print(f"{'engine':<16}{'img/s (median)':>16}")
    for k, v in med.items():
        print(f"{k:<16}{v:>16.1f}")
    print(f"2 vs 1 actor: x{result['ratio_2_vs_1_actor']:.2f}; load {result['machine']['loadavg']}")
    print(
        f"10M images at the 1-actor rate: {result['plan_10M_hours_per_cpu_actor']:.0f} actor-hours"
    )
    out = HERE / "results" / "ray_scaling.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
