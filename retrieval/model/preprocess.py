"""From any image the data layer reads to the tensor the model takes, and back.

The image is resized to image_size × image_size without cropping (a
non-uniform scale when it is not square): nothing at the border, where site
markers and rulers live, is cut away, and every model-space coordinate maps
back to the original pixels with two scale factors (`Geometry`).
A volume model (``ModelConfig.depth > 0``, ``--backbone cnn3d``) reads volumes
(:func:`retrieval.data.volume.read_volume`) and resizes them, trilinearly and without
cropping, to depth x image_size x image_size; ``Geometry3D`` maps model-space voxels
back to the original ones (boxes ``[x0, y0, z0, x1, y1, z1]``).
Grayscale images given to an RGB model are replicated to three channels; RGB
images given to a grayscale model are converted with ITU-R 601 luma.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from retrieval.data.imageio import LoadedImage, read_image
from retrieval.model.cells import cell_span, grid_stride, upsample_cells
from retrieval.model.network import ModelConfig


class _MapsToOriginal:
    """Maps over the model input, or over its feature cells, back to the original size (shared
    by Geometry and Geometry3D, which give ``input_shape`` and ``original_size``)."""

    def map_to_original(self, heat: np.ndarray | torch.Tensor) -> np.ndarray:
        """Resize any (h, w) map to the original (H, W) ((d, h, w) to (D, H, W) for a volume),
        float32, finite; a map over feature cells goes through the input grid first, each cell
        at its centre (``upsample_cells``)."""
        return self.maps_to_original(np.asarray(heat, dtype=np.float32)[None])[0]

    def maps_to_original(self, maps: np.ndarray) -> np.ndarray:
        """A stack (k, *shape) of such maps -> (k, *original_size)."""
        t = torch.as_tensor(np.asarray(maps, dtype=np.float32))
        grid, inp = tuple(t.shape[1:]), tuple(self.input_shape)
        if (
            grid != tuple(self.original_size)
            and grid != inp
            and all(grid_stride(n, s) is not None for n, s in zip(grid, inp, strict=True))
        ):
            t = upsample_cells(t, inp)
        mode = "trilinear" if t.ndim == 4 else "bilinear"
        out = F.interpolate(
            t[:, None], size=tuple(self.original_size), mode=mode, align_corners=False
        )
        return np.nan_to_num(out[:, 0].numpy().astype(np.float32))


@dataclass(frozen=True)
class Geometry(_MapsToOriginal):
    """Maps model-input coordinates back to the original image as read."""

    original_size: tuple[int, int]  # (H, W)
    input_size: int

    @property
    def scale(self) -> tuple[float, float]:
        h, w = self.original_size
        return w / self.input_size, h / self.input_size

    def box_to_original(self, box: tuple[float, float, float, float]) -> list[int]:
        """[x0, y0, x1, y1] in model-input pixels -> original pixels (clipped, x1/y1 exclusive)."""
        sx, sy = self.scale
        h, w = self.original_size
        x0, y0, x1, y1 = box
        return [
            int(np.clip(np.floor(x0 * sx), 0, w - 1)),
            int(np.clip(np.floor(y0 * sy), 0, h - 1)),
            int(np.clip(np.ceil(x1 * sx), 1, w)),
            int(np.clip(np.ceil(y1 * sy), 1, h)),
        ]

    @property
    def input_shape(self) -> tuple[int, int]:
        return self.input_size, self.input_size

    def cell_box(self, row: int, col: int, grid: tuple[int, int]) -> list[int]:
        """The original-pixel box of feature-map cell (row, col) of a (gh, gw) grid: the pixels
        nearer its centre than any other cell's (``retrieval.model.cells.cell_span``)."""
        (y0, y1), (x0, x1) = (
            cell_span(i, n, s) for i, n, s in zip((row, col), grid, self.input_shape, strict=True)
        )
        return self.box_to_original((x0, y0, x1, y1))


@dataclass(frozen=True)
class Geometry3D(_MapsToOriginal):
    """Maps model-input voxel coordinates back to the original volume (D, H, W) as read."""

    original_size: tuple[int, int, int]  # (D, H, W)
    input_size: int  # in-plane side of the model input
    input_depth: int  # slices of the model input

    @property
    def scale(self) -> tuple[float, float, float]:
        d, h, w = self.original_size
        return w / self.input_size, h / self.input_size, d / self.input_depth

    def box_to_original(self, box) -> list[int]:
        """[x0, y0, z0, x1, y1, z1] in model-input voxels -> original voxels (clipped, ends
        exclusive)."""
        sx, sy, sz = self.scale
        d, h, w = self.original_size
        x0, y0, z0, x1, y1, z1 = box
        return [
            int(np.clip(np.floor(x0 * sx), 0, w - 1)),
            int(np.clip(np.floor(y0 * sy), 0, h - 1)),
            int(np.clip(np.floor(z0 * sz), 0, d - 1)),
            int(np.clip(np.ceil(x1 * sx), 1, w)),
            int(np.clip(np.ceil(y1 * sy), 1, h)),
            int(np.clip(np.ceil(z1 * sz), 1, d)),
        ]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.input_depth, self.input_size, self.input_size

    def cell_box(self, z: int, row: int, col: int, grid: tuple[int, int, int]) -> list[int]:
        """The original-voxel box [x0, y0, z0, x1, y1, z1] of feature cell (z, row, col): the
        voxels nearer its centre than any other cell's."""
        (z0, z1), (y0, y1), (x0, x1) = (
            cell_span(i, n, s)
            for i, n, s in zip((z, row, col), grid, self.input_shape, strict=True)
        )
        return self.box_to_original((x0, y0, z0, x1, y1, z1))


def read_volume_image(src) -> LoadedImage:
    """A volume as a LoadedImage: pixels float32 (D, H, W, 1) in [0, 1], original_size (D, H, W).

    ``src``: a path read_volume reads, a :class:`~retrieval.data.volume.Volume`, a 3-D array, or
    a LoadedImage that already holds a volume."""
    from retrieval.data.volume import Volume, VolumeError, read_volume
    from retrieval.errors import ImageReadError

    if isinstance(src, LoadedImage):
        if src.pixels.ndim != 4:
            raise ImageReadError(
                src.source, "is a 2-D image; this model (cnn3d) reads volumes (D, H, W)"
            )
        return src
    if isinstance(src, np.ndarray):
        if src.ndim != 3:
            raise ImageReadError("<array>", f"shape {src.shape}: a volume model needs (D, H, W)")
        arr = np.clip(np.nan_to_num(src.astype(np.float32)), 0.0, 1.0)
        return LoadedImage(arr[..., None], tuple(arr.shape), "<array>", {"volume": True})
    if isinstance(src, Volume):
        vol = src
    else:
        try:
            vol = read_volume(src)
        except VolumeError as err:
            raise ImageReadError(
                str(src),
                str(err).removeprefix(f"{src}: ")
                + " (this model, cnn3d, reads volumes: DICOM series, NIfTI, 3-D .npy)",
            ) from None
    meta = {
        "volume": True,
        "format": vol.meta.get("format", "volume"),
        "volume_shape": list(vol.shape),
        "spacing": list(vol.spacing),
        "modality": vol.modality,
    }
    return LoadedImage(vol.array[..., None], vol.shape, vol.source or str(src), meta)


def match_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """(H, W, C) float image -> (H, W, channels)."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    have = pixels.shape[2]
    if have == channels:
        return pixels
    if channels == 3 and have == 1:
        return np.repeat(pixels, 3, axis=2)
    if channels == 1 and have >= 3:
        luma = pixels[..., 0] * 0.299 + pixels[..., 1] * 0.587 + pixels[..., 2] * 0.114
        return luma[..., None].astype(np.float32)
    raise ValueError(f"cannot convert a {have}-channel image to {channels} channels")


class Preprocessor:
    """Reads, converts, resizes and normalises images exactly as the model was trained."""

    def __init__(self, config: ModelConfig):
        self.config = config
        shape = (-1, 1, 1, 1) if config.depth > 0 else (-1, 1, 1)
        self.mean = torch.tensor(config.mean, dtype=torch.float32).view(*shape)
        self.std = torch.tensor(config.std, dtype=torch.float32).view(*shape)

    @property
    def is_volume(self) -> bool:
        return self.config.depth > 0

    def read(self, src) -> LoadedImage:
        """The image (or, for a volume model, the volume) as this model reads it."""
        if self.is_volume:
            return read_volume_image(src)
        return src if isinstance(src, LoadedImage) else read_image(src)

    def resized(self, image: LoadedImage) -> torch.Tensor:
        """(C, S, S) float in [0, 1], channels matched to the model ((C, D', S, S) for volumes)."""
        if self.is_volume:
            vol = read_volume_image(image)
            t = torch.from_numpy(np.ascontiguousarray(vol.pixels[..., 0]))[None, None]
            s, d = self.config.image_size, self.config.depth
            t = F.interpolate(t, size=(d, s, s), mode="trilinear", align_corners=False)
            return t[0].expand(self.config.in_channels, -1, -1, -1).clamp(0.0, 1.0).contiguous()
        pix = match_channels(image.pixels, self.config.in_channels)
        t = torch.from_numpy(np.ascontiguousarray(pix.transpose(2, 0, 1)))[None]
        s = self.config.image_size
        t = F.interpolate(t, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        return t[0].clamp_(0.0, 1.0)

    def to_uint8(self, image: LoadedImage) -> torch.Tensor:
        """Compact cache form (C, S, S) uint8 used by training and index builds."""
        return (self.resized(image) * 255.0).round_().to(torch.uint8)

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float batch (B, C, S, S) -> the model's normalised input."""
        if batch.dtype == torch.uint8:
            batch = batch.float() / 255.0
        mean, std = self.mean.to(batch.device), self.std.to(batch.device)
        return (batch - mean) / std

    def geometry(self, image: LoadedImage) -> Geometry | Geometry3D:
        return self.geometry_of(tuple(image.original_size))

    def geometry_of(self, original_size: tuple[int, ...]) -> Geometry | Geometry3D:
        """The geometry of an image (volume) of this original size as this model reads it (an
        indexed case's, from the size the region index stores, without reading it)."""
        if self.is_volume:
            return Geometry3D(tuple(original_size), self.config.image_size, self.config.depth)
        return Geometry(tuple(original_size), self.config.image_size)

    def load(self, src) -> tuple[LoadedImage, torch.Tensor, Geometry | Geometry3D]:
        image = self.read(src)
        # Through uint8, exactly as training and index builds see images, so an indexed
        # image queried again reproduces its stored vector.
        tensor = self.normalize(self.to_uint8(image)[None])[0]
        return image, tensor, self.geometry(image)

    def __call__(self, src) -> torch.Tensor:
        return self.load(src)[1]
