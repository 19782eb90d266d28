"""The augmentation's zoom jitter (what teaches the embedding to ignore lesion size) is a
training option: it reaches every augmented view and is recorded with the model."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval.model import train
from retrieval.model.augment import DEFAULT_SCALE_JITTER, augment_batch
from retrieval.model.network import load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))


def _disk_areas(jitter: float, n: int = 64) -> np.ndarray:
    """Pixels above half intensity of an augmented centred disk (radius 12 on 64 px)."""
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    disk = (((yy - 31.5) ** 2 + (xx - 31.5) ** 2) <= 12**2).float()
    x = disk.expand(n, 1, 64, 64).clone()
    out = augment_batch(x, torch.Generator().manual_seed(0), jitter)
    return (out > 0.5).sum(dim=(1, 2, 3)).numpy().astype(float)


def test_no_scale_jitter_keeps_the_lesion_area_and_jitter_changes_it():
    still = _disk_areas(0.0)
    zoomed = _disk_areas(0.3)
    # rotation, shift and intensity move a few edge pixels; a ±30 % zoom moves the area ±70 %
    assert still.std() / still.mean() < 0.05
    assert zoomed.std() / zoomed.mean() > 3 * still.std() / still.mean()
    assert zoomed.max() / zoomed.min() > 1.5


def test_training_uses_the_option_on_every_view_and_records_it(phantom_dir, tmp_path, monkeypatch):
    seen = []
    real = train.augment_batch

    def spy(x, generator=None, scale_jitter=DEFAULT_SCALE_JITTER, colour=0.0, masks=None):
        seen.append(scale_jitter)
        return real(x, generator, scale_jitter, colour, masks=masks)

    monkeypatch.setattr(train, "augment_batch", spy)
    opts = train.TrainOptions(epochs=1, progress=False, num_workers=0, width=8, aug_scale=0.0)
    train.train_model(phantom_dir / "manifest.csv", tmp_path / "m", opts)
    assert seen and set(seen) == {0.0}
    assert len(seen) % 2 == 0  # two views per step with the instance term on
    cfg = load_model(tmp_path / "m").config
    assert cfg.training["loss_options"]["aug_scale"] == 0.0


def test_the_default_is_the_jitter_the_augmentation_documents():
    assert train.TrainOptions().aug_scale == DEFAULT_SCALE_JITTER


def test_bench_train_args_are_typed_by_the_option():
    from depth import parse_train_args

    got = parse_train_args(["aug_scale=0", "temperature=0.3", "epochs=2", "loss=multisimilarity"])
    assert got == {"aug_scale": 0.0, "temperature": 0.3, "epochs": 2, "loss": "multisimilarity"}
    assert isinstance(got["epochs"], int)
    with pytest.raises(SystemExit, match="expected NAME=VALUE"):
        parse_train_args(["no_such_option=1"])


def test_colour_jitter_changes_rgb_channel_balance_only():
    """aug_colour: RGB views get their own channel gains and saturation; grayscale views and
    the default (0) are exactly as without it (no random draw spent)."""
    g = torch.Generator
    rgb = torch.rand(32, 3, 32, 32, generator=g().manual_seed(1)) * 0.5 + 0.25
    grey = rgb[:, :1]
    base = augment_batch(rgb, g().manual_seed(0), 0.1)
    assert torch.equal(base, augment_batch(rgb, g().manual_seed(0), 0.1, 0.0))
    assert torch.equal(
        augment_batch(grey, g().manual_seed(0), 0.1),
        augment_batch(grey, g().manual_seed(0), 0.1, 0.3),
    )
    jit = augment_batch(rgb, g().manual_seed(0), 0.1, 0.3)

    def balance(x):  # each item's red over blue mean: the colour cast
        m = x.mean(dim=(2, 3))
        return (m[:, 0] / m[:, 2]).std().item()

    assert balance(jit) > 4 * balance(base)
    assert jit.min() >= 0 and jit.max() <= 1
