"""One image as the model saw it: pixels, input tensor, geometry and the model's single pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from retrieval.data.imageio import LoadedImage
from retrieval.model.preprocess import Geometry


@dataclass
class ImageContext:
    image: LoadedImage
    tensor: torch.Tensor  # (C, S, S) normalised model input ((C, D', S, S) for a volume)
    geometry: Geometry
    embedding: torch.Tensor  # (D,)
    logits: torch.Tensor  # (K,)
    features: torch.Tensor  # (C', h, w) last feature map
    weights: torch.Tensor  # (h, w) pooling weights
    predicted: int
    lesion_fraction: torch.Tensor | None = None  # (h, w) extent head's cell shares, if any

    @property
    def lesion_area(self) -> float | None:
        """The predicted lesion's share of the image (extent head), or None without one."""
        if self.lesion_fraction is None:
            return None
        return float(self.lesion_fraction.float().mean())

    @property
    def grid(self) -> tuple[int, ...]:
        """(h, w) of the feature map; (d, h, w) of a volume model's feature volume."""
        return tuple(self.features.shape[1:])
