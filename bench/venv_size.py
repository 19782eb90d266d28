"""How much disk the virtual environment takes, and how much of it is CUDA.

torch from PyPI is the CUDA build: it pulls the nvidia-* libraries and triton
even on a machine without a GPU. This sums the installed files of the venv
(symlinks not followed), of torch, and of the nvidia-* / triton packages, so
the README can say what a CPU-only user saves by taking the CPU wheel.

    .venv/bin/python bench/venv_size.py [--venv .venv]
"""

from __future__ import annotations

import argparse
import time
from importlib import metadata
from pathlib import Path

from _common import finish, machine, table

CUDA_PREFIXES = ("nvidia-", "nvidia_", "triton")


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def dist_bytes(dist: metadata.Distribution) -> int:
    """Bytes of a distribution's installed files (from its RECORD)."""
    total = 0
    for f in dist.files or []:
        p = Path(dist.locate_file(f))
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", default=".venv")
    args = ap.parse_args()
    started = time.time()
    info = machine()
    venv = Path(args.venv)
    total = tree_bytes(venv)
    cuda: dict[str, int] = {}
    torch_bytes = 0
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith(CUDA_PREFIXES):
            cuda[name] = dist_bytes(dist)
        elif name == "torch":
            torch_bytes = dist_bytes(dist)
    cuda_total = sum(cuda.values())
    gb = 1e9
    rows = [
        ["whole venv", total / gb],
        ["torch", torch_bytes / gb],
        [f"nvidia-* and triton ({len(cuda)} packages)", cuda_total / gb],
        ["the rest", (total - torch_bytes - cuda_total) / gb],
    ]
    print(table(["part", "GB"], rows, title=f"disk use of {venv}"))
    finish(
        "venv_size",
        info,
        {
            "venv": str(venv),
            "torch_version": metadata.version("torch"),
            "venv_bytes": total,
            "venv_gb": round(total / gb, 2),
            "cuda_packages_gb": round(cuda_total / gb, 2),
            "torch_bytes": torch_bytes,
            "cuda_packages_bytes": cuda_total,
            "cuda_packages": dict(sorted(cuda.items())),
        },
        started,
    )


if __name__ == "__main__":
    main()
