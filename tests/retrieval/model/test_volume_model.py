"""The 3-D backbone (cnn3d): shapes, the Grad-CAM weight identity, preprocessing of volumes."""

import numpy as np
import pytest
import torch

from retrieval.errors import BundleError, CasebaseError
from retrieval.model.augment import augment_volume_batch
from retrieval.model.network import CaseNet, ModelConfig, load_model, save_model
from retrieval.model.preprocess import Geometry3D, Preprocessor
from retrieval.model.train import TrainOptions, default_volume_size, resolve_backbone


def _model(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(
        classes=["a", "b", "c"],
        backbone="cnn3d",
        image_size=16,
        depth=8,
        width=4,
        embedding_dim=8,
        **kw,
    )
    return CaseNet(cfg).eval()


def test_cnn3d_shapes_unit_norm_and_weights():
    m = _model()
    out = m.run(torch.randn(2, 1, 8, 16, 16))
    assert out.features.shape == (2, 32, 1, 2, 2)  # stride 8, width 4 -> 8w channels
    assert out.weights.shape == (2, 1, 2, 2)
    assert out.embedding.shape == (2, 8) and out.logits.shape == (2, 3)
    torch.testing.assert_close(out.embedding.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(out.weights.sum(dim=(1, 2, 3)), torch.ones(2))


def test_cnn3d_gradcam_weights_are_exactly_w_over_dhw():
    m = _model()
    x = torch.randn(1, 1, 16, 32, 32)
    feats = m.backbone(x)
    feats.retain_grad()
    logits = m.classifier(feats.mean(dim=(2, 3, 4)))
    c = int(logits.argmax())
    logits[0, c].backward()
    alpha = feats.grad.mean(dim=(2, 3, 4))
    d, h, w = feats.shape[2:]
    torch.testing.assert_close(
        feats.grad[0, :, 0, 0, 0], m.classifier.weight[c].detach() / (d * h * w)
    )
    ref = torch.relu((alpha[:, :, None, None, None] * feats).sum(1))
    got = m.gradcam(feats.detach(), torch.tensor([c]))
    torch.testing.assert_close(got, ref.detach(), atol=1e-6, rtol=1e-5)


def test_cnn3d_captum_gradcam_matches_closed_form():
    from retrieval.explain import registry

    m = _model()
    x = torch.randn(1, 1, 8, 16, 16)
    out = m.run(x)
    c = int(out.predicted[0])
    last = len(m.backbone.features) - 1
    cam = registry.GradCAM(upsample=False, layer=last).attribute(m, x, c)
    torch.testing.assert_close(cam, m.gradcam(out.features, out.predicted), atol=1e-5, rtol=1e-4)
    up = registry.get("gradcam").attribute(m, x, c)
    assert up.shape == (1, 8, 16, 16)


def test_cnn3d_cam_explainers_look_where_the_stride_8_grid_starts():
    """Grad-CAM of a volume model is taken at features.4 (bench/volume_cam_layer.py), on the
    same feature-volume grid as the last block, not at the last block."""
    from captum.attr import LayerGradCam

    from retrieval.explain import registry

    m = _model()
    assert m.cam_index == 4 and m.cam_layer is m.backbone.features[4]
    assert m.cam_index != len(m.backbone.features) - 1
    x = torch.randn(1, 1, 8, 16, 16)
    c = int(m.run(x).predicted[0])
    cam = registry.GradCAM(upsample=False).attribute(m, x, c)
    ref = LayerGradCam(m, m.backbone.features[4]).attribute(x, target=c, relu_attributions=True)
    assert cam.shape == (1, 1, 2, 2)  # the feature volume's grid
    torch.testing.assert_close(cam, ref[:, 0].detach(), atol=1e-5, rtol=1e-4)
    last = m.gradcam(m.run(x).features, torch.tensor([c]))
    assert not torch.allclose(cam, last, atol=1e-4)  # a different map from the last block's


def test_cnn3d_save_load_roundtrip(tmp_path):
    m = _model()
    save_model(m, tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert back.config.depth == 8 and back.config.backbone == "cnn3d"
    x = torch.randn(1, 1, 8, 16, 16)
    np.testing.assert_allclose(
        back.run(x).embedding.detach(), m.run(x).embedding.detach(), atol=1e-6
    )


def test_depth_must_match_the_backbone():
    with pytest.raises(BundleError, match="depth"):
        CaseNet(ModelConfig(classes=["a", "b"], backbone="cnn3d", depth=0))
    with pytest.raises(BundleError, match="depth"):
        CaseNet(ModelConfig(classes=["a", "b"], backbone="compact", depth=8))


def test_preprocessor_reads_and_resizes_volumes(tmp_path):
    vol = np.random.default_rng(0).random((12, 20, 24)).astype(np.float32)
    p = tmp_path / "v.npy"
    np.save(p, vol)
    pre = Preprocessor(_model().config)
    image, tensor, geo = pre.load(str(p))
    assert image.original_size == (12, 20, 24) and image.pixels.shape == (12, 20, 24, 1)
    assert tensor.shape == (1, 8, 16, 16)
    assert isinstance(geo, Geometry3D)
    box = geo.cell_box(0, 1, 1, (1, 2, 2))
    # cell 1 of 2 (stride 8) is centred on input px 8 and spans [4.5, 16): x 6.75-24, y 5.6-20
    assert box == [6, 5, 0, 24, 20, 12]
    heat = geo.map_to_original(np.ones((1, 2, 2), np.float32))
    assert heat.shape == (12, 20, 24)
    # a 2-D image given to a volume model: one clear line
    from PIL import Image

    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "x.png")
    with pytest.raises(CasebaseError, match="volume"):
        pre.load(str(tmp_path / "x.png"))


def test_volume_augmentation_keeps_shape_and_range():
    x = torch.rand(3, 1, 8, 16, 16)
    y = augment_volume_batch(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1


def test_volume_size_rule_and_auto_backbone(tmp_path):
    assert default_volume_size(32, 64) == (32, 64)
    assert default_volume_size(48, 128) == (32, 64)
    assert default_volume_size(9, 17) == (8, 16)
    np.save(tmp_path / "v.npy", np.zeros((8, 16, 16), np.float32))
    from PIL import Image

    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "x.png")
    assert resolve_backbone("auto", [str(tmp_path / "v.npy")]) == "cnn3d"
    assert resolve_backbone("auto", [str(tmp_path / "x.png")]) == "compact"
    assert resolve_backbone("resnet18", [str(tmp_path / "v.npy")]) == "resnet18"
    # the Python API's default is the CLI's: a volume manifest gets the 3-D model, not a 2-D
    # model on each volume's middle slice
    assert resolve_backbone(TrainOptions().backbone, [str(tmp_path / "v.npy")]) == "cnn3d"


def test_slices_backbone_is_2d_per_slice_with_volume_head():
    """2.5D: the compact 2-D backbone per slice; Grad-CAM over (slice, row, col) as for cnn3d."""
    from retrieval.explain import registry

    torch.manual_seed(0)
    cfg = ModelConfig(
        classes=["a", "b"], backbone="slices", image_size=32, depth=4, width=4, embedding_dim=8
    )
    m = CaseNet(cfg).eval()
    x = torch.randn(2, 1, 4, 32, 32)
    out = m.run(x)
    assert out.features.shape == (2, 32, 4, 2, 2) and out.weights.shape == (2, 4, 2, 2)
    # slice k's features are the 2-D backbone's on slice k alone
    inner = m.backbone.features[1:-1]
    with torch.no_grad():
        torch.testing.assert_close(out.features[1, :, 2], inner(x[1:2, :, 2])[0])
    cam = registry.GradCAM(upsample=False).attribute(m, x[:1], int(out.predicted[0]))
    torch.testing.assert_close(
        cam, m.gradcam(out.features[:1], out.predicted[:1]), atol=1e-5, rtol=1e-4
    )


def test_peak_pool_is_the_mean_of_each_channels_top_cells():
    from retrieval.model.train import PEAK_FRACTION, peak_pool

    feats = torch.zeros(2, 3, 4, 8, 8)  # 256 cells: the top 4 of each channel
    feats[0, 0, 1, 2, 3] = 8.0  # one hot cell: a quarter of it survives the top-4 mean
    feats[1, 2] = 1.0
    out = peak_pool(feats)
    assert round(PEAK_FRACTION * 256) == 4
    torch.testing.assert_close(out[0], torch.tensor([2.0, 0.0, 0.0]))
    torch.testing.assert_close(out[1], torch.tensor([0.0, 0.0, 1.0]))
    # unlike the average, the peak keeps a one-cell lesion's response
    torch.testing.assert_close(out[0, 0], 64 * feats[0, 0].mean())  # 256 cells / top 4
    # its gradient reaches only the top cells
    feats.requires_grad_(True)
    peak_pool(feats)[0, 0].backward()
    assert int((feats.grad[0, 0] != 0).sum()) == 4 and feats.grad[0, 0, 1, 2, 3] == 0.25


def test_peak_logits_pool_each_class_map_so_shared_anatomy_cannot_decide():
    from torch import nn

    from retrieval.model.train import peak_logits

    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
        head.bias.copy_(torch.tensor([0.5, -0.5]))
    feats = torch.zeros(1, 2, 4, 8, 8)  # 256 cells: each class's top 4
    feats[0, 0, 0, 0, :4] = 3.0  # "anatomy": channel 0 alone, the same logit 3 for both classes
    feats[0, 1, 2, 5, 5] = 4.0  # "lesion": channel 1 in one cell, +4 for class 0, -4 for class 1
    out = peak_logits(head, feats)
    # class 0's top cells: the lesion (4 + 0) and three anatomy cells (3 each)
    torch.testing.assert_close(out, torch.tensor([[(4.0 + 3 * 3.0) / 4 + 0.5, 3.0 - 0.5]]))
    # the per-cell logit maps are Grad-CAM's before the ReLU (x cells): the lesion decides
    cells = torch.einsum("kc,bcn->bkn", head.weight, feats.flatten(2))
    assert int(cells[0, 0].argmax()) == 2 * 64 + 5 * 8 + 5
    # the gradient reaches each class's top cells only
    feats.requires_grad_(True)
    peak_logits(head, feats)[0, 0].backward()
    assert int((feats.grad[0].abs().sum(0) != 0).sum()) == 4


def test_peak_weight_defaults_to_volumes_only_and_is_recorded(tmp_path):
    from retrieval.model.train import PEAK_WEIGHT, _loss_name, resolve_peak_weight

    assert resolve_peak_weight(TrainOptions(), "cnn3d") == PEAK_WEIGHT > 0
    assert resolve_peak_weight(TrainOptions(), "slices") == PEAK_WEIGHT
    assert resolve_peak_weight(TrainOptions(), "compact") == 0.0
    assert resolve_peak_weight(TrainOptions(peak_weight=0.0), "cnn3d") == 0.0
    assert resolve_peak_weight(TrainOptions(peak_weight=0.5), "compact") == 0.5
    assert "peak-pooled" in _loss_name(TrainOptions(), "cnn3d")
    assert "peak-pooled" not in _loss_name(TrainOptions(), "compact")
    with pytest.raises(CasebaseError, match="--peak-weight"):
        resolve_peak_weight(TrainOptions(peak_weight=-1.0), "cnn3d")
    assert "peak-pooled logits" in _loss_name(TrainOptions(peak_pool="logits"), "cnn3d")
    with pytest.raises(CasebaseError, match="--peak-pool"):
        resolve_peak_weight(TrainOptions(peak_pool="max"), "cnn3d")


def test_a_negative_peak_weight_is_refused_before_any_image_is_read(tmp_path):
    from retrieval.model.train import train_model

    # the manifest does not exist: the weight is checked first
    with pytest.raises(CasebaseError, match="--peak-weight"):
        train_model(tmp_path / "missing.csv", tmp_path / "m", TrainOptions(peak_weight=-1.0))


def test_zero_init_makes_every_residual_block_start_as_the_identity():
    from retrieval.model.network import _Residual, zero_init_residuals

    torch.manual_seed(0)
    model = CaseNet(
        ModelConfig(classes=["a", "b"], backbone="cnn3d", depth=8, image_size=32, width=4)
    )
    blocks = [m for m in model.modules() if isinstance(m, _Residual)]
    assert len(blocks) == 3
    x = torch.randn(2, blocks[0].body[0].in_channels, 4, 8, 8)
    assert not torch.allclose(blocks[0](x), torch.relu(x))  # the default init is not the identity
    zero_init_residuals(model)
    for block in blocks:
        ch = block.body[0].in_channels
        x = torch.randn(2, ch, 4, 8, 8)
        for mode in (True, False):
            block.train(mode)
            assert torch.allclose(block(x), torch.relu(x))
        # only the last batch norm's scale is zeroed: the branch still trains
        assert block.body[1].weight.abs().sum() > 0
