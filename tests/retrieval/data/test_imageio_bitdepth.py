"""16-bit grayscale containers holding fewer bits are scaled by their bit depth, so that
12-bit data keeps its grey levels through the uint8 cache of training and indexing."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile
from PIL import Image

from retrieval.data.imageio import _read_tifffile, container_bit_depth, read_image
from retrieval.model.network import ModelConfig
from retrieval.model.preprocess import Preprocessor


def _twelve_bit(lesion: int) -> np.ndarray:
    """A 12-bit image (noisy background, a bright marker up to 3000) with a lesion region."""
    rng = np.random.default_rng(0)
    a = np.clip(rng.normal(1200, 40, (96, 96)), 0, 4095).astype(np.uint16)
    a[5:15, 5:15] = 3000
    a[30:60, 30:60] = lesion
    return a


def test_12_bit_png_lesion_difference_survives_the_uint8_cache(tmp_path):
    Image.fromarray(_twelve_bit(1000)).save(tmp_path / "a.png")
    Image.fromarray(_twelve_bit(1060)).save(tmp_path / "b.png")  # 60 of 4095 brighter
    ia, ib = read_image(tmp_path / "a.png"), read_image(tmp_path / "b.png")
    assert ia.meta["bit_depth"] == ib.meta["bit_depth"] == 12
    assert ia.pixels[40, 40, 0] == pytest.approx(1000 / 4095, abs=1e-6)
    pre = Preprocessor(ModelConfig(classes=["a", "b"], in_channels=1, image_size=96))
    ua, ub = pre.to_uint8(ia).numpy(), pre.to_uint8(ib).numpy()
    diff = ub[0, 35:55, 35:55].astype(int) - ua[0, 35:55, 35:55].astype(int)
    assert (diff >= 3).all() and (diff <= 5).all()  # 60 / 4095 * 255 = 3.7 levels
    np.testing.assert_array_equal(ua[0, 70:, 70:], ub[0, 70:, 70:])  # background unchanged
    # the background noise (sd 40 of 4095) keeps its grey levels (3 when divided by 65535)
    assert len(np.unique(ua[0, 70:, 70:])) > 15


@pytest.mark.parametrize(
    ("max_value", "bits"),
    [(200, 8), (255, 8), (256, 10), (1023, 10), (1024, 12), (4095, 12), (4096, 14), (65535, 16)],
)
def test_container_bit_depth(tmp_path, max_value, bits):
    assert container_bit_depth(max_value) == bits
    arr = np.linspace(0, max_value, 64 * 16).reshape(16, 64).round().astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "x.png")
    img = read_image(tmp_path / "x.png")
    assert img.meta["bit_depth"] == bits
    assert img.pixels.max() == pytest.approx(max_value / (2**bits - 1), abs=1e-6)


def test_mode_I_and_tifffile_follow_the_same_rule():
    arr = _twelve_bit(1000)
    pil_i = Image.fromarray(arr.astype(np.int32))  # mode "I"
    assert pil_i.mode == "I"
    from_i = read_image(pil_i)
    from_png = read_image(_png_bytes(arr))
    np.testing.assert_allclose(from_i.pixels, from_png.pixels, atol=1e-7)
    assert from_i.meta["bit_depth"] == 12

    # the tifffile fallback (for TIFFs Pillow cannot open) scales as Pillow does
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr)
    tif = _read_tifffile(buf.getvalue(), "x.tif", 10**8, first_error=OSError("pillow"))
    assert tif.meta["reader"] == "tifffile"
    np.testing.assert_allclose(tif.pixels, from_png.pixels, atol=1e-7)


def test_full_range_16_bit_and_negative_mode_I_unchanged():
    g16 = (np.arange(256, dtype=np.uint16) * 257)[None].repeat(4, 0)
    img = read_image(_png_bytes(g16))
    assert img.meta["bit_depth"] == 16
    np.testing.assert_allclose(img.pixels[0, :, 0], np.arange(256) / 255.0, atol=1e-6)
    neg = Image.fromarray(np.array([[-100, 0], [50, 100]], np.int32))
    np.testing.assert_allclose(read_image(neg).pixels[..., 0], [[0, 0.5], [0.75, 1.0]])


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()
