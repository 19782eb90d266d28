"""Volumes end to end through the CLI: phantom --dim 3 -> train (auto: cnn3d) -> index build ->
query --json (boxes [x0, y0, z0, x1, y1, z1] inside the volume, maps (D, H, W)) -> explain-eval."""

import json

import numpy as np
import pytest

from retrieval.cli import main


@pytest.fixture(scope="module")
def volume_index(tmp_path_factory):
    from retrieval.data.phantom3d import make_phantom3d

    root = tmp_path_factory.mktemp("vol3d")
    make_phantom3d(root / "ph", n=18, size=32, depth=8, seed=3)
    manifest = root / "ph" / "manifest.csv"
    assert (
        main(["train", str(manifest), "--out", str(root / "m"), "--epochs", "1", "--width", "4"])
        == 0
    )
    cfg = json.loads((root / "m" / "config.json").read_text())
    assert cfg["backbone"] == "cnn3d" and cfg["depth"] == 8 and cfg["image_size"] == 32
    assert main(["index", "build", str(root / "m"), str(manifest), "--out", str(root / "i")]) == 0
    return root, manifest


def _test_volume(manifest):
    import pandas as pd

    df = pd.read_csv(manifest)
    row = df[df["split"] == "test"].iloc[0]
    return manifest.parent / row["image"], manifest.parent / row["mask"]


def test_query_json_boxes_inside_and_maps_of_the_volume_shape(volume_index, tmp_path, capsys):
    root, manifest = volume_index
    vol, _ = _test_volume(manifest)
    shape = np.load(vol).shape
    capsys.readouterr()
    rc = main(
        [
            "query",
            str(root / "i"),
            str(vol),
            "-k",
            "3",
            "--json",
            "--explain",
            "gradcam,similarity",
            "--save-maps",
            str(tmp_path / "maps"),
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["prediction"]["probabilities"]) == {"cavity", "mass", "nodule"}
    assert "flag" in out["ood"] and len(out["neighbors"]) == 3
    d, h, w = shape
    n = 0
    for nb in out["neighbors"]:
        for reg in nb.get("matched_regions", []):
            for box in (reg["query_box"], reg["case_box"]):
                x0, y0, z0, x1, y1, z1 = box
                assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and 0 <= z0 < z1 <= d
                n += 1
    assert n > 0
    for method in ("gradcam", "similarity"):
        assert np.load(out["maps"][method]).shape == shape


def test_2d_only_features_say_so_in_one_line(volume_index, capsys):
    root, manifest = volume_index
    vol, _ = _test_volume(manifest)
    assert main(["query", str(root / "i"), str(vol), "--explain", "lime"]) == 2
    err = capsys.readouterr().err
    assert "not available for volumes" in err and "Traceback" not in err
    assert main(["query", str(root / "i"), str(vol), "--region", "0,0,8,8"]) == 2
    assert "not available for volumes" in capsys.readouterr().err


def test_explain_eval_runs_the_3d_pointing_game(volume_index, capsys):
    root, manifest = volume_index
    capsys.readouterr()
    rc = main(
        [
            "explain-eval",
            str(root / "i"),
            str(manifest),
            "--json",
            "--no-store",
            "--methods",
            "gradcam,lime",
        ]
    )
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    g = rep["methods"]["gradcam"]
    assert 0.0 <= g["pointing_game"] <= 1.0 and g["dimensions"] == 3 and g["n_cases"] >= 1
    assert "lime" in rep["skipped_methods"] and "lime" not in rep["methods"]


def test_3d_pointing_game_tolerance_is_per_axis():
    from retrieval.explain.trust import pointing_game

    heat = np.zeros((4, 8, 8))
    heat[0, 0, 0] = 1
    mask = np.zeros((4, 8, 8), bool)
    mask[1, 1, 1] = True
    assert pointing_game(heat, mask, 0) == 0.0
    assert pointing_game(heat, mask, 1) == 1.0
    assert pointing_game(heat, mask, (0, 1, 1)) == 0.0
