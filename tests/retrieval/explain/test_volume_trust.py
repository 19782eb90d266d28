"""explain-eval on volumes (retrieval.explain.volume_trust): the 2-D measures of
retrieval.explain.trust on voxels: the 3-D blur and deletion / insertion curves, the map
similarities of the sanity check on 3-D maps, the randomisation sanity check with the 2-D
verdict rule, and the CLI on a tiny volume index (random-init cnn3d, 8 x 32 x 32)."""

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from retrieval.explain import registry, sanity, trust, volume_trust
from retrieval.jsonsafe import clean
from retrieval.model.network import CaseNet, ModelConfig, save_model
from retrieval.model.preprocess import Geometry3D

from .conftest import explain_eval_with_sanity

CLASSES = ["cavity", "mass", "nodule"]


def tiny_cnn3d(size: int = 16, depth: int = 8, seed: int = 0) -> CaseNet:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        classes=list(CLASSES),
        backbone="cnn3d",
        image_size=size,
        depth=depth,
        width=4,
        embedding_dim=8,
    )
    return CaseNet(cfg).eval()


# ---------------------------------------------------------------- blur and curves
def test_blurred_volume_is_a_3d_gaussian_and_images_keep_their_blur():
    g = torch.Generator().manual_seed(0)
    vol = torch.zeros(1, 8, 16, 16)
    vol[0, 4] = 1.0  # one bright slice: a 3-D blur spreads it to the next slices
    out = trust.blurred(vol)
    sigma = [max(0.5, n * trust.BLUR_FRACTION) for n in (8, 16, 16)]
    ref = ndimage.gaussian_filter(vol[0].numpy(), sigma, mode="nearest")
    np.testing.assert_allclose(out[0].numpy(), ref, atol=1e-6)
    assert float(out[0, 3].mean()) > 0.05 and float(out[0, 4].mean()) < 1.0
    # a batch of one volume (1, C, D, H, W) gives the same
    torch.testing.assert_close(trust.blurred(vol[None])[0], out)
    # an image (C, S, S): each channel blurred in plane with sigma = side / 16, as before
    img = torch.rand(3, 32, 32, generator=g)
    old = np.stack([ndimage.gaussian_filter(c, 2.0, mode="nearest") for c in img.numpy()])
    np.testing.assert_allclose(trust.blurred(img).numpy(), old, atol=1e-6)


def test_volume_deletion_curves_start_at_the_unperturbed_probability():
    model = tiny_cnn3d()
    fast = registry.inference_model(model)
    x = torch.randn(1, 8, 16, 16, generator=torch.Generator().manual_seed(1))
    base = trust.blurred(x)
    heat = np.random.default_rng(0).random((8, 16, 16))
    ranks = trust.pixel_order_ranks(heat, np.random.default_rng(1))
    with torch.no_grad():
        p = model(torch.stack([x, base])).softmax(1)
    cls = int(p[0].argmax())
    d, ins = trust.perturbation_curves(fast, x, cls, ranks, base)
    assert len(d) == len(ins) == trust.CURVE_STEPS + 1
    assert d[0] == pytest.approx(float(p[0, cls]), abs=1e-5)
    assert ins[-1] == pytest.approx(float(p[0, cls]), abs=1e-5)
    assert d[-1] == pytest.approx(float(p[1, cls]), abs=1e-5)
    assert ins[0] == pytest.approx(float(p[1, cls]), abs=1e-5)
    # step k: the k/16 of the voxels first in the map's order replaced by the blurred input
    k = 5
    hidden = torch.from_numpy(ranks < round(k * ranks.size / trust.CURVE_STEPS))
    with torch.no_grad():
        pk = model(torch.where(hidden[None], base, x)[None]).softmax(1)[0, cls]
    assert d[k] == pytest.approx(float(pk), abs=1e-5)


# ---------------------------------------------------------------- map similarity in 3-D
def test_map_similarity_on_3d_maps():
    rng = np.random.default_rng(0)
    a = ndimage.gaussian_filter(rng.random((8, 32, 32)), 1.0)
    same = sanity.map_similarity(a, a)
    assert all(v == pytest.approx(1.0) for v in same.values())
    flip = sanity.map_similarity(a, -a)
    assert flip["spearman"] == pytest.approx(-1.0) and flip["spearman_abs"] == pytest.approx(1.0)
    const = sanity.map_similarity(a, np.zeros_like(a))
    assert const["spearman"] == const["spearman_abs"] == const["hog"] == 0.0
    other = sanity.map_similarity(a, ndimage.gaussian_filter(rng.random((8, 32, 32)), 1.0))
    assert abs(other["spearman"]) < 0.2 and other["ssim"] < 0.5
    # HOG is 2-D: a volume's descriptor is the stack of its axial slices'
    np.testing.assert_array_equal(sanity._hog(a), np.concatenate([sanity._hog(s) for s in a]))
    # SSIM's window shrinks to fit a thin volume (scikit-image needs an odd size <= every side)
    thin = sanity.map_similarity(a[:4], rng.random((4, 32, 32)))
    assert all(np.isfinite(list(thin.values())))
    assert sanity._ssim_window((4, 32, 32)) == 3 and sanity._ssim_window((32, 32)) == 7


# ---------------------------------------------------------------- the sanity check on volumes
class _Intensity:
    """A 'method' that ignores the model: the input's voxel intensities."""

    name, expensive = "intensity", False

    def attribute(self, model, inputs, target):
        return inputs.detach()[:, 0].clone()


class _Empty:
    name, expensive = "empty", False

    def attribute(self, model, inputs, target):
        return torch.zeros(inputs.shape[0], *inputs.shape[2:])


def _volume_cases(n: int = 3):
    g = torch.Generator().manual_seed(2)
    cases = []
    for i in range(n):
        x = torch.randn(1, 8, 16, 16, generator=g)
        mask = np.zeros((10, 20, 20), bool)  # the original volume is larger than the input
        mask[3 + i : 6 + i, 5:10, 8:13] = True
        cases.append(
            {
                "x": x,
                "mask": mask,
                "geometry": Geometry3D((10, 20, 20), 16, 8),
                "neighbours": None,
                "label": CLASSES[i % 3],
            }
        )
    return cases


def test_volume_sanity_check_judges_maps_by_the_2d_rule():
    model = tiny_cnn3d()
    explainers = {"gradcam": registry.get("gradcam"), "intensity": _Intensity(), "empty": _Empty()}
    out = trust.evaluate_cases(
        model, _volume_cases(2), explainers, progress=False, sanity_cases=1, sanity_seeds=(0, 1)
    )
    labels = [label for label, _ in sanity.blocks(model)]
    assert labels[0] == "logits" and len(labels) == 1 + 7  # the heads + cnn3d's 7 blocks
    for name, m in out.items():
        s = m["sanity"]
        assert s["blocks"] == labels and s["seeds"] == [0, 1] and s["n_cases"] == 1
        for kind in ("cascading", "independent"):
            for metric in sanity.METRICS:
                assert len(s[kind][metric]) == len(labels)
                assert np.all(np.isfinite(s[kind][metric])), (name, kind, metric)
        assert m["sanity_check"] in ("pass", "fail")
        assert sanity.has_curves(m)
        assert m["deletion_gain"] == pytest.approx(m["deletion_auc_random"] - m["deletion_auc"])
        assert m["insertion_gain"] == pytest.approx(m["insertion_auc"] - m["insertion_auc_random"])
        assert m["faithfulness"] in ("faithful", "not faithful on this data")
        assert m["n_cases"] == 2 and m["max_sensitivity_n_cases"] == 1
        json.dumps(clean(m), allow_nan=False)
    # a map that ignores the model keeps its rank order whatever is randomised: it fails
    blind = out["intensity"]
    assert blind["sanity_check"] == "fail" and "FAILS" in blind["summary"]
    assert blind["sanity"]["cascading"]["spearman_abs"] == pytest.approx([1.0] * len(labels))
    assert blind["randomization_spearman"] == pytest.approx(1.0)
    assert blind["randomization_ssim"] == pytest.approx(1.0)
    assert blind["max_sensitivity"] > 0  # noise on the input moves an intensity map
    # a constant map cannot be checked and cannot explain: it fails too
    assert out["empty"]["sanity_check"] == "fail"
    assert "constant" in out["empty"]["sanity"]["reason"]
    # Grad-CAM of the (random-init) model depends on its weights
    assert out["gradcam"]["randomization_spearman_abs"] < 0.99
    assert np.isfinite(out["gradcam"]["deletion_auc"])


# ---------------------------------------------------------------- the CLI on a volume index
@pytest.fixture(scope="module")
def volume_index(tmp_path_factory):
    from index.builder import build_index
    from retrieval.data.phantom3d import make_phantom3d

    root = tmp_path_factory.mktemp("vol_trust")
    make_phantom3d(root / "ph", n=12, size=32, depth=8, seed=3)
    save_model(tiny_cnn3d(size=32, depth=8), root / "model")
    build_index(
        root / "model",
        root / "ph" / "manifest.csv",
        root / "index",
        device="cpu",
        progress=False,
        num_workers=0,
    )
    return root / "index", root / "ph" / "manifest.csv"


def test_volume_explain_eval_runs_the_sanity_check_and_the_curves(volume_index, tmp_path, capsys):
    index, manifest = volume_index
    png = tmp_path / "sanity.png"
    rep = explain_eval_with_sanity(index, manifest, "gradcam", png, capsys)
    g = rep["methods"]["gradcam"]
    assert g["dimensions"] == 3 and g["n_cases"] == 2 and g["not_measured"] == ""
    assert g["sanity_check"] in ("pass", "fail")
    s = g["sanity"]
    assert len(s["blocks"]) == 8 and s["seeds"] == [0] and s["n_cases"] == 1
    assert all(np.isfinite(s["cascading"]["spearman_abs"]))
    for key in (
        "randomization_spearman",
        "randomization_ssim",
        "deletion_auc",
        "deletion_auc_random",
        "insertion_auc",
        "deletion_gain",
        "insertion_gain",
        "max_sensitivity",
    ):
        assert np.isfinite(g[key]), key
    assert g["faithfulness"] in ("faithful", "not faithful on this data")
    assert "volumes" in g["summary"] and "sanity check" in g["summary"]
    assert rep["settings"]["dimensions"] == 3 and rep["settings"]["sanity_seeds"] == [0]
    assert rep["settings"]["sanity_cases"] == 1 and rep["not_measured"] == ""
    assert rep["settings"]["cam_layer"] == "backbone.features.4"  # the cnn3d's CAM block
    assert rep["neighbour_tests"]["identical_class"]["verdict"] in ("pass", "fail")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_volume_explain_eval_without_sanity_cases_says_not_run(volume_index):
    from retrieval.service.retriever import CaseRetriever

    index, manifest = volume_index
    r = CaseRetriever.load(index, device="cpu")
    rep = volume_trust.evaluate(
        r, manifest, methods=["similarity"], max_cases=1, progress=False, sanity_cases=0
    )
    m = rep["methods"]["similarity"]
    assert m["sanity_check"] == "not run" and m["sanity"] == {}
    assert "sanity check not run" in m["summary"] and "FAILS" not in m["summary"]
    assert m["curve_score"] == "similarity to the neighbours" and np.isfinite(m["deletion_auc"])
    assert volume_trust.DEFAULT_METHODS and "occlusion" not in volume_trust.DEFAULT_METHODS
