import numpy as np
import pytest
import torch
from scipy import ndimage

from retrieval.errors import CasebaseError
from retrieval.explain import explain_query, registry
from retrieval.explain.registry import Explainer, ScoreTarget

from .conftest import tiny_model

CONTRACT = [
    "gradcam",
    "gradient",
    "smoothgrad",
    "integrated_gradients",
    "occlusion",
    "lime",
    "similarity",
    "input_x_gradient",
    "guided_backprop",
    "deconvolution",
    "guided_gradcam",
    "gradcam_plus_plus",
    "deeplift",
    "deeplift_shap",
    "gradient_shap",
    "kernel_shap",
    "lrp",
]


def test_registry_holds_exactly_the_contract_names():
    assert list(registry.METHODS) == CONTRACT
    assert set(registry.REGISTRY) == set(CONTRACT)
    assert registry.EXPENSIVE == {
        "lime",
        "occlusion",
        "integrated_gradients",
        "smoothgrad",
        "deeplift_shap",
        "gradient_shap",
        "kernel_shap",
    }
    assert callable(explain_query)


@pytest.mark.parametrize("name", CONTRACT)
def test_every_explainer_follows_the_protocol(name):
    e = registry.get(name)
    assert isinstance(e, Explainer)
    assert e.name == name


def test_check_names_accepts_valid_and_lists_choices_for_unknown():
    assert registry.check_names(["gradcam", "lime"]) == ["gradcam", "lime"]
    with pytest.raises(CasebaseError) as err:
        registry.check_names(["gradcam", "grad-cam", "shap"])
    msg = str(err.value)
    assert "'grad-cam'" in msg and "'shap'" in msg
    for name in CONTRACT:
        assert name in msg
    with pytest.raises(CasebaseError):
        registry.get("saliency")


def test_targets_int_sequence_tensor_and_score_target_agree():
    model = tiny_model()
    x = torch.randn(2, 1, 32, 32)
    g = registry.get("gradient")
    a = g.attribute(model, x, 1)
    b = g.attribute(model, x, [1, 1])
    c = g.attribute(model, x, torch.tensor([1, 1]))
    d = g.attribute(model, x, ScoreTarget.for_classes([1, 1], 16))
    for other in (b, c, d):
        torch.testing.assert_close(a, other)
    # a plain score function is accepted too (captum's target=None on a (B,) output)
    e = g.attribute(model, x, lambda t: model(t)[:, 1])
    torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-4)


def test_inference_model_is_the_same_function_and_tracks_weight_changes():
    model = tiny_model()
    x = torch.randn(3, 1, 32, 32)
    fused = registry.inference_model(model)
    assert fused is not model and registry.inference_model(model) is fused  # cached
    with torch.no_grad():
        a, b = model.run(x), fused.run(x)
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.embedding, b.embedding, atol=1e-5, rtol=1e-4)
        model.classifier.weight.mul_(2.0)  # in-place change: the cache must notice
    assert registry.inference_model(model) is not fused
    model.train()
    assert registry.inference_model(model) is model


def test_shared_forward_replays_only_identical_perturbations():
    model = tiny_model()
    calls = []
    orig = model.run

    def counting(x, weighting="saliency"):
        calls.append(len(x))
        return orig(x, weighting)

    model.run = counting
    with torch.no_grad():
        emb = orig(torch.randn(2, 1, 32, 32)).embedding
    shared = registry.SharedForward(model, "saliency", torch.tensor([0, -1]), emb)
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        first = shared.select(0)(x)
        second = shared.select(1)(x)  # replayed: no new forward
        assert calls == [4]
        third = shared.select(1)(x + 1)  # different input: computed afresh
        assert calls == [4, 4]
        ref = orig(x)
    torch.testing.assert_close(first, ref.logits[:, 0])
    torch.testing.assert_close(second, ref.embedding @ emb[1])
    assert not torch.equal(third, second)


@pytest.mark.parametrize("channels", [1, 3])
def test_superpixels_for_gray_and_colour_images(channels):
    rng = np.random.default_rng(0)
    img = ndimage.gaussian_filter(rng.random((64, 48, channels)), (3, 3, 0))
    labels = registry.superpixels(img, n_segments=20)
    assert labels.shape == (64, 48) and labels.min() == 0
    assert set(np.unique(labels)) == set(range(labels.max() + 1))  # contiguous, as captum needs
    assert 5 <= labels.max() + 1 <= 60


def test_lime_on_an_rgb_model_uses_one_mask_for_all_channels():
    model = tiny_model(in_channels=3, mean=[0.5] * 3, std=[0.25] * 3)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    lime = registry.Lime(samples=12, segments=6)
    fmask = lime.feature_mask(model, x)
    assert fmask.shape == (1, 1, 32, 32)
    heat = lime.attribute(model, x, 0)
    assert heat.shape == (1, 32, 32) and torch.isfinite(heat).all()
    # piecewise constant on superpixels
    for k in fmask.unique():
        vals = heat[0][fmask[0, 0] == k]
        assert torch.allclose(vals, vals[0].expand_as(vals))


@pytest.mark.parametrize("name", ["gradcam", "gradient", "occlusion", "similarity", "lrp"])
def test_a_reference_class_makes_every_method_explain_the_logit_difference(name):
    """With model.explain_reference set, a class row explains logit(c) - logit(ref) (the same
    map as a score function computing that difference), the reference's own row its logit, and
    clearing the reference restores the plain maps (the fused copy is cached: it must follow)."""
    model = tiny_model()
    x = torch.randn(2, 1, 32, 32)
    ex = registry.get(name)
    plain = ex.attribute(model, x, ScoreTarget.for_classes([1, 1], 16))
    model.explain_reference = 0
    try:
        contrast = ex.attribute(model, x, ScoreTarget.for_classes([1, 1], 16))
        assert float((contrast - plain).abs().max()) > 1e-3 * float(plain.abs().max())
        if name in ("gradcam", "gradient", "occlusion"):  # captum on a score function
            fused = registry.inference_model(model)  # Grad-CAM hooks the fused copy's layer
            fn = ex.attribute(model, x, lambda t: fused(t)[:, 1] - fused(t)[:, 0])
            torch.testing.assert_close(contrast, fn, atol=1e-5, rtol=1e-4)
        # the reference class itself is explained by its own score, not by zero
        own = ex.attribute(model, x, ScoreTarget.for_classes([0, 0], 16))
        assert float(own.abs().sum()) > 0
    finally:
        model.explain_reference = None
    torch.testing.assert_close(ex.attribute(model, x, ScoreTarget.for_classes([1, 1], 16)), plain)
