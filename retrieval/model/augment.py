"""Augmentations suited to medical images, applied to whole batches on the device.

Mild geometry (rotation ±10°, scale 0.9–1.1, shift ±6%) and intensity
(brightness, contrast, gamma, a little noise): the variation between
acquisitions. No flips by default: laterality carries meaning in chest films,
and flipping would move a site marker the audit must be able to see.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Default scale jitter (± this fraction). Scale changes what lesion size looks like, so every
# view pair that differs in scale teaches the embedding to ignore size; see TrainOptions.aug_scale.
DEFAULT_SCALE_JITTER = 0.1


def _uniform(x: torch.Tensor, generator):
    """u(lo, hi): one uniform draw per batch item, on x's device (drawn on the CPU generator)."""
    b, dev = x.shape[0], x.device

    def u(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(b, generator=generator, device="cpu").to(dev) * (hi - lo) + lo

    return u


def _colour(x: torch.Tensor, u, strength: float) -> torch.Tensor:
    """RGB only: a gain per channel and a saturation change, each in [1 - s, 1 + s] per item.

    As SimCLR found, views that share their colour let the instance term tell cases apart by
    their colour histogram alone (here: the skin's tone) instead of by how the lesion looks."""
    b = x.shape[0]
    gains = torch.stack([u(1.0 - strength, 1.0 + strength) for _ in range(3)], 1)
    x = x * gains.view(b, 3, *(1,) * (x.dim() - 2))
    grey = x.mean(1, keepdim=True)
    sat = u(1.0 - strength, 1.0 + strength).view(b, *(1,) * (x.dim() - 1))
    return (grey + (x - grey) * sat).clamp(0.0, 1.0)


def _intensity(x: torch.Tensor, u, generator, colour: float = 0.0) -> torch.Tensor:
    """Gamma, contrast, brightness per item and a little noise, for images and volumes alike
    (and, with ``colour`` > 0 on RGB, channel gains and saturation: see _colour)."""
    if colour > 0 and x.shape[1] == 3:
        x = _colour(x, u, colour)
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    gamma = u(0.8, 1.25).view(shape)
    x = x.clamp(1e-6, 1.0) ** gamma
    contrast = u(0.85, 1.15).view(shape)
    brightness = u(-0.08, 0.08).view(shape)
    mean = x.mean(dim=tuple(range(1, x.dim())), keepdim=True)
    x = (x - mean) * contrast + mean + brightness
    noise = torch.randn(x.shape, generator=generator, device="cpu").to(x.device) * 0.015
    return (x + noise).clamp(0.0, 1.0)


def augment_batch(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    scale_jitter: float = DEFAULT_SCALE_JITTER,
    colour: float = 0.0,
    masks: torch.Tensor | None = None,
):
    """x: (B, C, S, S) float in [0, 1] -> augmented, same shape, in [0, 1].

    ``scale_jitter``: zoom drawn in [1 - j, 1 + j]; 0 keeps every view at its own scale.
    ``colour``: RGB channel-gain and saturation jitter (0: none; grayscale ignores it).
    ``masks``: (B, 1, S, S) lesion masks moved by the same geometry (not the intensity
    changes); then (augmented x, moved masks) is returned.
    """
    u = _uniform(x, generator)

    angle = u(-10, 10) * math.pi / 180
    scale = u(1.0 - scale_jitter, 1.0 + scale_jitter)
    tx, ty = u(-0.06, 0.06), u(-0.06, 0.06)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1
    )  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    x = _intensity(x, u, generator, colour)
    if masks is None:
        return x
    moved = F.grid_sample(
        masks.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return x, moved


def augment_volume_batch(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    scale_jitter: float = DEFAULT_SCALE_JITTER,
) -> torch.Tensor:
    """x: (B, C, D, H, W) float in [0, 1] -> augmented, same shape, in [0, 1] (cnn3d training).

    Light 3-D augmentation: flips along the slice axis and along the columns (each p = 0.5),
    a shift of ±6% along each axis with zoom in [1 - j, 1 + j] (trilinear, border padding),
    and the 2-D intensity changes (gamma, contrast, brightness, a little noise). No rotation.
    """
    u = _uniform(x, generator)

    flip_z = (u(0, 1) < 0.5).float() * -2 + 1  # -1 flips
    flip_x = (u(0, 1) < 0.5).float() * -2 + 1
    scale = 1.0 / u(1.0 - scale_jitter, 1.0 + scale_jitter)
    tx, ty, tz = u(-0.06, 0.06), u(-0.06, 0.06), u(-0.06, 0.06)
    zero = torch.zeros_like(scale)
    theta = torch.stack(
        [
            torch.stack([scale * flip_x, zero, zero, tx], 1),
            torch.stack([zero, scale, zero, ty], 1),
            torch.stack([zero, zero, scale * flip_z, tz], 1),
        ],
        1,
    )  # (B, 3, 4); grid order (x, y, z)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return _intensity(x, u, generator)
