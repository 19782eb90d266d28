"""Volumes end to end through the CLI: phantom --dim 3 -> train (auto: cnn3d) -> index build ->
query --json (boxes [x0, y0, z0, x1, y1, z1] inside the volume, maps (D, H, W)) -> explain-eval."""

import json

import numpy as np
import pytest

from retrieval.cli import main
from retrieval.explain.registry import METHODS


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
    # the volume recipe: the peak-pooled CE on, 6 cases a step (2-D: off, 24)
    assert cfg["training"]["loss_options"]["peak_weight"] == 1.0
    assert cfg["training"]["cases_per_batch"] == 6 and "peak-pooled" in cfg["training"]["loss"]
    assert cfg["training"]["loss_options"]["peak_pool"] == "features"
    assert "peak-pooled logits" not in cfg["training"]["loss"]
    assert cfg["training"]["loss_options"]["zero_init_residual"] is False  # an option
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


def test_zero_init_residual_is_an_option_wired_into_training(volume_index, tmp_path, monkeypatch):
    import retrieval.model.train as train_mod

    calls = []
    monkeypatch.setattr(train_mod, "zero_init_residuals", calls.append)
    _, manifest = volume_index
    out = tmp_path / "m"
    args = ["train", str(manifest), "--out", str(out), "--epochs", "1", "--width", "4"]
    assert main([*args, "--no-zero-init-residual"]) == 0
    assert calls == []
    training = json.loads((out / "config.json").read_text())["training"]
    assert training["loss_options"]["zero_init_residual"] is False
    assert main([*args, "--zero-init-residual"]) == 0
    assert len(calls) == 1 and isinstance(calls[0], train_mod.CaseNet)
    training = json.loads((out / "config.json").read_text())["training"]
    assert training["loss_options"]["zero_init_residual"] is True


def test_peak_pooling_of_both_features_and_logits_is_an_option(volume_index, tmp_path):
    _, manifest = volume_index
    out = tmp_path / "m"
    args = ["train", str(manifest), "--out", str(out), "--epochs", "1", "--width", "4"]
    assert main([*args, "--peak-pool", "both"]) == 0
    training = json.loads((out / "config.json").read_text())["training"]
    assert training["loss_options"]["peak_pool"] == "both"
    # one cross-entropy per pooling: each channel's top cells, each class's top logit cells
    assert training["loss"].count("peak-pooled") == 2 and "peak-pooled logits" in training["loss"]


def test_2d_only_features_say_so_in_one_line(volume_index, capsys):
    root, manifest = volume_index
    vol, _ = _test_volume(manifest)
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
            # the randomisation sanity check re-explains every case ~15 times per seed: its
            # volume path is tested in tests/retrieval/explain/test_volume_trust.py
            "--sanity-cases",
            "0",
        ]
    )
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    g = rep["methods"]["gradcam"]
    assert 0.0 <= g["pointing_game"] <= 1.0 and g["dimensions"] == 3 and g["n_cases"] >= 1
    lime = rep["methods"]["lime"]  # LIME on 3-D supervoxels is measured like any method
    assert lime["dimensions"] == 3 and lime["n_cases"] == g["n_cases"]
    for m in (g, lime):  # the deletion / insertion curves run on voxels for every method
        assert np.isfinite(m["deletion_auc"]) and np.isfinite(m["insertion_gain"])
        assert m["sanity_check"] == "not run"


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

    g = Geometry3D((20, 64, 32), 32, 8)  # D 20, H 64, W 32; grid 4 x 4 x 4 (strides 2, 8, 8)
    # cell spans: x [0, 4.5), [4.5, 12.5), [12.5, 20.5), [20.5, 32); y twice those;
    # z [0, 3.75), [3.75, 8.75), [8.75, 13.75), [13.75, 20)
    sel = refine.select_cells((0, 0, 0, 16, 32, 10), g, (4, 4, 4))
    assert sel.cells[:2, :2, :2].all() and sel.cells.sum() == 8 and sel.note == ""
    assert sel.searched == [0, 0, 0, 13, 25, 9]  # the eight cells' box
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


def _volume_input(vr, volume_index):
    import torch

    vol, _ = _test_volume(volume_index[1])
    q = vr.encode(str(vol))
    return q, q.tensor[None], torch.tensor([q.predicted])


@pytest.mark.parametrize("method", METHODS)
def test_every_method_maps_a_volume(vr, volume_index, method):
    """Every registry method runs on a volume model: a finite, non-constant map of the model
    input's (D', H', W') shape (the similarity map: the feature grid), no 2-D assumption.

    The predicted class first; on this one-epoch model a CAM map (a ReLU of the evidence at
    the cnn3d's CAM block) can be all zero for it, so another class may show the map."""
    import torch

    from retrieval.explain import registry

    q, x, target = _volume_input(vr, volume_index)
    want = tuple(q.features.shape[1:]) if method == "similarity" else tuple(x.shape[2:])
    others = [c for c in range(len(vr.classes)) if c != int(target[0])]
    for t in [target] + [torch.tensor([c]) for c in others]:
        attr = registry.get(method).attribute(vr.model, x, t)
        assert tuple(attr.shape[1:]) == want and torch.isfinite(attr).all()
        if float(attr.std()) > 0:
            break
    assert float(attr.std()) > 0


def test_gradcam_plus_plus_weights_sum_over_all_three_axes(vr, volume_index):
    """Grad-CAM++ on a volume: alpha = g^2 / (2 g^2 + sum_{d,h,w} A * g^3), computed here from
    autograd directly (the 2-D code summed over two of the three axes)."""
    import torch

    from retrieval.explain.methods.cam import GradCAMPlusPlus
    from retrieval.explain.registry import inference_model

    _, x, target = _volume_input(vr, volume_index)
    got = GradCAMPlusPlus(upsample=False).attribute(vr.model, x, target)
    model = inference_model(vr.model.eval())
    feats = {}
    handle = model.cam_layer.register_forward_hook(lambda m, i, o: feats.setdefault("a", o))
    with torch.enable_grad():
        score = model(x.clone().requires_grad_(True))[0, int(target[0])]
        (g,) = torch.autograd.grad(score, feats["a"])
    handle.remove()
    a = feats["a"].detach()
    alpha = torch.where(
        g != 0, g**2 / (2 * g**2 + a.sum(dim=(2, 3, 4), keepdim=True) * g**3 + 1e-6), 0.0
    )
    w = (alpha * g.clamp_min(0)).sum(dim=(2, 3, 4), keepdim=True)
    want = (w * a).sum(dim=1).clamp_min(0)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


def test_lime_on_a_volume_weights_supervoxels_and_deleting_the_top_ones_hurts_most(
    vr, volume_index
):
    import torch

    from retrieval.explain import registry

    _, x, target = _volume_input(vr, volume_index)
    lime = registry.get("lime")
    fmask = lime.feature_mask(vr.model, x)[0, 0]
    assert fmask.shape == x.shape[2:] and int(fmask.max()) >= 8  # 3-D SLIC supervoxels
    attr = lime.attribute(vr.model, x, target)[0]
    per_sv = {int(k): attr[fmask == k] for k in fmask.unique()}
    assert all(float(v.max() - v.min()) < 1e-6 for v in per_sv.values())  # one weight each
    weight = torch.tensor([float(per_sv[k][0]) for k in sorted(per_sv)])
    order = weight.argsort()
    k = max(1, len(order) // 5)
    model = vr.model.eval()

    def score_without(labels):
        keep = ~torch.isin(fmask, labels)
        with torch.no_grad():
            return float(model(x * keep)[0, int(target[0])])

    assert score_without(order[-k:]) < score_without(order[:k])


def test_lrp_head_relevance_on_a_volume_sums_to_the_explained_score(vr, volume_index):
    """The head's relevance over a (d, h, w) feature volume is exact: it sums to the class
    logit minus its bias, and for a similarity row to the similarity itself."""
    import torch

    from retrieval.explain.methods.relevance import head_relevance
    from retrieval.explain.registry import ScoreTarget

    _, x, target = _volume_input(vr, volume_index)
    model = vr.model.eval()
    with torch.no_grad():
        out = model.run(x, "saliency")
        dim = out.embedding.shape[1]
        rel = head_relevance(model, out.features, ScoreTarget.for_classes(target, dim))
        c = int(target[0])
        assert rel.shape == out.features.shape
        assert torch.allclose(rel.sum(), out.logits[0, c] - model.classifier.bias[c], atol=1e-4)
        other = torch.nn.functional.normalize(torch.randn(1, dim), dim=1)
        rel = head_relevance(model, out.features, ScoreTarget.for_similarity(other, "saliency"))
        assert torch.allclose(rel.sum(), (out.embedding * other).sum(), atol=1e-4)


def test_volumes_train_at_least_min_volume_epochs_by_default(volume_index, tmp_path, monkeypatch):
    """Without --epochs a volume model gets the floor (the sample budget alone would give a
    few hundred volumes fewer epochs than 300 get); the schedule is read where _fit starts."""
    import retrieval.model.train as train_mod

    class Planned(Exception):
        pass

    def fake_fit(cfg, data, *a, **k):
        raise Planned(data.epochs)

    monkeypatch.setattr(train_mod, "_fit", fake_fit)
    monkeypatch.setattr(train_mod, "SAMPLE_BUDGET", 1)  # the budget alone: the 8-epoch minimum
    _, manifest = volume_index
    with pytest.raises(Planned) as got:
        train_mod.train_model(manifest, tmp_path / "m", train_mod.TrainOptions(progress=False))
    assert got.value.args[0] == train_mod.MIN_VOLUME_EPOCHS
    with pytest.raises(Planned) as got:
        train_mod.train_model(
            manifest, tmp_path / "m2", train_mod.TrainOptions(epochs=3, progress=False)
        )
    assert got.value.args[0] == 3  # --epochs still decides
