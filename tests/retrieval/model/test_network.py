import numpy as np
import pytest
import torch

from retrieval.errors import BundleError
from retrieval.model.network import CaseNet, ModelConfig, load_model, save_model


def _model(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(classes=["a", "b", "c"], image_size=64, embedding_dim=16, **kw)
    return CaseNet(cfg).eval()


@pytest.mark.parametrize("backbone,channels", [("compact", 1), ("compact", 3), ("resnet18", 3)])
def test_run_shapes_and_unit_norm(backbone, channels):
    m = _model(backbone=backbone, in_channels=channels)
    out = m.run(torch.randn(2, channels, 64, 64))
    assert out.embedding.shape == (2, 16) and out.logits.shape == (2, 3)
    torch.testing.assert_close(out.embedding.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(out.weights.sum(dim=(1, 2)), torch.ones(2))


def test_closed_form_gradcam_equals_autograd_gradcam():
    m = _model()
    x = torch.randn(1, 1, 64, 64)
    feats = m.backbone(x)
    feats.retain_grad()
    logits = m.classifier(feats.mean(dim=(2, 3)))
    c = int(logits.argmax())
    logits[0, c].backward()
    alpha = feats.grad.mean(dim=(2, 3))  # Grad-CAM channel weights
    ref = torch.relu((alpha[:, :, None, None] * feats).sum(1))
    torch.testing.assert_close(
        m.gradcam(feats.detach(), torch.tensor([c])), ref.detach(), atol=1e-6, rtol=1e-5
    )


@pytest.mark.parametrize("backbone", ["compact", "resnet18"])
def test_image_models_take_grad_cam_at_the_last_block(backbone):
    """Only the cnn3d moves its CAM block; every 2-D backbone keeps the last one, where the
    registry's Grad-CAM equals the embedding's closed form."""
    m = _model(backbone=backbone, in_channels=3)
    assert m.cam_layer is m.target_layer is m.backbone.features[-1]


def test_uniform_weighting_is_plain_average_pooling():
    m = _model()
    x = torch.randn(2, 1, 64, 64)
    out = m.run(x, "uniform")
    ref = torch.nn.functional.normalize(m.projection(m.backbone(x).mean(dim=(2, 3))), dim=1)
    torch.testing.assert_close(out.embedding, ref, atol=1e-6, rtol=1e-5)


def test_save_load_roundtrip_is_exact_and_pickle_free(tmp_path):
    m = _model()
    save_model(m, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json",
        "weights.safetensors",
    ]
    back = load_model(tmp_path / "m")
    x = torch.randn(1, 1, 64, 64)
    np.testing.assert_allclose(
        back.run(x).embedding.detach(), m.run(x).embedding.detach(), atol=1e-6
    )


def test_corrupt_and_newer_models_are_refused(tmp_path):
    m = _model()
    save_model(m, tmp_path / "m")
    w = tmp_path / "m" / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(BundleError, match="weights.safetensors"):
        load_model(tmp_path / "m")
    save_model(m, tmp_path / "m2")
    cfg = tmp_path / "m2" / "config.json"
    cfg.write_text(cfg.read_text().replace('"format_version": 1', '"format_version": 99'))
    with pytest.raises(BundleError, match="version 99"):
        load_model(tmp_path / "m2")


def test_width_sets_the_compact_backbone_and_old_configs_load_at_32(tmp_path):
    m = _model(width=8)
    assert m.backbone.out_channels == 64 and m.classifier.in_features == 64
    feats = m.backbone(torch.randn(1, 1, 64, 64))
    assert feats.shape == (1, 64, 4, 4)
    # a model saved before the width option existed has no "width" in its config
    old = _model()
    save_model(old, tmp_path / "old")
    cfg = tmp_path / "old" / "config.json"
    import json

    data = json.loads(cfg.read_text())
    del data["width"]
    cfg.write_text(json.dumps(data))
    loaded = load_model(tmp_path / "old")
    assert loaded.config.width == 32 and loaded.backbone.out_channels == 256
    with pytest.raises(BundleError, match="width"):
        _model(width=2)
