"""The audit's worst-example panels (retrieval.audit.examples.render) on 2-D images and volumes."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from retrieval.audit.examples import panel_slice, render, volume_view
from retrieval.explain.overlay import best_slice


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_a_volume_panel_is_drawn_on_the_slice_holding_the_map_and_says_which():
    rng = np.random.default_rng(0)
    vol = rng.random((28, 44, 36, 1)).astype(np.float32)  # (D, H, W, 1), as read_image gives it
    heat = np.zeros((28, 44, 36), np.float32)
    heat[14, 10:20, 5:15] = 1.0
    boxes = [[5, 10, 12, 15, 20, 17], [0, 0, 0, 4, 4, 3]]  # [x0, y0, z0, x1, y1, z1]
    png = render(vol, heat, boxes)  # raised "expected an (H, W[, C]) image" before
    rgb = _png(png)
    assert rgb.shape[0] > 44 and rgb.shape[1] >= 36  # the slice under its label band
    view = volume_view(vol, heat, boxes)
    assert view.index == 14 and view.depth == 28
    assert view.boxes == [[5, 10, 15, 20]] and view.first_kept  # the box slice 14 cuts
    assert panel_slice(vol, heat, boxes) == "slice 14 of 0–27"
    # the picture's bottom 44 rows are slice 14 with its box (green) drawn
    img = rgb[-44:, :36]
    assert (img[10, 5:15] == (0, 255, 0)).all()


def test_volume_panel_without_a_map_uses_the_strongest_box_then_the_middle():
    vol = np.zeros((8, 16, 16, 1), np.float32)
    assert volume_view(vol, None, [[0, 0, 2, 4, 4, 5]]).index == 3
    assert volume_view(vol, None, []).index == 4
    assert volume_view(vol, np.zeros((8, 16, 16)), []).index == 4  # no positive mass
    # a 2-D model's map and box are of the middle slice
    v = volume_view(vol, np.ones((16, 16)), [[1, 2, 8, 9]])
    assert v.index == 4 and v.boxes == [[1, 2, 8, 9]] and v.heat.shape == (16, 16)
    assert render(vol, None, []) and render(vol, np.ones((16, 16)), [[1, 2, 8, 9]])


def test_best_slice_is_the_most_positive_mass_and_ties_go_to_the_middle():
    h = np.zeros((9, 4, 4))
    h[2] = 1.0
    h[7] = -5.0  # negative evidence is not mass
    assert best_slice(h) == 2
    assert best_slice(np.ones((9, 4, 4))) == 4
    assert best_slice(np.full((8, 4, 4), np.nan)) == 4


def test_a_2d_panel_is_unchanged_and_carries_no_slice_label():
    img = np.random.default_rng(1).random((40, 30, 1)).astype(np.float32)
    heat = np.zeros((40, 30), np.float32)
    rgb = _png(render(img, heat, [[2, 3, 10, 12]]))
    assert rgb.shape == (40, 30, 3)
    assert panel_slice(img, heat, [[2, 3, 10, 12]]) is None
