"""Fixtures for the explanation tests: a tiny random-init CaseNet and a small index bundle.

No trained model is needed for these checks (shapes, completeness, equality
with reference implementations); the one test that needs a model that has
learnt something trains its own in a few seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.model.network import CaseNet, ModelConfig, save_model

CLASSES = ["cavity", "mass", "nodule"]


def tiny_model(image_size: int = 32, seed: int = 0, **kw) -> CaseNet:
    torch.manual_seed(seed)
    cfg = ModelConfig(classes=list(CLASSES), image_size=image_size, embedding_dim=16, **kw)
    model = CaseNet(cfg).eval()
    # give BatchNorm non-trivial statistics so eval-mode folding is really exercised
    g = torch.Generator().manual_seed(seed + 1)
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2, generator=g)
            mod.running_var.uniform_(0.5, 1.5, generator=g)
            mod.weight.data.uniform_(0.5, 1.5, generator=g)
            mod.bias.data.uniform_(-0.1, 0.1, generator=g)
    return model


def write_png(path: Path, height: int, width: int, seed: int = 0) -> Path:
    """A smooth random grayscale PNG of the given (non-square) size."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = (
        0.5
        + 0.3 * np.sin(xx / (5 + seed)) * np.cos(yy / 7)
        + 0.1 * rng.standard_normal((height, width))
    )
    cy, cx = rng.integers(height // 4, 3 * height // 4), rng.integers(width // 4, 3 * width // 4)
    img += 0.4 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (min(height, width) / 10) ** 2))
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="session")
def tiny_index(tmp_path_factory, phantom_dir) -> Path:
    from index.builder import build_index

    root = tmp_path_factory.mktemp("explain_index")
    save_model(tiny_model(), root / "model")
    build_index(
        root / "model",
        phantom_dir / "manifest.csv",
        root / "index",
        device="cpu",
        progress=False,
        num_workers=0,
    )
    return root / "index"


@pytest.fixture(scope="session")
def retriever(tiny_index):
    from retrieval.service.retriever import CaseRetriever

    return CaseRetriever.load(tiny_index, device="cpu")


@pytest.fixture(scope="session")
def odd_images(tmp_path_factory) -> dict[tuple[int, int], Path]:
    """Non-square query images (H, W) = (100, 160) and (300, 200)."""
    root = tmp_path_factory.mktemp("odd_images")
    return {
        (100, 160): write_png(root / "wide.png", 100, 160, seed=1),
        (300, 200): write_png(root / "tall.png", 300, 200, seed=2),
    }


@pytest.fixture(scope="session")
def rgb_retriever(tmp_path_factory, photo_phantom_dir):
    """A tiny random-init RGB model indexed over the photo (dermoscopy-like PNG) phantom."""
    from index.builder import build_index
    from retrieval.service.retriever import CaseRetriever

    root = tmp_path_factory.mktemp("explain_rgb_index")
    save_model(tiny_model(in_channels=3, mean=[0.5] * 3, std=[0.25] * 3), root / "model")
    build_index(
        root / "model",
        photo_phantom_dir / "manifest.csv",
        root / "index",
        device="cpu",
        progress=False,
        num_workers=0,
    )
    return CaseRetriever.load(root / "index", device="cpu")


def explain_eval_with_sanity(index, manifest, methods: str, plot: Path, capsys) -> dict:
    """`casebase explain-eval` at its smallest with the sanity checks on (2 cases, 1 of them
    randomised under 1 seed) and a plot; its --json report, after asserting exit 0."""
    import json

    from retrieval.cli import main

    capsys.readouterr()
    argv = ["explain-eval", str(index), str(manifest), "--methods", methods]
    argv += ["--max-cases", "2", "--sanity-cases", "1", "--sanity-seeds", "1"]
    rc = main(argv + ["--json", "--no-store", "--plot", str(plot)])
    assert rc == 0
    return json.loads(capsys.readouterr().out)
