"""The lesion-extent head and its code in the embedding (retrieval.model.extent)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from retrieval.errors import CasebaseError
from retrieval.explain.similarity import decompose
from retrieval.model import extent
from retrieval.model.augment import augment_batch
from retrieval.model.network import CaseNet, ModelConfig


def _extent_model(weight: float = 1.0) -> CaseNet:
    torch.manual_seed(0)
    knots = extent.fit_knots(np.linspace(0.0, 0.2, 50))
    cfg = ModelConfig(
        classes=["a", "b"], image_size=64, width=8, extent_weight=weight, extent_knots=knots
    )
    return CaseNet(cfg).eval()


def test_cell_targets_are_each_cells_lesion_share():
    masks = torch.zeros(1, 1, 64, 64)
    # stride 16 on a 4 x 4 grid: cell (1, 2) is centred on pixel (16, 32) and spans 8..24 x 24..40
    masks[0, 0, 8:24, 24:40] = 1.0
    t = extent.cell_targets(masks, (4, 4))
    assert t.shape == (1, 4, 4)
    assert float(t[0, 1, 2]) == pytest.approx(1.0)
    assert float(t.sum()) == pytest.approx(1.0)
    assert float(extent.cell_targets(torch.ones(2, 1, 64, 64), (4, 4)).min()) == pytest.approx(1.0)


def test_knots_increase_and_angle_is_the_rank_of_the_area():
    areas = np.r_[np.zeros(40), np.linspace(0.01, 0.3, 60)]  # many empty masks: repeated quantiles
    knots = extent.fit_knots(areas)
    assert len(knots) == extent.N_KNOTS and np.all(np.diff(knots) > 0)
    a = torch.tensor([0.0, 0.01, 0.05, 0.1, 0.3, 0.9])
    t = extent.angle(a, knots)
    assert float(t.min()) >= 0.0 and float(t.max()) == pytest.approx(math.pi / 2)
    assert torch.all(torch.diff(t) >= 0)  # monotone in the area
    # the median training lesion sits near the middle of the quarter circle
    median_lesion = float(np.median(areas))
    assert float(extent.angle(torch.tensor([median_lesion]), knots)) == pytest.approx(
        math.pi / 4, abs=0.1
    )


def test_code_keeps_unit_norm_and_splits_the_cosine():
    e = torch.nn.functional.normalize(torch.randn(2, 16), dim=1)
    t = torch.tensor([0.2, 1.1])
    c = 0.7
    v = extent.append_code(e, t, c)
    assert torch.allclose(v.norm(dim=1), torch.ones(2), atol=1e-6)
    expected = (float(e[0] @ e[1]) + c * c * math.cos(0.2 - 1.1)) / (1 + c * c)
    assert float(v[0] @ v[1]) == pytest.approx(expected, abs=1e-6)


def test_extent_loss_rewards_the_right_fractions_and_skips_unmasked_cases():
    targets = torch.zeros(2, 4, 4)
    targets[:, 1:3, 1:3] = 1.0
    right = targets.clamp(0.02, 0.98)
    wrong = torch.full_like(targets, 0.5)
    has = torch.tensor([True, True])
    assert float(extent.extent_loss(right, targets, has)) < float(
        extent.extent_loss(wrong, targets, has)
    )
    none = extent.extent_loss(wrong.requires_grad_(), targets, torch.tensor([False, False]))
    assert float(none.detach()) == 0.0


def test_augment_moves_the_mask_with_the_image():
    x = torch.zeros(4, 1, 64, 64)
    x[:, :, 10:22, 40:52] = 1.0
    gen = torch.Generator().manual_seed(3)
    out, moved = augment_batch(x, gen, masks=x.clone())
    for i in range(4):
        img = out[i, 0] - out[i, 0].median()
        assert float((img * moved[i, 0]).sum()) > 0.5 * float(img.clamp_min(0).sum())
    # without masks the result is the image alone, as before
    assert isinstance(augment_batch(x, torch.Generator().manual_seed(3)), torch.Tensor)


def test_model_embedding_carries_the_code_and_decomposition_stays_exact():
    model = _extent_model(1.0)
    assert model.config.output_dim == model.config.embedding_dim + 2
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        out = model.run(x)
        assert out.embedding.shape == (2, model.config.output_dim)
        assert torch.allclose(out.embedding.norm(dim=1), torch.ones(2), atol=1e-5)
        assert torch.allclose(model.embed(out.features, out.weights), out.embedding, atol=1e-6)
    dec = decompose(model, out.features[0], out.weights[0], out.features[1], out.weights[1])
    assert dec.similarity == pytest.approx(float(out.embedding[0] @ out.embedding[1]), abs=1e-5)
    assert dec.completeness_error < 1e-6
    dt = float(out.extent_angle[0] - out.extent_angle[1])
    assert dec.extent_term == pytest.approx(0.5 * math.cos(dt), abs=1e-5)


def test_extent_term_lies_on_the_predicted_lesion_cells():
    from retrieval.explain.similarity import extent_allocation

    model = _extent_model(1.0)
    with torch.no_grad():
        out = model.run(torch.randn(1, 1, 64, 64))
        # a head that reads channel 0 only: the lesion is where that channel is high
        model.extent_head.weight.zero_()
        model.extent_head.weight[0, 0] = 60.0
        model.extent_head.bias.fill_(-30.0)
        f = out.features[0].clone()
        f[0] = 0.0
        f[0, 1, 2] = 1.0
        alloc = extent_allocation(model.lesion_fraction(f[None]), out.weights[:1])[0]
    assert float(alloc.sum()) == pytest.approx(1.0)
    assert float(alloc.reshape(4, 4)[1, 2]) > 0.99
    # no cell predicted as lesion: the pooling weights carry it instead
    with torch.no_grad():
        f[0] = 0.0
        w = out.weights[0].double().reshape(-1)
        alloc = extent_allocation(model.lesion_fraction(f[None]), w[None])[0]
        assert torch.allclose(alloc, w)


def test_old_configs_have_no_extent_head():
    cfg = ModelConfig.from_dict({"classes": ["a", "b"]})
    assert cfg.extent_weight == 0 and cfg.output_dim == cfg.embedding_dim
    assert not hasattr(CaseNet(cfg), "extent_head")


def test_training_learns_extent_when_the_manifest_has_masks(phantom_dir, tmp_path):
    from retrieval.model.network import load_model
    from retrieval.model.train import TrainOptions, train_model

    opts = TrainOptions(epochs=1, progress=False, num_workers=0)
    train_model(phantom_dir / "manifest.csv", tmp_path / "m", opts)
    model = load_model(tmp_path / "m")
    assert model.config.extent_weight > 0 and len(model.config.extent_knots) == extent.N_KNOTS
    assert model.config.training["loss_options"]["n_masked"] > 0

    # the same cases without masks: no head, the embedding as before
    df = pd.read_csv(phantom_dir / "manifest.csv", dtype=str, keep_default_na=False)
    df["image"] = [str(phantom_dir / p) for p in df["image"]]
    df["mask"] = ""
    df.to_csv(tmp_path / "nomask.csv", index=False)
    train_model(tmp_path / "nomask.csv", tmp_path / "m2", opts)
    plain = load_model(tmp_path / "m2")
    assert plain.config.extent_weight == 0 and not hasattr(plain, "extent_head")

    with pytest.raises(CasebaseError, match="needs lesion masks"):
        train_model(
            tmp_path / "nomask.csv",
            tmp_path / "m3",
            TrainOptions(epochs=1, progress=False, num_workers=0, extent_weight=1.0),
        )
