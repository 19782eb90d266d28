"""Where a feature-map cell sits in the model input, and maps from cells to pixels.

Every backbone here reaches its grid through stride-2 layers that are centred: 3 x 3
convolutions (and resnet18's 3 x 3 max-pool) with padding 1, resnet18's 7 x 7 stem with
padding 3, 1 x 1 stride-2 shortcuts. Each maps output i onto input 2i, so cell i of a grid of
stride s is centred on input pixel s*i (pixel centres at integer coordinates). A plain
``align_corners=False`` interpolation (``F.interpolate``, captum's
``LayerAttribution.interpolate``) puts cell i at s*i + (s - 1)/2 instead: half a cell too far
along every axis (3.5 voxels on the cnn3d's stride-8 grid, 7.5 px on the 2-D stride-16 grid);
bench/cell_alignment.py measures what that does to Grad-CAM's pointing game. ``upsample_cells``
interpolates between the centres the network has, and ``cell_span`` gives each cell the
pixels nearer its centre than any other cell's (matched-region boxes, region search, the
lesion cells of explain-eval), so boxes and maps agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def grid_stride(n: int, size: int) -> int | None:
    """The stride s of an n-cell grid over `size` input pixels: the power of two with
    ceil(size / s) == n (how stride-2, padding-1 layers shrink a side); None when there is none
    (a grid not made by such layers, e.g. a map resized by hand)."""
    if n >= size:
        return 1 if n == size else None
    s = 2 ** round(math.log2(size / n))
    return s if math.ceil(size / s) == n else None


def cell_centre(i: float, n: int, size: int) -> float:
    """Input coordinate (pixel centres at integers) where cell i of an n-cell grid is centred."""
    s = grid_stride(n, size)
    return s * i if s is not None else (i + 0.5) * size / n - 0.5


def cell_span(i: int, n: int, size: int) -> tuple[float, float]:
    """[lo, hi) in input pixels (pixel j spans [j, j + 1)) of the pixels nearer cell i's centre
    than any other cell's: the region a cell stands for. The first and last cells reach the
    borders, so the spans of a grid tile [0, size)."""
    lo = 0.0 if i == 0 else (cell_centre(i - 1, n, size) + cell_centre(i, n, size)) / 2 + 0.5
    hi = size if i == n - 1 else (cell_centre(i, n, size) + cell_centre(i + 1, n, size)) / 2 + 0.5
    return max(0.0, lo), min(float(size), float(hi))


def _axis_grid(n: int, size: int) -> torch.Tensor:
    """grid_sample coordinates (align_corners=True: -1 at cell 0, +1 at cell n - 1) of the
    `size` input pixels along one axis."""
    if n == 1:
        return torch.zeros(size)
    s = grid_stride(n, size)
    x = torch.arange(size, dtype=torch.float32)
    u = x / s if s is not None else (x + 0.5) * n / size - 0.5  # in cells
    return 2 * u / (n - 1) - 1


def upsample_cells(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, *grid) maps over feature cells -> (B, *size) over input pixels, (bi/tri)linear
    between cell centres, constant beyond the outer ones. A map already of `size` is returned
    as it is."""
    size = tuple(int(v) for v in size)
    if tuple(maps.shape[1:]) == size:
        return maps
    grid = tuple(maps.shape[1:])
    axes = [_axis_grid(n, s) for n, s in zip(grid, size, strict=True)]
    mesh = torch.meshgrid(*axes, indexing="ij")
    # grid_sample wants (x, y[, z]) last, fastest axis first
    coords = torch.stack(list(reversed(mesh)), dim=-1)[None].to(maps.device)
    t = maps[:, None].float()
    coords = coords.expand(t.shape[0], *coords.shape[1:])
    out = F.grid_sample(t, coords, mode="bilinear", padding_mode="border", align_corners=True)
    return out[:, 0]
