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
    # a volume's region has three axes: an image's four numbers are refused in one line
    assert main(["query", str(root / "i"), str(vol), "--region", "0,0,8,8"]) == 2
    err = capsys.readouterr().err
    assert "X0,Y0,Z0,X1,Y1,Z1" in err and "Traceback" not in err


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


# ------------------------------------------------------------ the region index over voxels
@pytest.fixture(scope="module")
def vr(volume_index):
    from retrieval.service.retriever import CaseRetriever

    return CaseRetriever.load(volume_index[0] / "i")


def test_volume_bundle_holds_a_region_index_of_feature_voxels(vr):
    ri = vr.region_index
    assert ri is not None and len(ri.grid) == 3
    assert ri.sizes.shape == (len(vr.cases), 3)  # (D, H, W) per case
    assert ri.index.ntotal == len(vr.cases) * int(np.prod(ri.grid))
    rebuilt = np.stack([ri.embedding(i) for i in range(len(ri))])
    np.testing.assert_allclose(rebuilt, vr.index.reconstruct_all(), atol=1e-5)


def test_volume_matched_regions_from_the_bundle_equal_re_encoding(vr, volume_index, monkeypatch):
    import copy

    vol, _ = _test_volume(volume_index[1])
    res = vr.query(str(vol), k=3)
    q = vr.encode(str(vol))
    ctxs = vr.encode_many([n.image for n in res.neighbors])
    for nb, c in zip(res.neighbors, ctxs, strict=True):
        assert nb.matched_regions and nb.completeness_error < 1e-4
        again = copy.deepcopy(nb)
        vr.match_regions(q, c, again)
        for side in ("query_box", "case_box"):
            got = [getattr(m, side) for m in nb.matched_regions]
            assert got == [getattr(m, side) for m in again.matched_regions]
            assert all(len(b) == 6 for b in got)
        np.testing.assert_allclose(
            [m.contribution for m in nb.matched_regions],
            [m.contribution for m in again.matched_regions],
            rtol=1e-4,
            atol=1e-7,
        )
        for side in ("query", "case"):
            np.testing.assert_allclose(
                nb.maps["similarity"][side], again.maps["similarity"][side], atol=1e-5
            )
    monkeypatch.setattr(vr, "encode_many", lambda *_: pytest.fail("re-encoded a neighbour"))
    assert all(n.matched_regions for n in vr.query(str(vol), k=3).neighbors)


def test_volume_region_query_ranks_by_exact_maxsim_inside_the_box(vr, volume_index):
    from retrieval.errors import CasebaseError
    from retrieval.service import refine

    vol, _ = _test_volume(volume_index[1])
    q = vr.encode(str(vol))
    d, h, w = q.geometry.original_size
    box = (0, 0, 0, w // 2, h // 2, d // 2)
    res = vr.query(str(vol), k=4, region=box)
    js = res.to_json()
    assert js["region"] == list(box)
    sel = refine.select_cells(box, q.geometry, q.grid)
    assert sel.cells.shape == q.grid and 0 < sel.cells.sum() < sel.cells.size
    qz, _ = vr.query_cells(q)
    qu = refine.unit(qz[sel.cells.ravel()])
    brute = [
        float((qu @ refine.unit(vr.region_index.case(i)[0]).T).max(axis=1).mean())
        for i in range(len(vr.cases))
    ]
    best = np.argsort(brute)[::-1][:4]
    assert [n.row for n in res.neighbors] == best.tolist()
    np.testing.assert_allclose(
        [n["region_score"] for n in js["neighbors"]], np.array(brute)[best], atol=1e-5
    )
    for nb in js["neighbors"]:
        for reg in nb["matched_regions"]:
            x0, y0, z0, x1, y1, z1 = reg["query_box"]
            assert box[0] <= x0 < x1 <= box[3] and box[1] <= y0 < y1 <= box[4]
            assert box[2] <= z0 < z1 <= box[5]
    with pytest.raises(CasebaseError, match="outside the volume"):
        vr.query(str(vol), region=(0, 0, 0, w, h, d + 1))


def test_select_cells_in_a_volume():
    from retrieval.errors import CasebaseError
    from retrieval.model.preprocess import Geometry3D
    from retrieval.service import refine

    g = Geometry3D((20, 64, 32), 32, 8)  # D 20, H 64, W 32; grid 4 x 4 x 4: cells 8 x 16 x 5
    sel = refine.select_cells((0, 0, 0, 16, 32, 10), g, (4, 4, 4))
    assert sel.cells[:2, :2, :2].all() and sel.cells.sum() == 8 and sel.note == ""
    assert sel.searched == [0, 0, 0, 16, 32, 10]
    tiny = refine.select_cells((17, 33, 11, 18, 34, 12), g, (4, 4, 4))
    assert tiny.cells.sum() == 1 and tiny.cells[2, 2, 2] and "widened" in tiny.note
    assert tiny.clip == g.cell_box(2, 2, 2, (4, 4, 4))
    for box, msg in [
        ((0, 0, 5, 8, 8, 2), "inverted"),
        ((0, 0, 0, 8, 8, 0), "empty"),
        ((0, 0, 0, 8, 8), "X0,Y0,Z0,X1,Y1,Z1"),
        ((0, 0, -1, 8, 8, 4), "outside the volume"),
    ]:
        with pytest.raises(CasebaseError, match=msg):
            refine.select_cells(box, g, (4, 4, 4))


def test_cli_region_query_on_a_volume(volume_index, capsys):
    root, manifest = volume_index
    vol, _ = _test_volume(manifest)
    d, h, w = np.load(vol).shape
    box = [0, 0, 0, w // 2, h // 2, d]
    capsys.readouterr()
    arg = ",".join(str(v) for v in box)
    assert main(["query", str(root / "i"), str(vol), "-k", "2", "--region", arg, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["region"] == box and len(out["neighbors"]) == 2
    assert all("region_score" in nb for nb in out["neighbors"])


def test_occlusion_on_a_volume_says_where_zeroing_lowers_the_score(vr, volume_index):
    """captum's Occlusion with a 3-D window: a (D', H', W') map of the model input whose top
    voxels, zeroed, lower the class score more than its bottom voxels zeroed."""
    import torch

    from retrieval.explain import registry

    vol, _ = _test_volume(volume_index[1])
    q = vr.encode(str(vol))
    x = q.tensor[None]
    target = torch.tensor([q.predicted])
    attr = registry.get("occlusion").attribute(vr.model, x, target)[0]
    assert tuple(attr.shape) == tuple(x.shape[2:])
    assert torch.isfinite(attr).all() and float(attr.std()) > 0
    model = vr.model.eval()

    def score_without(mask):
        with torch.no_grad():
            return float(model(x * ~mask)[0, q.predicted])

    k = attr.numel() // 10
    order = attr.flatten().argsort()
    top = torch.zeros(attr.numel(), dtype=torch.bool)
    top[order[-k:]] = True
    bottom = torch.zeros(attr.numel(), dtype=torch.bool)
    bottom[order[:k]] = True
    shape = (1, 1, *attr.shape)
    assert score_without(top.reshape(shape)) < score_without(bottom.reshape(shape))


def test_query_explains_a_volume_with_occlusion(vr, volume_index):
    vol, _ = _test_volume(volume_index[1])
    res = vr.query(str(vol), k=2, explain=("occlusion",))
    m = res.maps["occlusion"]
    assert m.shape == np.load(vol).shape and np.isfinite(m).all() and m.std() > 0


def test_volume_explain_eval_measures_occlusion_when_asked(volume_index, capsys):
    root, manifest = volume_index
    capsys.readouterr()
    assert main(["explain-eval", str(root / "i"), str(manifest), "--json", "--no-store"]) == 0
    default = json.loads(capsys.readouterr().out)["methods"]
    assert "occlusion" not in default and "gradcam" in default  # the cheap maps by default
    args = ["explain-eval", str(root / "i"), str(manifest), "--json", "--no-store"]
    assert main([*args, "--methods", "occlusion"]) == 0
    occ = json.loads(capsys.readouterr().out)["methods"]["occlusion"]
    assert occ["dimensions"] == 3 and occ["n_cases"] >= 1 and 0.0 <= occ["pointing_game"] <= 1.0
