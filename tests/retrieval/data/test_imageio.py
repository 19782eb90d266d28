"""retrieval.data.imageio: every format decodes to (H, W, C) float32 in [0, 1]; every bad input
gives an ImageReadError with a specific reason."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from scipy import ndimage

from retrieval.data.imageio import LoadedImage, read_image, read_mask, to_uint8_rgb
from retrieval.errors import ImageReadError

CORPUS = Path(pydicom.__file__).parent / "data" / "test_files"


def _check(img: LoadedImage, channels: int | None = None) -> None:
    px = img.pixels
    assert isinstance(img, LoadedImage)
    assert px.dtype == np.float32 and px.ndim == 3 and px.shape[2] in (1, 3)
    assert np.isfinite(px).all() and px.min() >= 0.0 and px.max() <= 1.0
    assert img.original_size == px.shape[:2]
    if channels is not None:
        assert px.shape[2] == channels


def _reason(src, **kw) -> str:
    with pytest.raises(ImageReadError) as exc:
        read_image(src, **kw)
    return exc.value.reason


# --------------------------------------------------------------------------- DICOM


def test_every_phantom_dicom_variant_decodes(phantom_dir):
    df = pd.read_csv(phantom_dir / "manifest.csv", dtype=str)
    syntaxes, photometrics, windows = set(), set(), set()
    for rel in df["image"]:
        img = read_image(phantom_dir / rel)
        _check(img, channels=1)
        assert img.original_size == (64, 64)
        assert img.meta["format"] == "dicom"
        syntaxes.add(img.meta["transfer_syntax_name"])
        photometrics.add(img.meta["photometric"])
        windows.add("window" if img.meta["window"].startswith("C") else "robust")
        assert img.pixels.std() > 0.05  # not a blank / saturated decode
    assert photometrics == {"MONOCHROME1", "MONOCHROME2"}
    assert {
        "Explicit VR Little Endian",
        "Implicit VR Little Endian",
        "Deflated Explicit VR Little Endian",
        "RLE Lossless",
        "JPEG 2000 Image Compression (Lossless Only)",
    } <= syntaxes
    assert windows == {"window", "robust"}  # Window Center/Width and the percentile fallback


def test_lesion_brighter_than_surrounding_lung_in_both_photometrics(phantom_dir):
    df = pd.read_csv(phantom_dir / "manifest.csv", dtype=str)
    contrast: dict[str, list[float]] = {"MONOCHROME1": [], "MONOCHROME2": []}
    for _, row in df[df["label"].isin(["nodule", "mass"])].iterrows():
        img = read_image(phantom_dir / row["image"])
        mask = read_mask(phantom_dir / row["mask"], img.original_size)
        ring = ndimage.binary_dilation(mask, iterations=6) & ~mask
        px = img.pixels[:, :, 0]
        lung = np.percentile(px[ring], 20)  # the darkest surroundings: lung, not body
        contrast[img.meta["photometric"]].append(float(px[mask].mean() - lung))
    for photometric, values in contrast.items():
        assert values, photometric
        assert np.median(values) > 0.1, (photometric, values)
        assert min(values) > 0.03, (photometric, values)


def test_decoded_dicom_matches_the_rendered_density(tmp_path):
    """Whatever the photometric, slope/intercept, bits, window and syntax: display ~ density."""
    from retrieval.data import phantom as ph

    cases, patients = ph._plan(30, 3, "none", 0.9, ph.XRAY_CLASSES, ph.SCANNERS)
    seen = set()
    for case in cases:
        patient = patients[case.patient]
        dens, _, _ = ph._xray_image(np.random.default_rng(case.index), case, patient, 64)
        path = tmp_path / f"{case.case_id}.dcm"
        ph._write_dicom(path, dens, case, patient, np.random.default_rng(case.index), "t")
        img = read_image(path)
        corr = np.corrcoef(img.pixels[:, :, 0].ravel(), dens.ravel())[0, 1]
        assert corr > 0.99, (case.case_id, img.meta, corr)
        seen.add(img.meta["photometric"])
    assert seen == {"MONOCHROME1", "MONOCHROME2"}


def test_monochrome1_is_displayed_inverted(phantom_dir):
    """Lungs (air) are dark and the body bright whatever the photometric interpretation."""
    df = pd.read_csv(phantom_dir / "manifest.csv", dtype=str)
    seen = set()
    for rel in df["image"]:
        img = read_image(phantom_dir / rel)
        px = img.pixels[:, :, 0]
        h, w = px.shape
        rows = slice(int(0.35 * h), int(0.55 * h))
        lung = min(  # the lesion sits in one lung only
            np.percentile(px[rows, int(0.25 * w) : int(0.35 * w)], 20),
            np.percentile(px[rows, int(0.65 * w) : int(0.75 * w)], 20),
        )
        spine = px[int(0.75 * h) : int(0.9 * h), int(0.45 * w) : int(0.55 * w)].mean()
        assert spine > lung + 0.1, (rel, img.meta["photometric"], lung, spine)
        seen.add(img.meta["photometric"])
    assert "MONOCHROME1" in seen


def test_pydicom_corpus_variants():
    mr = read_image(CORPUS / "MR_small.dcm")
    _check(mr, channels=1)
    for name in (
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
    ):
        other = read_image(CORPUS / name)
        np.testing.assert_allclose(other.pixels, mr.pixels, atol=1e-6, err_msg=name)
    cr = read_image(CORPUS / "dicomdirtests" / "77654033" / "CR1" / "6154")
    assert cr.meta["photometric"] == "MONOCHROME1" and cr.meta.get("inverted")

    multi = read_image(CORPUS / "examples_ybr_color.dcm")  # 30-frame YBR_FULL_422
    _check(multi, channels=3)
    assert multi.meta["frames"] == 30 and multi.meta["frame_index"] == 15
    assert "middle frame" in multi.meta["note"]

    rgb = read_image(CORPUS / "SC_rgb_jpeg_dcmtk.dcm")  # YBR JPEG -> RGB
    _check(rgb, channels=3)
    palette = read_image(CORPUS / "examples_palette.dcm")
    _check(palette, channels=3)
    ct = read_image(CORPUS / "CT_small.dcm")  # no window: robust percentiles of HU
    assert ct.meta["window"].startswith("robust")


def test_headerless_dicom_and_dataset_and_bytes(tmp_path):
    ds = pydicom.dcmread(CORPUS / "MR_small.dcm")
    ref = read_image(CORPUS / "MR_small.dcm").pixels
    # a raw dataset without preamble / file meta, as some old archives hold
    ds2 = pydicom.dcmread(CORPUS / "MR_small.dcm")
    ds2.preamble = None
    del ds2.file_meta
    path = tmp_path / "raw_no_preamble"
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds2, enforce_file_format=False, implicit_vr=True, little_endian=True)
    path.write_bytes(buf.getvalue())
    assert path.read_bytes()[128:132] != b"DICM"
    np.testing.assert_allclose(read_image(path).pixels, ref, atol=1e-6)
    np.testing.assert_allclose(read_image(ds).pixels, ref, atol=1e-6)
    np.testing.assert_allclose(
        read_image((CORPUS / "MR_small.dcm").read_bytes()).pixels, ref, atol=1e-6
    )


# --------------------------------------------------------------------------- PNG / JPEG / TIFF / NPY


@pytest.fixture()
def gradient() -> np.ndarray:
    return np.tile(np.arange(256, dtype=np.uint8), (32, 1))  # 32 x 256


def test_png_8_and_16_bit(tmp_path, gradient):
    Image.fromarray(gradient).save(tmp_path / "g8.png")
    g8 = read_image(tmp_path / "g8.png")
    _check(g8, channels=1)
    assert g8.original_size == (32, 256)
    np.testing.assert_allclose(g8.pixels[0, :, 0], np.arange(256) / 255.0, atol=1e-6)

    g16 = gradient.astype(np.uint16) * 257  # 0..65535
    Image.fromarray(g16).save(tmp_path / "g16.png")
    img = read_image(tmp_path / "g16.png")
    _check(img, channels=1)
    np.testing.assert_allclose(img.pixels[0, :, 0], np.arange(256) / 255.0, atol=1e-4)

    low = gradient.astype(np.uint16) * 4  # a 16-bit PNG using 10 bits: scaled by 1023
    Image.fromarray(low).save(tmp_path / "low16.png")
    assert read_image(tmp_path / "low16.png").pixels.max() == pytest.approx(1020 / 1023, abs=1e-5)


def test_jpeg_tiff_rgba_palette(tmp_path, gradient):
    rgb = np.stack([gradient, gradient[:, ::-1], np.full_like(gradient, 128)], -1)
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=95)
    jpg = read_image(tmp_path / "c.jpg")
    _check(jpg, channels=3)
    assert np.abs(jpg.pixels * 255 - rgb).mean() < 3

    Image.fromarray(gradient).save(tmp_path / "g.tif")
    _check(read_image(tmp_path / "g.tif"), channels=1)
    Image.fromarray(gradient.astype(np.float32) / 255).save(tmp_path / "f.tif")
    ftif = read_image(tmp_path / "f.tif")
    np.testing.assert_allclose(ftif.pixels[0, :, 0], np.arange(256) / 255.0, atol=1e-6)

    rgba = np.concatenate([rgb, np.zeros_like(gradient)[..., None]], -1)  # fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    a = read_image(tmp_path / "a.png")
    _check(a, channels=3)
    np.testing.assert_allclose(a.pixels * 255, rgb, atol=0.5)  # alpha dropped, colour kept

    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    _check(read_image(tmp_path / "p.png"), channels=3)
    Image.fromarray(gradient).convert("LA").save(tmp_path / "la.png")
    _check(read_image(tmp_path / "la.png"), channels=1)


def test_npy_and_arrays(tmp_path):
    arr = np.linspace(-100, 300, 64 * 32, dtype=np.float64).reshape(64, 32)
    np.save(tmp_path / "x.npy", arr)
    img = read_image(tmp_path / "x.npy")
    _check(img, channels=1)
    assert img.pixels.min() == 0.0 and img.pixels.max() == 1.0
    np.save(tmp_path / "rgb.npy", np.random.default_rng(0).random((8, 9, 3)).astype(np.float32))
    _check(read_image(tmp_path / "rgb.npy"), channels=3)
    np.save(tmp_path / "chw.npy", np.zeros((3, 10, 12), np.uint8))
    assert read_image(tmp_path / "chw.npy").pixels.shape == (10, 12, 3)
    u8 = np.full((5, 6), 51, np.uint8)
    assert read_image(u8).pixels.max() == pytest.approx(0.2)
    assert read_image(u8).source == "<array>"
    assert read_image(Image.fromarray(u8)).pixels.shape == (5, 6, 1)


def test_to_uint8_rgb():
    gray = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4, 1)
    out = to_uint8_rgb(gray)
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    assert out[0, 0, 0] == 0 and out[-1, -1, 2] == 255
    assert to_uint8_rgb(np.zeros((2, 2), np.float32)).shape == (2, 2, 3)


# --------------------------------------------------------------------------- masks


def test_read_mask_values_and_geometry(tmp_path, phantom_dir):
    m = np.zeros((20, 30), np.uint8)
    m[5:10, 5:15] = 1  # a 0/1 PNG: still a mask
    Image.fromarray(m).save(tmp_path / "m01.png")
    mask = read_mask(tmp_path / "m01.png", expected_size=(20, 30))
    assert mask.dtype == bool and mask.sum() == 50
    with pytest.raises(ImageReadError, match="mask is 30x20"):
        read_mask(tmp_path / "m01.png", expected_size=(64, 64))
    with pytest.raises(ImageReadError, match="not found"):
        read_mask(tmp_path / "nope.png")
    df = pd.read_csv(phantom_dir / "manifest.csv", dtype=str)
    for _, row in df.head(10).iterrows():
        size = read_image(phantom_dir / row["image"]).original_size
        assert read_mask(phantom_dir / row["mask"], size).sum() > 10


# --------------------------------------------------------------------------- failures


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_bad_inputs_have_specific_reasons(tmp_path, phantom_dir):
    assert _reason(tmp_path / "missing.dcm") == "file not found"

    (tmp_path / "empty.png").write_bytes(b"")
    assert _reason(tmp_path / "empty.png") == "empty file"

    (tmp_path / "text.png").write_text("this is not an image\n")
    assert "not a DICOM/PNG/JPEG/TIFF/NPY file" in _reason(tmp_path / "text.png")

    # truncated DICOM: cut a phantom file in the middle of its pixel data
    df = pd.read_csv(phantom_dir / "manifest.csv", dtype=str)
    src = next(
        phantom_dir / rel
        for rel in df["image"]
        if pydicom.dcmread(phantom_dir / rel, stop_before_pixels=True).file_meta.TransferSyntaxUID
        == pydicom.uid.ExplicitVRLittleEndian
    )
    data = src.read_bytes()
    (tmp_path / "trunc.dcm").write_bytes(data[: len(data) - 3000])
    assert "truncated" in _reason(tmp_path / "trunc.dcm")
    assert "truncated" in _reason(CORPUS / "MR_truncated.dcm")

    # a 50000 x 50000 PNG that is only a few bytes: refused before decoding
    ihdr = struct.pack(">IIBBBBB", 50000, 50000, 8, 0, 0, 0, 0)
    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )
    (tmp_path / "bomb.png").write_bytes(bomb)
    assert "decompression bomb" in _reason(tmp_path / "bomb.png")
    assert "decompression bomb" in _reason(src, max_pixels=1000)  # DICOM: Rows x Columns

    np.save(tmp_path / "nan.npy", np.array([[0.0, np.nan], [1.0, np.inf]]))
    assert "NaN/inf" in _reason(tmp_path / "nan.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    assert "pickle" in _reason(tmp_path / "obj.npy")
    np.save(tmp_path / "cube.npy", np.zeros((4, 5, 6, 7)))
    assert "shape" in _reason(tmp_path / "cube.npy")

    half = tmp_path / "half.png"
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(good, "PNG")
    half.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    assert "truncated" in _reason(half) or "corrupt" in _reason(half)

    assert "no pixel data" in _reason(CORPUS / "rtplan.dcm")
    assert "directory" in _reason(tmp_path)


def test_unsupported_transfer_syntax_is_named(tmp_path):
    ds = pydicom.dcmread(CORPUS / "MR_small.dcm")
    uid = "1.2.840.10008.1.2.4.100"  # MPEG2 Main Profile: no image decoder
    ds.file_meta.TransferSyntaxUID = uid
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    path = tmp_path / "mpeg.dcm"
    ds.save_as(path, enforce_file_format=True)
    reason = _reason(path)
    assert uid in reason and ("unsupported" in reason or "cannot decode" in reason)


def test_no_raw_library_exception_escapes_on_garbage(tmp_path):
    rng = np.random.default_rng(1)
    headers = [
        b"",
        b"\x89PNG\r\n\x1a\n",
        b"\xff\xd8\xff",
        b"II*\x00",
        b"\x93NUMPY",
        b"\0" * 128 + b"DICM",
        b"\x08\x00\x05\x00CS",
    ]
    for i, head in enumerate(headers):
        for n in (0, 7, 300):
            p = tmp_path / f"g{i}_{n}.bin"
            p.write_bytes(head + rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            with pytest.raises(ImageReadError):
                read_image(p)


# --------------------------------------------------------------------------- not DICOM / notes


def test_a_text_file_named_dcm_is_not_a_dicom_file(tmp_path):
    """dcmread(force=True) parses any bytes into made-up elements: a text file named x.dcm is
    "not a DICOM file", not a DICOM file without pixel data."""
    from retrieval.data.imageio import NOT_DICOM

    (tmp_path / "x.dcm").write_text("hello world\nthis is a text file, not a scan\n")
    (tmp_path / "y.dcm").write_text("patient,label\n1,a\n")
    (tmp_path / "z.dcm").write_bytes(np.random.default_rng(0).bytes(300))
    for name in ("x.dcm", "y.dcm", "z.dcm"):
        reason = _reason(tmp_path / name)
        assert reason == NOT_DICOM, (name, reason)
        assert "no pixel data" not in reason
    # the same bytes as an upload stream named x.dcm
    stream = io.BytesIO((tmp_path / "x.dcm").read_bytes())
    stream.name = "upload.dcm"
    assert _reason(stream) == NOT_DICOM
    # a real DICOM without pixel data still says so
    assert "no pixel data" in _reason(CORPUS / "rtplan.dcm")
    # a real DICOM stream without preamble (headerless) still decodes
    raw = (CORPUS / "MR_small.dcm").read_bytes()
    assert raw[128:132] == b"DICM"
    (tmp_path / "headerless.dcm").write_bytes(raw[132:])
    _check(read_image(tmp_path / "headerless.dcm"), channels=1)


def test_partial_reads_carry_a_load_note(tmp_path):
    from retrieval.data.imageio import load_note

    multi = read_image(CORPUS / "examples_ybr_color.dcm")  # 30 frames
    assert load_note(multi) == "multi-frame DICOM: middle frame 15 of 30 used"
    assert load_note(read_image(CORPUS / "MR_small.dcm")) is None
    pages = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (10, 200)]
    pages[0].save(tmp_path / "two.tif", save_all=True, append_images=pages[1:])
    assert load_note(read_image(tmp_path / "two.tif")) == "multi-page image: first page used"
    vol = np.random.default_rng(0).random((5, 16, 16)).astype(np.float32)
    np.save(tmp_path / "vol.npy", vol)
    note = load_note(read_image(tmp_path / "vol.npy"))
    assert note and "middle axial slice 2 of 5" in note
