import numpy as np
import pytest

from retrieval.data.imageio import LoadedImage
from retrieval.model.network import ModelConfig
from retrieval.model.preprocess import Geometry, Preprocessor, match_channels


def _img(h, w, c):
    px = np.random.default_rng(0).random((h, w, c)).astype(np.float32)
    return LoadedImage(pixels=px, original_size=(h, w), source="<array>", meta={})


@pytest.mark.parametrize("model_channels,image_channels", [(1, 1), (1, 3), (3, 1), (3, 3)])
def test_any_channel_count_is_converted(model_channels, image_channels):
    pre = Preprocessor(ModelConfig(classes=["a", "b"], in_channels=model_channels, image_size=32))
    _, t, g = pre.load(_img(50, 70, image_channels))
    assert t.shape == (model_channels, 32, 32)
    assert g.original_size == (50, 70)


def test_rgb_to_gray_uses_luma():
    px = np.zeros((2, 2, 3), np.float32)
    px[..., 1] = 1.0
    np.testing.assert_allclose(match_channels(px, 1)[..., 0], 0.587, atol=1e-6)


def test_geometry_maps_cells_back_to_original_pixels():
    g = Geometry((300, 200), 128)  # H=300, W=200; x scale 1.5625, y scale 2.34375
    # cell i of the stride-16 grid is centred on input pixel 16 i and stands for the pixels
    # nearer it than any other cell: [16 i - 7.5, 16 i + 8.5), the outer cells to the border
    assert g.cell_box(0, 0, (8, 8)) == [0, 0, 14, 20]  # [0, 8.5) input px
    assert g.cell_box(3, 4, (8, 8)) == [88, 94, 114, 133]  # x [56.5, 72.5), y [40.5, 56.5)
    assert g.cell_box(7, 7, (8, 8)) == [163, 244, 200, 300]  # [104.5, 128)
    boxes = [g.cell_box(r, c, (8, 8)) for r in range(8) for c in range(8)]
    assert all(0 <= b[0] < b[2] <= 200 and 0 <= b[1] < b[3] <= 300 for b in boxes)
    m = g.map_to_original(np.ones((8, 8)))
    assert m.shape == (300, 200) and m.dtype == np.float32
