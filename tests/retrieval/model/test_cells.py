import numpy as np
import pytest
import torch
from torch import nn

from retrieval.model.cells import cell_centre, cell_span, grid_stride, upsample_cells
from retrieval.model.network import Compact3DBackbone, CompactBackbone, ResNet18Backbone


def _uniform(backbone: nn.Module) -> nn.Module:
    """Every weight positive and equal, batch norm the identity, max-pools as average pools of
    the same geometry: with a positive input every unit is then linear in it, and a cell's
    input gradient is its receptive field, symmetric about where the network centres it."""
    for mod in backbone.modules():
        if isinstance(mod, nn.Conv2d | nn.Conv3d):
            nn.init.constant_(mod.weight, 1.0 / mod.weight[0].numel())
        elif isinstance(mod, nn.BatchNorm2d | nn.BatchNorm3d):
            mod.reset_running_stats()
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)
        for name, child in mod.named_children():
            if isinstance(child, nn.MaxPool2d):
                setattr(mod, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding))
    return backbone.eval()


def _centroid_of_cell(features: nn.Module, size: tuple[int, ...], cell: tuple[int, ...]):
    x = torch.ones(1, 1, *size, requires_grad=True)
    out = features(x)
    (g,) = torch.autograd.grad(out[(0, slice(None), *cell)].sum(), x)
    a = g[0, 0].double().numpy()
    assert (a >= 0).all() and a.sum() > 0
    idx = np.indices(a.shape)
    return [float((idx[d] * a).sum() / a.sum()) for d in range(a.ndim)], tuple(out.shape[2:])


@pytest.mark.parametrize(
    "backbone,size,cell",
    [
        (lambda: CompactBackbone(1, width=4).features, (256, 256), (8, 7)),
        (lambda: ResNet18Backbone(1).features, (1024, 1024), (16, 15)),
        # the cnn3d up to Grad-CAM's block
        (lambda: Compact3DBackbone(1, width=2).features[:5], (96, 96, 96), (6, 5, 6)),
    ],
    ids=["compact", "resnet18", "cnn3d-features.4"],
)
def test_each_backbone_centres_cell_i_on_stride_times_i(backbone, size, cell):
    """What upsample_cells assumes of every backbone: a receptive field centred on s*i."""
    torch.manual_seed(0)
    centroid, grid = _centroid_of_cell(_uniform(backbone()), size, cell)
    for c, i, n, s in zip(centroid, cell, grid, size, strict=True):
        assert grid_stride(n, s) is not None
        assert c == pytest.approx(cell_centre(i, n, s), abs=1e-3)
        # captum's / F.interpolate's align_corners=False centre, half a cell further on
        assert abs(c - ((i + 0.5) * s / n - 0.5)) >= (s / n - 1) / 2 - 1e-3


def test_grid_stride_reads_power_of_two_strides_only():
    assert grid_stride(8, 128) == 16
    assert grid_stride(7, 100) == 16  # ceil(100 / 16) cells
    assert grid_stride(32, 32) == 1  # the 2.5-D model's slice axis
    assert grid_stride(5, 100) is None


@pytest.mark.parametrize("grid,size", [((4, 4), (64, 64)), ((4, 8, 8), (32, 64, 64))])
def test_upsample_cells_peaks_on_the_cells_centre(grid, size):
    cell = tuple(n // 2 for n in grid)
    maps = torch.zeros(1, *grid)
    maps[(0, *cell)] = 1.0
    up = upsample_cells(maps, size)[0].numpy()
    assert up.shape == size
    peak = np.unravel_index(np.argmax(up), size)
    assert tuple(int(p) for p in peak) == tuple(
        s // n * i for i, n, s in zip(cell, grid, size, strict=True)
    )
    assert up.max() == pytest.approx(1.0)
    # constant maps stay constant (the border is clamped, not faded)
    np.testing.assert_allclose(upsample_cells(torch.ones(2, *grid), size).numpy(), 1.0, rtol=1e-6)


def test_upsample_cells_leaves_input_sized_maps_alone():
    m = torch.rand(2, 16, 16)
    assert upsample_cells(m, (16, 16)) is m


@pytest.mark.parametrize("n,size", [(8, 128), (7, 100), (4, 32), (1, 64)])
def test_cell_spans_tile_the_input_and_hold_their_centres(n, size):
    spans = [cell_span(i, n, size) for i in range(n)]
    assert spans[0][0] == 0 and spans[-1][1] == size
    for (_lo, hi), (nlo, _hi) in zip(spans, spans[1:], strict=False):
        assert hi == nlo
    for i, (lo, hi) in enumerate(spans):
        assert lo <= cell_centre(i, n, size) + 0.5 <= hi  # pixel j's centre sits at j + 0.5
