"""Volumes (issue 23, model side): the CLI defaults on a 3-D CT phantom and an MR phantom.

Per phantom (CT: ``casebase phantom OUT --dim 3 --n 300 --seed 0``, the one tuned on;
MR: ``--modality mr --seed 11``, never tuned on) through the CLI, with its defaults
(``--backbone auto`` picks cnn3d, 32 x 64 x 64 input):

* ``casebase train`` wall time (300 volumes of 32 x 64 x 64; target under 15 min on 2 cores;
  run the script under ``/work/notes/heavy --exclusive`` so nothing else shares the cores);
* ``casebase index build``, then ``casebase eval --json``: precision@5 on the test split
  (own patient excluded; target >= 0.85);
* ``casebase explain-eval --methods gradcam,similarity,occlusion --json``: the 3-D pointing game on the
  test cases (target >= 0.8 for gradcam);
* every test case queried through CaseRetriever (the code `casebase query` runs): the share of
  matched boxes [x0, y0, z0, x1, y1, z1] inside the volume (target 1.0), and the map shapes.

Results merge into bench/results/volumes.json (one entry per phantom, with the load).

    /work/notes/heavy --exclusive .venv/bin/python bench/volumes.py --only ct
    /work/notes/heavy .venv/bin/python bench/volumes.py --only mr
    /work/notes/heavy .venv/bin/python bench/volumes.py --only ct --backbone slices   # 2.5D
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine  # noqa: E402

PHANTOMS = {
    "ct": {"modality": "ct", "n": 300, "seed": 0},
    "mr": {"modality": "mr", "n": 300, "seed": 11},
    # never tuned on either: another size (48 x 96 x 96, which the model resizes to its
    # 32 x 64 x 64 input) read from DICOM series
    "ct96": {"modality": "ct", "n": 300, "seed": 7, "size": 96, "depth": 48, "format": "dicom"},
    # the same generators with a fourth, lesion-free class "normal" (--normals), 100 volumes a
    # class as above: does Grad-CAM find every lesion class when none can be learned as "none
    # of the others' lesions"? (docs/results.md, "One class learned by elimination")
    "ct_normals": {"modality": "ct", "n": 400, "seed": 0, "normals": True},
    "ct96_normals": {
        "modality": "ct",
        "n": 400,
        "seed": 7,
        "size": 96,
        "depth": 48,
        "normals": True,
    },
}
WORK = "/work/artifacts/vol3d/bench"
CASEBASE = [sys.executable, "-m", "retrieval.cli"]


# explain-eval before the maps over feature cells were upsampled cell-centred
HALF_CELL_OFF = "align_corners=False interpolation: each cell half a cell off its centre"


def sh(args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        CASEBASE + [str(a) for a in args], check=True, text=True, capture_output=True, **kw
    )


def phantom_args(spec: dict) -> list:
    """`casebase phantom OUT ...` arguments of a PHANTOMS entry (what runs, and what the row
    records as its command)."""
    args = ["--dim", 3, "--n", spec["n"], "--seed", spec["seed"], "--modality", spec["modality"]]
    args += [a for k in ("size", "depth", "format") if k in spec for a in (f"--{k}", spec[k])]
    return args + (["--normals"] if spec.get("normals") else [])


def boxes_inside(index_dir, manifest, max_queries: int | None = None) -> dict:
    from retrieval.data.manifest import load_manifest
    from retrieval.service.retriever import CaseRetriever

    r = CaseRetriever.load(index_dir, device="cpu")
    man = load_manifest(manifest)
    test = man.select(["test"]).reset_index(drop=True)
    if max_queries:
        test = test.iloc[:max_queries]
    n_box = n_in = 0
    shapes_ok = True
    for _, row in test.iterrows():
        res = r.query(
            str(man.resolve(row["image"])),
            k=5,
            explain=("gradcam",),
            exclude_patient=row["patient_id"] or None,
        )
        d, h, w = res.original_size
        shapes_ok &= tuple(res.maps["gradcam"].shape) == (d, h, w)
        for nb in res.neighbors:
            cd, ch, cw = nb.original_size
            for reg in nb.matched_regions:
                for box, (bd, bh, bw) in ((reg.query_box, (d, h, w)), (reg.case_box, (cd, ch, cw))):
                    n_box += 1
                    x0, y0, z0, x1, y1, z1 = box
                    n_in += int(0 <= x0 < x1 <= bw and 0 <= y0 < y1 <= bh and 0 <= z0 < z1 <= bd)
    return {
        "queries": len(test),
        "boxes": n_box,
        "inside": n_in,
        "fraction_inside": n_in / max(1, n_box),
        "gradcam_map_shape_is_DHW": bool(shapes_ok),
    }


def run_one(
    name: str,
    spec: dict,
    work: Path,
    backbone: str | None = None,
    seed: int | None = None,
    train_args: tuple[str, ...] = (),
    previous: dict | None = None,
) -> dict:
    """previous: this key's row from an earlier run; when given and its model is still on disk,
    the model is reused (training not repeated; its figures are copied from that row)."""
    ph = work / f"{name}_phantom"
    if not (ph / "manifest.csv").is_file():
        sh(["phantom", ph, *phantom_args(spec)])
    manifest = ph / "manifest.csv"
    tag = f"{name}_{backbone}" if backbone else name
    tag = f"{tag}_seed{seed}" if seed is not None else tag
    tag += "".join("_" + a.strip("-").replace("-", "") for a in train_args)
    model, index = work / f"{tag}_model", work / f"{tag}_index"
    load0 = list(os.getloadavg())
    t0 = time.time()
    extra = (["--backbone", backbone] if backbone else []) + (
        ["--seed", seed] if seed is not None else []
    )
    extra += list(train_args)
    reused = previous is not None and (model / "config.json").is_file()
    if reused:
        train_s, load0, load1 = (
            previous["train_seconds"],
            previous["train_loadavg_start"],
            previous["train_loadavg_end"],
        )
        train_output = previous["train_output"]
    else:
        out = sh(["train", manifest, "--out", model, *extra])
        train_s = time.time() - t0
        load1 = list(os.getloadavg())
        train_output = out.stdout.strip().splitlines()[-3:]
    cfg = json.loads((model / "config.json").read_text())
    sh(["index", "build", model, manifest, "--out", index])
    ev = json.loads(sh(["eval", index, manifest, "--json"]).stdout)
    ee = json.loads(
        sh(
            [
                "explain-eval",
                index,
                manifest,
                "--methods",
                "gradcam,similarity,occlusion",
                "--json",
                "--no-store",
                "--max-cases",
                60,
                "--sanity-cases",
                0,
            ]
        ).stdout
    )
    # the randomisation sanity check and the deletion curves of the two cheap maps
    sane = json.loads(
        sh(
            ["explain-eval", index, manifest, "--methods", "gradcam,similarity", "--json"]
            + ["--no-store", "--max-cases", 30]
        ).stdout
    )["methods"]
    boxes = boxes_inside(index, manifest)
    p5 = ev.get("precision_at_5", ev.get("retrieval", {}).get("precision_at_5"))
    return {
        "phantom": {
            **spec,
            "command": " ".join(["casebase phantom OUT", *map(str, phantom_args(spec))]),
        },
        "train_seconds": round(train_s, 1),
        "train_loadavg_start": load0,
        "train_loadavg_end": load1,
        "train_output": train_output,
        # trained by an earlier run (its date), only index build and the evaluations re-run
        "model_reused_from": previous.get("model_reused_from") or previous["date"]
        if reused
        else None,
        "cam_layer": ee["settings"].get("cam_layer"),
        # "logit", or the logit minus the lesion-free class's (--reference-class auto)
        "class_score_explained": ee["settings"].get("class_score_explained", "logit"),
        "cell_maps_upsampled": ee["settings"].get("cell_maps_upsampled", HALF_CELL_OFF),
        "model": {k: cfg[k] for k in ("backbone", "depth", "image_size", "width")},
        "epochs": {k: cfg["training"].get(k) for k in ("epochs_run", "epochs_total", "max_epochs")},
        "n_train": cfg["training"].get("n_train"),
        "loss_options": cfg["training"].get("loss_options", {}),
        "cases_per_batch": cfg["training"].get("cases_per_batch"),
        "precision_at_5": p5,
        "eval": ev,
        "pointing_game": {m: v["pointing_game"] for m, v in ee["methods"].items()},
        "pointing_game_strict": {m: v["pointing_game_strict"] for m, v in ee["methods"].items()},
        "mask_energy": {m: v["mask_energy"] for m, v in ee["methods"].items()},
        "mask_area": {m: v["mask_area"] for m, v in ee["methods"].items()},
        "explain_eval_cases": ee["n_cases"],
        "sanity": {
            m: {
                k: v.get(k)
                for k in (
                    "sanity_check",
                    "randomization_spearman",
                    "deletion_gain",
                    "faithfulness",
                    "n_cases",
                )
            }
            for m, v in sane.items()
        },
        "similarity_lesion_share": ee.get("similarity_lesion_share"),
        "boxes": boxes,
        "targets": {
            "precision_at_5": 0.85,
            "gradcam_pointing_game": 0.8,
            "fraction_inside": 1.0,
            "train_seconds": 900,
        },
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=sorted(PHANTOMS))
    ap.add_argument("--work", default=WORK)
    ap.add_argument(
        "--backbone", help="train with this backbone instead of the default (e.g. slices: 2.5D)"
    )
    ap.add_argument(
        "--label", help="added to the result's key (e.g. 'on H200'), so runs elsewhere stay apart"
    )
    ap.add_argument("--train-seed", type=int, help="casebase train --seed (default: its own)")
    ap.add_argument(
        "--reuse-model",
        action="store_true",
        help="keep the model an earlier run of the same key trained (still in --work) and re-run "
        "only index build, eval and explain-eval; the training figures come from that run's row",
    )
    ap.add_argument(
        "--train-args",
        default="",
        help="more `casebase train` arguments, given with '=' (added to the key), "
        "e.g. --train-args=--zero-init-residual",
    )
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "volumes.json"
    train_args = tuple(args.train_args.split())
    for name in [args.only] if args.only else list(PHANTOMS):
        info = machine()
        t0 = time.time()
        key = f"{name} --backbone {args.backbone}" if args.backbone else name
        key = f"{key} --seed {args.train_seed}" if args.train_seed is not None else key
        key = f"{key} {' '.join(train_args)}" if train_args else key
        key = f"{key} {args.label}" if args.label else key
        old = json.loads(path.read_text()) if path.is_file() else {}
        previous = old.get("phantoms", {}).get(key) if args.reuse_model else None
        res = run_one(
            name, PHANTOMS[name], work, args.backbone, args.train_seed, train_args, previous
        )
        res["train_seed"] = args.train_seed
        info["loadavg_end"] = list(os.getloadavg())
        info["wall_s"] = round(time.time() - t0, 1)
        res["machine"] = info
        res["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        # re-read: another run (the other phantom) may have written meanwhile
        doc = json.loads(path.read_text()) if path.is_file() else {"benchmark": "volumes"}
        res["cli"] = (
            " ".join(train_args)
            if train_args
            else f"defaults + --backbone {args.backbone}"
            if args.backbone
            else "defaults"
        )
        opts = res.pop("loss_options", {})
        res["recipe"] = (
            f"peak-pooled CE x {opts.get('peak_weight', 0):g}, {res.pop('cases_per_batch')} cases a step"
        )
        if previous is not None and res.get("model_reused_from"):
            # the earlier row of the same model stays, named by the Grad-CAM block it used
            layer = previous.get("cam_layer") or "the last block"
            score = previous.get("class_score_explained", "logit")
            if layer != res["cam_layer"]:
                previous.setdefault("cam_layer", layer)
                doc["phantoms"].pop(key, None)  # both rows go last: the earlier one first
                doc["phantoms"][f"{key} (Grad-CAM at {layer})"] = previous
            elif score != res["class_score_explained"]:
                previous.setdefault("class_score_explained", score)
                doc["phantoms"].pop(key, None)
                doc["phantoms"][f"{key}_own_{score}"] = previous  # a key figures can name
            elif previous.get("cell_maps_upsampled", HALF_CELL_OFF) != res["cell_maps_upsampled"]:
                previous.setdefault("cell_maps_upsampled", HALF_CELL_OFF)
                previous["cli"] = f"{previous['cli']}, cell maps half a cell off"
                doc["phantoms"].pop(key, None)
                doc["phantoms"][f"{key}_half_cell_off"] = previous
        earlier = doc.get("phantoms", {}).get(key)
        if previous is None and earlier is not None:
            before, now = earlier.get("epochs", {}), res.get("epochs", {})
            if before.get("max_epochs") != now.get("max_epochs") and res["cli"] == "defaults":
                # the defaults' schedule changed: the earlier defaults' row stays, named by it
                n, cli = (
                    before.get("max_epochs"),
                    f"former defaults ({before.get('max_epochs')} epochs)",
                )
                # the rows of that model (first evaluation, re-evaluations) move together
                for k in [k for k in doc["phantoms"] if k.startswith(f"{key}_own_")] + [key]:
                    row = doc["phantoms"].pop(k)
                    row["cli"] = cli
                    doc["phantoms"][f"{key}_{n}_epochs{k[len(key) :]}"] = row
        doc.setdefault("phantoms", {})[key] = res
        RESULTS.mkdir(exist_ok=True)
        path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(
            f"{name}: train {res['train_seconds']} s, P@5 {res['precision_at_5']}, pointing "
            f"{res['pointing_game']}, boxes inside {res['boxes']['fraction_inside']:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
