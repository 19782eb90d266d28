"""The J. Imaging 2020 review's methods: finite, image-sized, non-empty maps for class and
similarity targets on grayscale DICOM and RGB phantoms; the glue checked against references
(pytorch-grad-cam's Grad-CAM++, DeepLIFT's summation-to-delta, zennit's own ResNet canonizer)."""

import numpy as np
import pytest
import torch
from torch import nn

from retrieval.errors import CasebaseError
from retrieval.explain import registry
from retrieval.explain.methods import FAMILIES, cam, relevance, shapley
from retrieval.explain.methods.canonical import canonical_model
from retrieval.explain.registry import ScoreHead, ScoreTarget

from .conftest import tiny_model

NEW = [
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


@pytest.fixture
def cheap(monkeypatch):
    for e in (
        shapley.KernelShap(samples=24, segments=8),
        shapley.DeepLiftShap(baselines=3),
        shapley.GradientShap(samples=4),
    ):
        monkeypatch.setitem(registry.REGISTRY, e.name, e)


def _mixed_target(model, x):
    """Row 0: a class logit; rows 1, 2: similarity to the other image."""
    with torch.no_grad():
        e = model.run(x).embedding
    d = e.shape[1]
    return ScoreTarget(torch.tensor([1, -1, -1]), torch.stack([torch.zeros(d), e[2], e[0]]))


def test_every_method_is_in_one_family():
    grouped = [m for names in FAMILIES.values() for m in names]
    assert sorted(grouped) == sorted(registry.METHODS) and len(set(grouped)) == len(grouped)


@pytest.mark.parametrize("backbone", ["compact", "resnet18"])
def test_canonical_model_is_the_same_function_with_hookable_relus(backbone):
    model = tiny_model(backbone=backbone)
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    canon = canonical_model(model)
    assert canon is canonical_model(model)  # cached
    with torch.no_grad():
        a, b = model.run(x), canon.run(x)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a.embedding, b.embedding, atol=1e-5, rtol=1e-4)
    relus = [m for m in canon.modules() if isinstance(m, nn.ReLU)]
    assert relus and not any(m.inplace for m in relus)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in canon.modules())
    # every ReLU module runs exactly once per forward (captum's DeepLIFT needs that)
    counts = {id(m): 0 for m in relus}
    hooks = [
        m.register_forward_hook(lambda m, i, o: counts.__setitem__(id(m), counts[id(m)] + 1))
        for m in relus
    ]
    with torch.no_grad():
        canon(x[:1])
    for h in hooks:
        h.remove()
    assert set(counts.values()) == {1}
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))  # original untouched


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", NEW)
def test_new_methods_give_finite_non_constant_maps_for_class_and_similarity(name, channels, cheap):
    model = tiny_model(in_channels=channels, mean=[0.5] * channels, std=[0.25] * channels)
    x = torch.randn(3, channels, 32, 32, generator=torch.Generator().manual_seed(channels))
    maps = registry.get(name).attribute(model, x, _mixed_target(model, x))
    assert maps.shape == (3, 32, 32) and torch.isfinite(maps).all()
    for m in maps:
        assert float(m.max() - m.min()) > 0, f"{name}: constant map"


@pytest.mark.parametrize("name", NEW)
def test_new_methods_in_a_query_on_dicom_and_rgb_phantoms(name, retriever, rgb_retriever, cheap):
    for r in (retriever, rgb_retriever):
        path = r.cases.iloc[0]["image"]
        res = r.query(path, k=2, explain=[name])
        m = res.maps[name]
        assert m.dtype == np.float32 and np.isfinite(m).all() and np.ptp(m) > 0
        nb = res.neighbors[0].maps[name]
        for side, arr in nb.items():
            assert np.isfinite(arr).all(), (name, side)
            if np.ptp(arr) == 0 and name == "guided_gradcam":
                # guided Grad-CAM = guided backprop x Grad-CAM: on a random-init model the
                # ReLU'd Grad-CAM of a similarity can be zero everywhere (every cell lowers
                # it; seen on one CPU, not another); then, and only then, so is the product
                cam = r.query(path, k=2, explain=["gradcam"]).neighbors[0].maps["gradcam"][side]
                assert np.ptp(cam) == 0 and float(np.abs(cam).max()) == 0.0, (name, side)
                continue
            assert np.ptp(arr) > 0, (name, side)
        assert nb["case"].shape == tuple(res.neighbors[0].original_size)


def test_gradcam_plus_plus_matches_pytorch_grad_cam():
    from pytorch_grad_cam import GradCAMPlusPlus
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = tiny_model(image_size=64)
    x = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    classes = [0, 1, 2]
    with GradCAMPlusPlus(model=model, target_layers=[model.target_layer]) as ref:
        theirs = ref(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])
    ours = cam.GradCAMPlusPlus(upsample=False).attribute(model, x, classes).numpy()
    ours = scale_cam_image(scale_cam_image(np.maximum(ours, 0), (64, 64)))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_deeplift_sums_to_the_class_logit_difference():
    model = tiny_model()
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    maps = registry.get("deeplift").attribute(model, x, [0, 2])
    with torch.no_grad():
        delta = model(x)[[0, 1], [0, 2]] - model(torch.zeros_like(x))[[0, 1], [0, 2]]
    torch.testing.assert_close(maps.sum((1, 2)), delta, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("extent", [False, True])
def test_lrp_head_relevance_sums_to_the_explained_score(extent):
    from retrieval.model import extent as ext

    kw = {"extent_weight": 1.0, "extent_knots": ext.fit_knots(np.linspace(0, 0.2, 40))}
    model = tiny_model(**(kw if extent else {}))
    x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    t = _mixed_target(model, x)
    with torch.no_grad():
        out = model.run(x)
        rel = relevance.head_relevance(model, out.features, t)
        score = ScoreHead(model)(x, t.classes, t.others)
    expected = score.clone()
    expected[0] -= model.classifier.bias[1]
    torch.testing.assert_close(rel.sum((1, 2, 3)), expected, atol=1e-5, rtol=1e-4)


def test_lrp_equals_zennits_own_resnet_canonizer_on_a_resnet18_backbone():
    """Our canonical copy + composite = zennit's ResNetCanonizer on the unfolded model."""
    from zennit.composites import EpsilonPlusFlat
    from zennit.torchvision import ResNetCanonizer

    model = tiny_model(backbone="resnet18")
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(4))
    t = ScoreTarget.for_classes([0, 1], 16)
    ours = registry.get("lrp").attribute(model, x, t)

    ref = ResNetCanonizer()
    composite = EpsilonPlusFlat(epsilon=1e-6, canonizers=[ref])
    xr = x.clone().requires_grad_(True)
    with composite.context(model.backbone):
        feats = model.backbone(xr)
        rel = relevance.head_relevance(model, feats.detach(), t)
        (grad,) = torch.autograd.grad(feats, xr, grad_outputs=rel)
    torch.testing.assert_close(ours, grad.sum(1), atol=1e-6, rtol=1e-3)


@pytest.mark.parametrize("name", ["guided_backprop", "deeplift", "lrp", "guided_gradcam"])
def test_hook_methods_need_a_class_or_similarity_target(name):
    model = tiny_model()
    with pytest.raises(CasebaseError):
        registry.get(name).attribute(model, torch.randn(1, 1, 32, 32), lambda t: model(t)[:, 0])
