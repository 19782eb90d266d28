import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from retrieval.errors import CasebaseError
from retrieval.explain import registry, trust
from retrieval.model.network import BACKBONES, CaseNet, ModelConfig, _conv_bn
from retrieval.model.preprocess import Geometry

from .conftest import tiny_model

SIZE = 32


# ---------------------------------------------------------------- synthetic data
def blob_images(n: int, seed: int = 0):
    """Textured background + one disc, bright (label 0) or dark (label 1). Masks = the disc."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    xs, ys, masks = [], [], []
    for i in range(n):
        label = i % 2
        cx, cy = rng.integers(5, 27, size=2)
        r = rng.uniform(2.5, 4.0)
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2) <= r**2
        img = (
            0.5
            + 0.15 * ndimage.gaussian_filter(rng.standard_normal((SIZE, SIZE)), 1.5)
            + (0.35 - 0.7 * label) * blob
        )
        xs.append((np.clip(img, 0, 1) - 0.5) / 0.25)
        ys.append(label)
        masks.append(blob)
    return torch.tensor(np.stack(xs), dtype=torch.float32)[:, None], torch.tensor(ys), masks


class MiniBackbone(torch.nn.Module):
    """Three small conv blocks, stride 4 (an 8 x 8 map at 32 px): trains in about a second."""

    out_channels, stride = 16, 4

    def __init__(self, in_channels: int, width: int | None = None):  # width: unused
        super().__init__()
        self.features = torch.nn.Sequential(
            _conv_bn(in_channels, 8, 2), _conv_bn(8, 16, 2), _conv_bn(16, 16)
        )

    def forward(self, x):
        return self.features(x)


@pytest.fixture(scope="module")
def trained():
    """A CaseNet (with a small backbone) that has learnt where the blob is."""
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(BACKBONES, "mini", MiniBackbone)
        model = CaseNet(
            ModelConfig(
                classes=["bright", "dark"], backbone="mini", image_size=SIZE, embedding_dim=16
            )
        )
    x, y, _ = blob_images(256, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(30):
        idx = torch.randint(0, len(x), (32,), generator=torch.Generator().manual_seed(step))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    xt, yt, masks = blob_images(24, seed=2)
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    assert acc > 0.9, f"the tiny model did not learn the task (accuracy {acc:.2f})"
    cases = [
        {"x": xt[i], "mask": masks[i], "geometry": Geometry((SIZE, SIZE), SIZE), "neighbours": None}
        for i in range(12)
    ]
    return model, cases


class EdgeDetector:
    """A 'method' that ignores the model: the Sobel gradient magnitude of the image."""

    name, expensive = "edges", False

    def attribute(self, model, inputs, target):
        img = inputs.detach().numpy()[:, 0]
        return torch.tensor(
            np.stack([np.hypot(ndimage.sobel(i, 0), ndimage.sobel(i, 1)) for i in img])
        )


# ---------------------------------------------------------------- scores
def test_a_map_equal_to_the_mask_scores_perfectly_and_a_random_map_does_not():
    rng = np.random.default_rng(0)
    mask = np.zeros((120, 90), bool)
    mask[30:50, 20:45] = True
    heat = mask.astype(np.float32)
    assert trust.pointing_game(heat, mask) == 1.0
    assert trust.pointing_game(heat, mask, (3, 3)) == 1.0
    assert trust.mask_energy(heat, mask) == 1.0
    pg, energy = [], []
    for _ in range(200):
        noise = rng.random(mask.shape)
        pg.append(trust.pointing_game(noise, mask))
        energy.append(trust.mask_energy(noise, mask))
    area = mask.mean()
    assert np.mean(pg) < 0.2 and abs(np.mean(energy) - area) < 0.01
    # the tolerance: a peak one pixel outside the lesion hits only with tolerance
    off = np.zeros(mask.shape)
    off[29, 30] = 1.0
    assert trust.pointing_game(off, mask) == 0.0 and trust.pointing_game(off, mask, (1, 1)) == 1.0
    # tied maxima score the share that hits; a map without positive mass has no energy inside
    flat = np.zeros(mask.shape)
    assert trust.pointing_game(flat, mask) == pytest.approx(area)
    assert trust.mask_energy(-np.ones(mask.shape), mask) == 0.0


def test_deletion_and_insertion_reward_the_true_evidence():
    """A 'model' whose logit is the mean of the top-left quadrant: its true map beats random."""

    class Quadrant(torch.nn.Module):
        def forward(self, x):
            q = x[:, :, :16, :16].mean(dim=(1, 2, 3))
            return torch.stack([q, -q], 1)

    x = torch.full((1, SIZE, SIZE), 1.0)
    base = torch.zeros_like(x)
    truth = np.zeros((SIZE, SIZE))
    truth[:16, :16] = 1.0
    rng = np.random.default_rng(0)
    d, i = trust.perturbation_curves(Quadrant(), x, 0, trust.pixel_order_ranks(truth, rng), base)
    dr, ir = trust.perturbation_curves(
        Quadrant(), x, 0, trust.pixel_order_ranks(rng.random((SIZE, SIZE)), rng), base
    )
    assert len(d) == trust.CURVE_STEPS + 1 and d[0] == pytest.approx(i[-1])
    assert trust.auc(d) < trust.auc(dr) - 0.1
    assert trust.auc(i) > trust.auc(ir) + 0.1
    assert trust.auc([1.0] * 17) == pytest.approx(1.0) and trust.auc(
        np.linspace(1, 0, 17)
    ) == pytest.approx(0.5)


def test_randomized_copy_reinitialises_every_layer_and_leaves_the_model_alone():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rnd = trust.randomized_copy(model, seed=3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    changed = [
        k
        for k, v in rnd.state_dict().items()
        if v.is_floating_point() and not torch.equal(v, before[k])
    ]
    weights = [k for k in before if k.endswith("weight")]
    assert set(weights) <= set(changed)
    again = trust.randomized_copy(model, seed=3)
    for k, v in rnd.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])  # seeded


def test_sanity_check_fails_a_model_blind_method_and_passes_gradcam(trained):
    model, cases = trained
    explainers = {"gradcam": registry.get("gradcam"), "edges": EdgeDetector()}
    out = trust.evaluate_cases(model, cases, explainers, progress=False)
    edges, cam = out["edges"], out["gradcam"]
    assert edges["randomization_spearman"] == pytest.approx(1.0)
    assert edges["randomization_ssim"] == pytest.approx(1.0)
    assert edges["sanity_check"] == "fail" and "FAILS" in edges["summary"]
    assert cam["sanity_check"] == "pass", cam
    assert (
        abs(cam["randomization_spearman"]) < 0.5
        and cam["randomization_ssim"] < edges["randomization_ssim"]
    )
    # the trained model's Grad-CAM finds the blob and beats random deletion / insertion
    assert cam["pointing_game"] >= 0.6 and cam["mask_energy"] > 3 * cam["mask_area"]
    assert cam["deletion_auc"] < cam["deletion_auc_random"]
    assert cam["insertion_auc"] > cam["insertion_auc_random"]
    for m in out.values():
        assert m["n_cases"] == len(cases) and m["seconds_per_map"] >= 0
        json.dumps(m, allow_nan=False)
    # the per-block curves (logits + three conv blocks), three seeds, four cases
    curves = cam["sanity"]
    assert curves["blocks"] == ["logits", "block 2", "block 1", "block 0"]
    assert curves["seeds"] == [0, 1, 2] and curves["n_cases"] == 4
    for kind in ("cascading", "independent"):
        for metric in ("spearman_abs", "spearman", "ssim", "hog"):
            assert len(curves[kind][metric]) == 4
    assert edges["sanity"]["cascading"]["spearman_abs"] == pytest.approx([1.0] * 4)
    # Grad-CAM beats a random deletion order with a CI that excludes it; the edge map does not
    assert cam["faithfulness"] == "faithful" and cam["deletion_gain_ci95"][0] > 0
    assert "12 cases" in cam["summary"]


def test_evaluate_on_an_index_reports_every_requested_method(retriever, phantom_dir):
    report = trust.evaluate(
        retriever,
        phantom_dir / "manifest.csv",
        "test",
        ["gradcam", "similarity"],
        max_cases=2,
        progress=False,
        sanity_cases=1,
        sanity_seeds=(0,),
    )
    assert report["split"] == "test" and report["n_cases"] == 2
    last = len(retriever.model.backbone.features) - 1
    assert report["settings"]["cam_layer"] == f"backbone.features.{last}"  # 2-D: the last block
    keys = {
        "pointing_game",
        "pointing_game_strict",
        "mask_energy",
        "mask_area",
        "deletion_auc",
        "deletion_auc_random",
        "insertion_auc",
        "insertion_auc_random",
        "randomization_spearman",
        "randomization_ssim",
        "sanity_check",
        "n_cases",
        "seconds_per_map",
        "summary",
        "by_label",
    }
    assert set(report["methods"]) == {"gradcam", "similarity"}
    for m in report["methods"].values():
        assert keys <= set(m)
        assert sum(v["n"] for v in m["by_label"].values()) == 2
        assert 0 <= m["pointing_game_strict"] <= m["pointing_game"] <= 1
        assert 0 < m["mask_area"] < 1 and m["sanity_check"] in ("pass", "fail")
    table = trust.format_table(report)
    assert "gradcam" in table and "similarity" in table and "pointing game" in table
    # how much of the similarity lies in lesion x lesion cell pairs (phantom cases all have masks)
    lesion = report["similarity_lesion_share"]
    assert lesion["n_pairs"] >= 2 and lesion["n_queries"] == 2
    assert 0 < lesion["median_chance"] < 1 and np.isfinite(lesion["median_share"])
    assert report["methods"]["similarity"]["lesion_x_lesion_share"] == lesion["median_share"]
    assert "lesion x lesion" in table
    json.dumps(report, allow_nan=False)


def test_identical_subclass_reads_a_column_the_index_lacks(retriever, phantom_dir, tmp_path):
    """Hanawa et al.'s identical-subclass test on a subclass column added to the manifest after
    the index was built: the neighbours' values come from the manifest, so the chance rate is
    that of the real pool (not 0 against empty strings), and a column no one has is an error."""
    import pandas as pd

    df = pd.read_csv(phantom_dir / "manifest.csv", dtype=str, keep_default_na=False)
    size = pd.to_numeric(df["lesion_size"])
    df["size_class"] = (size > size.groupby(df["label"]).transform("median")).map(
        {True: "large", False: "small"}
    )
    df["image"] = [str(phantom_dir / p) for p in df["image"]]
    df["mask"] = [str(phantom_dir / p) if p else "" for p in df["mask"]]
    man = tmp_path / "manifest.csv"
    df.to_csv(man, index=False)
    kw = dict(max_cases=4, progress=False, sanity_cases=0, sanity_seeds=(0,))
    report = trust.evaluate(retriever, man, "test", ["gradcam"], subclass="size_class", **kw)
    sub = report["neighbour_tests"]["identical_subclass"]
    assert sub["n"] >= 1 and 0 < sub["chance"] < 1 and 0 <= sub["rate"] <= 1
    assert sub["verdict"] == ("pass" if sub["p_value"] < 0.05 else "fail")
    assert sub["verdict"] == "fail" or sub["rate"] > sub["chance"]
    with pytest.raises(CasebaseError, match="no_such_column"):
        trust.evaluate(retriever, man, "test", ["gradcam"], subclass="no_such_column", **kw)
