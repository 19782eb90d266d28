"""Pictures: heat-map overlays and matched-region boxes, as PNG bytes or arrays."""

from __future__ import annotations

import io

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw

from retrieval.data.imageio import to_uint8_rgb


def normalize_map(heat: np.ndarray, signed: bool = False) -> np.ndarray:
    """Scale a map to [0, 1] for display (robust to constant and non-finite maps)."""
    h = np.nan_to_num(np.asarray(heat, np.float64))
    if signed:
        h = np.abs(h)
    lo, hi = float(np.min(h)), float(np.percentile(h, 99.5))
    if hi - lo < 1e-12:
        return np.zeros_like(h, dtype=np.float32)
    return np.clip((h - lo) / (hi - lo), 0, 1).astype(np.float32)


def overlay(
    pixels: np.ndarray, heat: np.ndarray, alpha: float = 0.45, cmap: str = "jet"
) -> np.ndarray:
    """(H, W, 3) uint8: the image with the map blended on top (map resized to the image if needed)."""
    base = to_uint8_rgb(pixels).astype(np.float32)
    h = normalize_map(heat)
    if h.shape != base.shape[:2]:
        h = np.asarray(Image.fromarray(h).resize((base.shape[1], base.shape[0]), Image.BILINEAR))
    colored = colormaps[cmap](h)[..., :3] * 255.0
    a = alpha * h[..., None]
    return (base * (1 - a) + colored * a).clip(0, 255).astype(np.uint8)


def draw_boxes(
    rgb: np.ndarray, boxes: list[list[int]], color=(0, 255, 0), width: int | None = None
) -> np.ndarray:
    img = Image.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    w = width or max(1, round(min(rgb.shape[:2]) / 128))
    for i, b in enumerate(boxes):
        draw.rectangle(
            [b[0], b[1], b[2] - 1, b[3] - 1], outline=color if i == 0 else (255, 200, 0), width=w
        )
    return np.asarray(img)


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def overlay_png(pixels: np.ndarray, heat: np.ndarray) -> bytes:
    return png_bytes(overlay(pixels, heat))


def best_slice(heat: np.ndarray) -> int:
    """The axial slice (index along axis 0) of a (D, H, W) map holding most of its positive mass:
    the slice ``casebase query --save-maps`` overlays and the audit's volume panels show.
    Ties (a map constant along z, e.g. a model whose features have one slice) go to the slice
    nearest the middle, ``D // 2``; so does a map without positive mass."""
    arr = np.clip(np.nan_to_num(np.asarray(heat, np.float64)), 0, None)
    if arr.ndim != 3:
        raise ValueError(f"expected a (D, H, W) map, got shape {arr.shape}")
    mass = arr.sum(axis=(1, 2))
    top = np.flatnonzero(mass >= mass.max() * (1 - 1e-6))
    mid = arr.shape[0] // 2
    return int(top[np.argmin(np.abs(top - mid))])


def slice_label(index: int, depth: int) -> str:
    """'slice 14 of 0–27': which axial slice of a ``depth``-slice volume a picture shows
    (0-based, the range inclusive)."""
    return f"slice {index} of 0–{depth - 1}"


def draw_label(rgb: np.ndarray, text: str) -> np.ndarray:
    """(h + band, max(w, text), 3) uint8: the picture under a dark band holding ``text`` in white
    (e.g. which slice is shown); the band is above the picture so nothing of it is covered."""
    text = text.replace("–", "-")  # Pillow's default font has no en dash
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    _, _, tw, th = probe.textbbox((0, 0), text)
    h, w = rgb.shape[:2]
    band = th + 4
    out = Image.new("RGB", (max(w, tw + 4), h + band), (0, 0, 0))
    out.paste(Image.fromarray(np.ascontiguousarray(rgb)), (0, band))
    ImageDraw.Draw(out).text((2, 1), text, fill=(255, 255, 255))
    return np.asarray(out)
