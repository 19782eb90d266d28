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
