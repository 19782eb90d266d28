"""bench/volumes.py --reuse-model: no training, the first run's training figures, both rows kept."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import volumes  # noqa: E402


def _fake_cli(calls, cam_layer):
    def sh(args, **kw):
        args = [str(a) for a in args]
        calls.append(args[0])
        out = ""
        if args[0] == "eval":
            out = json.dumps({"precision_at_5": 0.9, "per_class": {}})
        elif args[0] == "explain-eval":
            methods = {"gradcam": 0.4, "similarity": 0.5, "occlusion": 0.7}
            out = json.dumps(
                {
                    "n_cases": 45,
                    "settings": {"cam_layer": cam_layer},
                    "similarity_lesion_share": {"median_share": 0.01, "median_chance": 0.001},
                    "methods": {
                        m: {"pointing_game": v, "pointing_game_strict": 0.0, "mask_energy": 0.0}
                        | {"mask_area": 0.001, "sanity_check": "pass"}
                        for m, v in methods.items()
                    },
                }
            )
        return subprocess.CompletedProcess(args, 0, stdout=out, stderr="")

    return sh


def test_reuse_keeps_the_model_and_the_earlier_row(tmp_path, monkeypatch):
    work, results = tmp_path / "work", tmp_path / "results"
    (work / "ct_phantom").mkdir(parents=True)
    (work / "ct_phantom" / "manifest.csv").write_text("case_id\n")
    (work / "ct_model").mkdir()
    cfg = {"backbone": "cnn3d", "depth": 32, "image_size": 64, "width": 16}
    cfg["training"] = {"epochs_run": 21, "epochs_total": 39, "max_epochs": 29, "n_train": 210}
    (work / "ct_model" / "config.json").write_text(json.dumps(cfg))
    first = {
        "date": "2026-12-01T00:00:00Z",
        "train_seconds": 799.0,
        "train_loadavg_start": [0.3, 0, 0],
        "train_loadavg_end": [2.4, 0, 0],
        "train_output": ["trained"],
        "pointing_game": {"gradcam": 0.14},
    }
    results.mkdir()
    (results / "volumes.json").write_text(json.dumps({"phantoms": {"ct": first}}))
    calls: list[str] = []
    monkeypatch.setattr(volumes, "RESULTS", results)
    monkeypatch.setattr(volumes, "sh", _fake_cli(calls, "backbone.features.4"))
    monkeypatch.setattr(volumes, "boxes_inside", lambda *a, **k: {"fraction_inside": 1.0})

    assert volumes.main(["--only", "ct", "--work", str(work), "--reuse-model"]) == 0
    assert "train" not in calls and calls[0] == "index"
    rows = json.loads((results / "volumes.json").read_text())["phantoms"]
    assert list(rows) == ["ct (Grad-CAM at the last block)", "ct"]  # the earlier row first
    new = rows["ct"]
    assert new["train_seconds"] == 799.0 and new["train_output"] == ["trained"]
    assert new["model_reused_from"] == first["date"] and new["cam_layer"] == "backbone.features.4"
    assert rows["ct (Grad-CAM at the last block)"]["pointing_game"] == {"gradcam": 0.14}

    # without --reuse-model the model is trained again
    calls.clear()
    assert volumes.main(["--only", "ct", "--work", str(work)]) == 0
    assert calls[0] == "train"
