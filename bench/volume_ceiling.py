"""How separable are a 3-D phantom's classes once the lesion is found? (issue 23)

A whole-volume model must both find the lesion and tell its class. This script takes the
finding away: it cuts a box of 16 x 24 x 24 voxels around each lesion's centre (from the
phantom's ground-truth masks, which a real model never sees), trains the same cnn3d
backbone and head on those boxes with cross-entropy alone (no augmentation, AdamW, batch
16), and scores the test split's boxes. Several seeds, the best val epoch's test accuracy
each. What it says: an upper bound, for this backbone and this many training cases, on what
a whole-volume model of the phantom can reach; when it is low the phantom's classes differ
by detail at the resolution limit, and no training schedule of the full model will get far.

    .venv/bin/python bench/volume_ceiling.py            # ct and mr, 3 seeds each

Phantoms as in bench/volumes.py (made there if missing); results to
bench/results/volume_ceiling.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import finish, machine  # noqa: E402
from volumes import PHANTOMS, WORK  # noqa: E402

CROP = (16, 24, 24)  # (D, H, W) voxels around the lesion's centre


def lesion_crops(manifest_path: Path, split: str) -> tuple[np.ndarray, list[str]]:
    """(N, D, H, W) float32 boxes centred on each case's lesion mask, and their labels."""
    import pandas as pd

    root = manifest_path.parent
    man = pd.read_csv(manifest_path)
    rows = man[man["split"] == split]
    boxes = []
    for _, row in rows.iterrows():
        vol = np.load(root / row["image"], allow_pickle=False).astype(np.float32)
        mask = np.load(root / row["mask"], allow_pickle=False)
        centre = [int(round(float(a.mean()))) for a in np.nonzero(mask)]
        padded = np.pad(vol, [(c, c) for c in CROP], mode="edge")
        sl = tuple(
            slice(ci + c - c // 2, ci + c - c // 2 + c) for ci, c in zip(centre, CROP, strict=True)
        )
        boxes.append(padded[sl])
    return np.stack(boxes), rows["label"].tolist()


def train_on_crops(name: str, manifest: Path, seed: int, epochs: int) -> dict:
    import torch
    import torch.nn.functional as F

    from retrieval.model.network import CaseNet, ModelConfig

    torch.manual_seed(seed)
    data = {s: lesion_crops(manifest, s) for s in ("train", "val", "test")}
    classes = sorted(set(data["train"][1]))

    def tensors(split):
        x, labels = data[split]
        return torch.from_numpy(x)[:, None], torch.tensor([classes.index(v) for v in labels])

    (xt, yt), (xv, yv), (xs, ys) = tensors("train"), tensors("val"), tensors("test")
    mu, sd = float(xt.mean()), float(xt.std())
    cfg = ModelConfig(
        classes=classes,
        backbone="cnn3d",
        in_channels=1,
        image_size=CROP[1],
        depth=CROP[0],
        embedding_dim=128,
        width=16,
        mean=[mu],
        std=[sd],
    )
    net = CaseNet(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)

    def accuracy(x, y) -> float:
        net.eval()
        with torch.no_grad():
            return float((net((x - mu) / sd).argmax(1) == y).float().mean())

    best_val, test_at_best, curve = -1.0, 0.0, []
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 16):
            idx = perm[i : i + 16]
            if len(idx) < 2:
                continue
            loss = F.cross_entropy(net((xt[idx] - mu) / sd), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        val, test = accuracy(xv, yv), accuracy(xs, ys)
        curve.append(round(val, 3))
        if val > best_val:
            best_val, test_at_best = val, test
    return {
        "seed": seed,
        "best_val_accuracy": best_val,
        "test_accuracy": test_at_best,
        "val_curve": curve,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=sorted(PHANTOMS), default=None)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args(argv)
    info, started = machine(), time.time()
    out = {}
    for name, spec in PHANTOMS.items():
        if args.only and name != args.only:
            continue
        manifest = Path(WORK) / f"{name}_phantom" / "manifest.csv"
        if not manifest.exists():
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "retrieval.cli",
                    "phantom",
                    str(manifest.parent),
                    "--dim",
                    "3",
                    "--n",
                    str(spec["n"]),
                    "--seed",
                    str(spec["seed"]),
                    "--modality",
                    spec["modality"],
                ],
                check=True,
            )
        runs = [train_on_crops(name, manifest, s, args.epochs) for s in range(args.seeds)]
        acc = [r["test_accuracy"] for r in runs]
        out[name] = {
            "phantom": spec,
            "crop": list(CROP),
            "epochs": args.epochs,
            "runs": runs,
            "test_accuracy_mean": float(np.mean(acc)),
            "test_accuracy_min": float(np.min(acc)),
            "test_accuracy_max": float(np.max(acc)),
        }
        print(
            f"{name}: lesion-box test accuracy {np.mean(acc):.3f} ({min(acc):.3f}-{max(acc):.3f})",
            flush=True,
        )
    finish(
        "volume_ceiling" + (f"_{args.only}" if args.only else ""), info, {"phantoms": out}, started
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
