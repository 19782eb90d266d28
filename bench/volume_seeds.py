"""Volume training across seeds (issue 23): does a CT model find its lesion whatever the seed?

One ``train_model`` per (recipe, seed) on the 300-volume CT phantom of bench/volumes.py,
with the best val precision@1 / accuracy, every epoch's val P@1 and balanced accuracy, and
the schedules the stall guard started. Recipes: ``defaults`` (the current ones); any JSON of
TrainOptions fields, e.g. ``'{"peak_weight": 0, "batch_size": 48}'`` for the former ones.
Each run on one thread, so two can share the 2 cores; the seconds are not a speed figure.

    .venv/bin/python bench/volume_seeds.py NAME SEED '{"batch_size": 24}'
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine  # noqa: E402

WORK = Path("/work/artifacts/vol3d/bench")


def main(argv=None) -> int:
    from retrieval.model.train import TrainOptions, train_model

    argv = sys.argv[1:] if argv is None else argv
    name, seed, extra = argv[0], int(argv[1]), json.loads(argv[2] if len(argv) > 2 else "{}")
    torch.set_num_threads(1)
    man = WORK / extra.pop("phantom", "ct_phantom") / "manifest.csv"
    t = time.time()
    rep = train_model(
        man, f"/tmp/volume_seeds/{name}_s{seed}", TrainOptions(seed=seed, progress=False, **extra)
    )
    out = {
        "name": name,
        "seed": seed,
        "opts": extra,
        "s": time.time() - t,
        "summary": rep.summary(),
        "best": rep.best_val,
        "hist": [
            (h["epoch"], round(h["precision_at_1"], 2), round(h["balanced_accuracy"], 2))
            for h in rep.history
        ],
        "attempts": rep.attempts,
        "machine": machine(),
    }
    path = RESULTS / "volume_seeds.json"
    doc = json.loads(path.read_text()) if path.is_file() else {"benchmark": "volume_seeds"}
    doc.setdefault("runs", {})[f"{name} seed {seed}"] = out
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(json.dumps(out)[:400])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
