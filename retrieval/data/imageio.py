"""Reading medical and natural images into one normalised form.

Everything that turns a file (or an upload) into pixels goes through
:func:`read_image`, which returns a :class:`LoadedImage`: ``float32`` pixels of
shape ``(H, W, C)`` with ``C`` 1 (grayscale) or 3 (RGB), values in ``[0, 1]``,
always finite.

Formats (sniffed from content first, the file extension only as a hint):

* **DICOM** (``DICM`` at offset 128, or a ``.dcm`` / headerless file that
  pydicom can parse with ``force=True``): Modality LUT or Rescale
  Slope/Intercept, then the VOI LUT or Window Center/Width (first view), or,
  without either, a robust 0.5–99.5 percentile window of the values;
  MONOCHROME1 is inverted so that bright always means dense; multi-frame
  data gives the middle frame (``meta["frame_index"]``); YBR is converted to
  RGB; compressed transfer syntaxes use the installed decoders (pylibjpeg,
  openjpeg, gdcm, RLE).
* **PNG / JPEG / TIFF / BMP / GIF / WebP** via Pillow (tifffile as a fallback
  for TIFFs Pillow cannot open): 8-bit grayscale divided by 255, 16-bit grayscale by
  its bit depth's maximum (``2**b - 1``, b the smallest of 8/10/12/14/16 bits that holds
  the image's largest value, see :func:`_scale_by_bit_depth`), palette / LA / RGBA / CMYK
  converted (alpha dropped), EXIF orientation applied.
* **NPY** (``np.load(allow_pickle=False)``): 2-D, ``HxWx1``, ``HxWx3`` (or
  channel-first ``1xHxW`` / ``3xHxW``); ``uint8`` is divided by 255, floats
  already within ``[0, 1]`` are kept, anything else is min–max scaled.

Every failure raises :class:`~retrieval.errors.ImageReadError` naming the file
and the reason; no pydicom / Pillow / numpy exception escapes.

Only non-identifying facts go into ``meta`` (format, photometric
interpretation, transfer syntax, frame count, windowing used); never a name,
an ID or a date.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import ImageReadError

__all__ = [
    "LoadedImage",
    "load_note",
    "read_image",
    "read_mask",
    "to_uint8_rgb",
    "sniff_format",
]

DEFAULT_MAX_PIXELS = 100_000_000

_PIL_LOCK = threading.Lock()


@dataclass
class LoadedImage:
    """An image as the rest of casebase sees it."""

    pixels: np.ndarray  # float32 (H, W, C), C in {1, 3}, values in [0, 1], finite
    original_size: tuple[int, int]  # (H, W) as read, before any resize
    source: str  # file path, or "<array>" / "<bytes>" / "<PIL image>"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def channels(self) -> int:
        return int(self.pixels.shape[2])


# --------------------------------------------------------------------------- sniffing

_EXT_HINT = {
    ".dcm": "dicom",
    ".dicom": "dicom",
    ".dic": "dicom",
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".npy": "npy",
    ".bmp": "bmp",
    ".gif": "gif",
    ".webp": "webp",
}


def sniff_format(head: bytes) -> str | None:
    """Name the format of a file from its first bytes (at least 132), or None."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:2] == b"PK":
        return "npz"
    return None


def _looks_like_headerless_dicom(head: bytes) -> bool:
    """A DICOM stream without preamble starts with a group 0x0002 / 0x0008 tag."""
    if len(head) < 8:
        return False
    group_le = int.from_bytes(head[0:2], "little")
    group_be = int.from_bytes(head[0:2], "big")
    return group_le in (0x0002, 0x0008) or group_be in (0x0002, 0x0008)


# --------------------------------------------------------------------------- helpers


def _normalise_array(arr: np.ndarray, source: str) -> tuple[np.ndarray, str]:
    """Scale a numeric array to float32 [0, 1]; returns (array, scaling used)."""
    if arr.dtype == np.bool_:
        return arr.astype(np.float32), "bool"
    if arr.dtype.kind not in "biuf":
        raise ImageReadError(source, f"unsupported array dtype {arr.dtype} (need numbers)")
    if arr.size == 0:
        raise ImageReadError(source, "the image has no pixels (zero-sized array)")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        n_bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ImageReadError(source, f"the array holds {n_bad} NaN/inf values")
    if arr.dtype == np.uint8:
        return (arr.astype(np.float32) / 255.0), "uint8/255"
    a = arr.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    if arr.dtype.kind == "f" and lo >= 0.0 and hi <= 1.0:
        return a.astype(np.float32), "as-is"
    if hi <= lo:
        return np.zeros(a.shape, np.float32), "constant"
    return ((a - lo) / (hi - lo)).astype(np.float32), "min-max"


CONTAINER_BITS = (8, 10, 12, 14, 16)


def container_bit_depth(max_value: int) -> int:
    """The smallest standard bit depth (8, 10, 12, 14, 16) that holds ``max_value``."""
    for bits in CONTAINER_BITS:
        if max_value <= 2**bits - 1:
            return bits
    return 16


def _scale_by_bit_depth(raw: np.ndarray) -> tuple[np.ndarray, int]:
    """Grayscale integers in 0..65535 -> float32 [0, 1] divided by their bit depth's maximum.

    Why: scanners store 10-, 12- or 14-bit data in 16-bit PNG / TIFF containers, most
    without a usable sBIT chunk (Pillow does not expose it, and a conformant sBIT means the
    samples were already scaled to 16 bits). Dividing 12-bit data by 65535 leaves it in
    [0, 0.0625], which the uint8 cache of training and indexing rounds to about 16 grey
    levels. Dividing by 2**b - 1, b the smallest of 8/10/12/14/16 bits holding the image's
    maximum, keeps every level and, unlike per-image min-max, scales every image of a data
    set of one bit depth alike. Limit: an image of a 12-bit set whose maximum is below
    1024 (a nearly black image) is read as 10-bit, i.e. 4x brighter than its siblings.
    """
    bits = container_bit_depth(int(raw.max()))
    return (raw.astype(np.float32) / np.float32(2**bits - 1)), bits


def _to_hwc(arr: np.ndarray, source: str) -> np.ndarray:
    """Bring a 2-D / 3-D array into (H, W, C) with C in {1, 3}."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        return arr[:, :, None]
    if arr.ndim == 3:
        if arr.shape[2] in (1, 3):
            return arr
        if arr.shape[2] == 4:
            return arr[:, :, :3]  # drop alpha
        if arr.shape[2] == 2:
            return arr[:, :, :1]  # gray + alpha
        if arr.shape[0] in (1, 3) and arr.shape[2] > 4:
            return np.moveaxis(arr, 0, -1)
    raise ImageReadError(
        source, f"unsupported array shape {tuple(arr.shape)} (need HxW, HxWx1, HxWx3 or 1/3xHxW)"
    )


def _finish(pixels: np.ndarray, source: str, meta: dict[str, Any]) -> LoadedImage:
    pixels = np.ascontiguousarray(pixels, dtype=np.float32)
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3):
        raise ImageReadError(source, f"internal: unexpected pixel shape {pixels.shape}")
    if pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise ImageReadError(source, "the image has no pixels (zero width or height)")
    if not np.all(np.isfinite(pixels)):
        raise ImageReadError(source, "the image holds NaN/inf values")
    np.clip(pixels, 0.0, 1.0, out=pixels)
    return LoadedImage(
        pixels=pixels,
        original_size=(int(pixels.shape[0]), int(pixels.shape[1])),
        source=source,
        meta=meta,
    )


def _check_pixels(h: int, w: int, max_pixels: int, source: str) -> None:
    if h <= 0 or w <= 0:
        raise ImageReadError(source, f"the image declares an empty size ({w}x{h})")
    if h * w > max_pixels:
        raise ImageReadError(
            source,
            f"decompression bomb refused: the image declares {w}x{h} = {w * h:,} pixels "
            f"(limit {max_pixels:,})",
        )


# --------------------------------------------------------------------------- NPY


def _read_npy(data: bytes, source: str, max_pixels: int) -> LoadedImage:
    try:
        fobj = io.BytesIO(data)
        version = np.lib.format.read_magic(fobj)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fobj)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(fobj)
    except Exception as err:  # noqa: BLE001
        raise ImageReadError(source, f"corrupt NPY header ({err})") from None
    if dtype.hasobject:
        raise ImageReadError(source, "NPY holds pickled Python objects; refusing to unpickle")
    if len(shape) >= 2:
        h, w = (
            (shape[1], shape[2])
            if len(shape) == 3 and shape[0] in (1, 3) and shape[2] > 4
            else shape[:2]
        )
        _check_pixels(int(h), int(w), max_pixels, source)
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as err:
        msg = str(err)
        if "pickle" in msg.lower():
            raise ImageReadError(
                source, "NPY holds pickled Python objects; refusing to unpickle"
            ) from None
        raise ImageReadError(source, f"truncated or corrupt NPY data ({msg})") from None
    except Exception as err:  # noqa: BLE001
        raise ImageReadError(source, f"truncated or corrupt NPY data ({err})") from None
    return _from_array(arr, source, {"format": "npy"}, max_pixels)


def _from_array(arr: np.ndarray, source: str, meta: dict[str, Any], max_pixels: int) -> LoadedImage:
    arr = np.asarray(arr)
    if arr.ndim not in (2, 3):
        raise ImageReadError(
            source,
            f"unsupported array shape {tuple(arr.shape)} (need HxW, HxWx1, HxWx3 or 1/3xHxW)",
        )
    arr = _to_hwc(arr, source)
    _check_pixels(int(arr.shape[0]), int(arr.shape[1]), max_pixels, source)
    pixels, scaling = _normalise_array(arr, source)
    meta = dict(meta)
    meta.setdefault("scaling", scaling)
    return _finish(pixels, source, meta)


# --------------------------------------------------------------------------- Pillow


def _pil_open(fobj, source: str, max_pixels: int):
    from PIL import Image

    with _PIL_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max(int(max_pixels), 1)
        try:
            img = Image.open(fobj)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageReadError(source, f"decompression bomb refused ({err})") from None
        finally:
            Image.MAX_IMAGE_PIXELS = old
    return img


def _pil_to_array(img, source: str, max_pixels: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode a PIL image to (H, W, C) float32 in [0, 1]."""
    from PIL import Image, ImageOps

    w, h = img.size
    _check_pixels(int(h), int(w), max_pixels, source)
    meta: dict[str, Any] = {"format": (img.format or "pil").lower(), "mode": img.mode}
    n_frames = int(getattr(img, "n_frames", 1) or 1)
    if n_frames > 1:
        meta["frames"] = n_frames
        meta["frame_index"] = 0
        meta["note"] = "multi-page image: first page used"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            try:
                img = ImageOps.exif_transpose(img) or img
            except Exception:  # noqa: BLE001 - a broken EXIF block is not worth failing for
                pass
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageReadError(source, f"decompression bomb refused ({err})") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError) as err:
        raise ImageReadError(source, f"truncated or corrupt pixel data ({err})") from None

    mode = img.mode
    if mode == "1":
        arr = np.asarray(img, dtype=np.float32)[:, :, None]
        return arr, meta
    if mode in ("L",):
        return (np.asarray(img, dtype=np.float32) / 255.0)[:, :, None], meta
    if mode == "LA":
        return (np.asarray(img.getchannel("L"), dtype=np.float32) / 255.0)[:, :, None], meta
    if mode.startswith("I;16") or mode == "I":
        raw = np.asarray(img)
        if raw.size and int(raw.min()) >= 0 and int(raw.max()) <= 65535:
            pixels, meta["bit_depth"] = _scale_by_bit_depth(raw)
            meta["scaling"] = f"/{2 ** meta['bit_depth'] - 1}"
            return pixels[:, :, None], meta
        pixels, meta["scaling"] = _normalise_array(raw, source)
        return pixels[:, :, None], meta
    if mode == "F":
        pixels, meta["scaling"] = _normalise_array(np.asarray(img), source)
        return pixels[:, :, None], meta
    if mode == "RGB":
        return np.asarray(img, dtype=np.float32) / 255.0, meta
    if mode in ("RGBA", "RGBa", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "La"):
        if mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0, meta
    if mode.startswith(("I;", "BGR")):
        return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0, meta
    raise ImageReadError(source, f"unsupported image mode {mode!r}")


def _read_pil(data: bytes, source: str, fmt: str, max_pixels: int) -> LoadedImage:
    from PIL import UnidentifiedImageError

    try:
        img = _pil_open(io.BytesIO(data), source, max_pixels)
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        if fmt == "tiff":
            return _read_tifffile(data, source, max_pixels, first_error=err)
        raise ImageReadError(source, f"corrupt {fmt.upper()} file ({err})") from None
    try:
        arr, meta = _pil_to_array(img, source, max_pixels)
    except ImageReadError as err:
        if fmt == "tiff" and "unsupported image mode" in err.reason:
            return _read_tifffile(data, source, max_pixels, first_error=err)
        raise
    return _finish(arr, source, meta)


def _read_tifffile(
    data: bytes, source: str, max_pixels: int, first_error: Exception
) -> LoadedImage:
    try:
        import tifffile
    except ImportError:  # pragma: no cover
        raise ImageReadError(source, f"corrupt TIFF file ({first_error})") from None
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages[0]
            shape = page.shape
            if len(shape) >= 2:
                _check_pixels(int(shape[0]), int(shape[1]), max_pixels, source)
            arr = page.asarray()
    except ImageReadError:
        raise
    except Exception as err:  # noqa: BLE001
        raise ImageReadError(source, f"corrupt TIFF file ({err})") from None
    meta: dict[str, Any] = {"format": "tiff", "reader": "tifffile"}
    if arr.dtype in (np.uint16, np.uint32) and arr.ndim == 2 and arr.size and arr.max() <= 65535:
        # the same rule as Pillow's 16-bit grayscale: a TIFF scales alike whichever reader opens it
        pixels, meta["bit_depth"] = _scale_by_bit_depth(arr)
        meta["scaling"] = f"/{2 ** meta['bit_depth'] - 1}"
        return _finish(pixels[:, :, None], source, meta)
    return _from_array(arr, source, meta, max_pixels)


# --------------------------------------------------------------------------- DICOM


def _dcmread(fobj, source: str, *, force: bool, stop_before_pixels: bool = False):
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(fobj, force=force, stop_before_pixels=stop_before_pixels)
    except Exception as err:  # noqa: BLE001 - pydicom raises many kinds
        raise ImageReadError(
            source, f"not a readable DICOM file ({type(err).__name__}: {err})"
        ) from None


def _first(value: Any) -> float:
    try:
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = value[0]
        return float(value)
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"not a number: {value!r}") from None


def _window(arr: np.ndarray, center: float, width: float, func: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing straight to [0, 1]."""
    func = (func or "LINEAR").upper()
    if func == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (arr - center) / width))
    if func == "LINEAR_EXACT":
        return np.clip((arr - (center - width / 2.0)) / width, 0.0, 1.0)
    c, w = center - 0.5, max(width - 1.0, 1e-6)
    return np.clip((arr - c) / w + 0.5, 0.0, 1.0)


def _robust_window(arr: np.ndarray) -> tuple[np.ndarray, float, float]:
    lo, hi = np.percentile(arr, [0.5, 99.5])
    lo, hi = float(lo), float(hi)
    if hi <= lo:
        lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros_like(arr), lo, hi
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0), lo, hi


def _dicom_pixels(ds, source: str, max_pixels: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode the middle frame of a parsed dataset into (H, W, C) [0, 1]."""
    from pydicom.pixels import apply_modality_lut, apply_voi, pixel_array

    meta: dict[str, Any] = {"format": "dicom"}
    tsuid = None
    fm = getattr(ds, "file_meta", None)
    if fm is not None:
        tsuid = fm.get("TransferSyntaxUID", None)
    if tsuid is None:
        # headerless / meta-less: pydicom guessed the encoding while reading
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

        implicit = getattr(ds, "is_implicit_VR", None)
        if implicit is None:
            implicit = getattr(ds, "original_encoding", (True, True))[0]
        tsuid = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        if fm is None:
            from pydicom.dataset import FileMetaDataset

            ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = tsuid
    meta["transfer_syntax"] = str(tsuid)
    try:
        meta["transfer_syntax_name"] = tsuid.name
    except Exception:  # noqa: BLE001
        pass

    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageReadError(source, "no pixel data in this DICOM file")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise ImageReadError(source, "DICOM file lacks valid Rows/Columns") from None
    _check_pixels(rows, cols, max_pixels, source)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    meta["photometric"] = photometric or "UNKNOWN"
    try:
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        n_frames = 1
    n_frames = max(n_frames, 1)
    meta["frames"] = n_frames
    index = n_frames // 2
    if n_frames > 1:
        meta["frame_index"] = index
        meta["note"] = f"multi-frame DICOM: middle frame {index} of {n_frames} used"

    ts = ds.file_meta.TransferSyntaxUID
    try:
        from pydicom.pixels import get_decoder

        get_decoder(ts)
    except NotImplementedError:
        raise ImageReadError(
            source, f"unsupported transfer syntax {ts} ({getattr(ts, 'name', 'unknown')})"
        ) from None
    except Exception:  # noqa: BLE001 - let decoding report
        pass

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = pixel_array(ds, index=index if n_frames > 1 else None)
    except ImageReadError:
        raise
    except MemoryError:
        raise ImageReadError(source, "pixel data too large to decode in memory") from None
    except Exception as err:  # noqa: BLE001 - pydicom / plugins raise many kinds
        msg = " ".join(str(err).split())
        low = msg.lower()
        if (
            "plugin" in low
            or "decoder" in low
            or "not supported" in low
            or "does not support" in low
        ):
            raise ImageReadError(
                source,
                f"cannot decode transfer syntax {ts} ({getattr(ts, 'name', 'unknown')}): {msg[:400]}",
            ) from None
        if "less than expected" in low or "truncat" in low or "end of file" in low or "eof" in low:
            raise ImageReadError(source, f"truncated pixel data ({msg[:300]})") from None
        raise ImageReadError(
            source, f"corrupt DICOM pixel data or image header ({type(err).__name__}: {msg[:300]})"
        ) from None

    arr = np.asarray(arr)
    if n_frames > 1 and arr.ndim >= 3 and arr.shape[0] == n_frames and arr.shape[0] != rows:
        arr = arr[index]
    spp = int(ds.get("SamplesPerPixel", 1) or 1)

    if spp >= 3 or arr.ndim == 3:
        # colour: pixel_array already converted YBR to RGB
        if arr.ndim == 2:
            arr = arr[:, :, None]
        arr = _to_hwc(arr, source)
        if photometric == "PALETTE COLOR":
            meta["photometric"] = photometric
        bits = int(ds.get("BitsStored", 8) or 8)
        if arr.dtype.kind in "ui" and arr.max(initial=0) <= 2**bits - 1 and arr.min(initial=0) >= 0:
            pixels = arr.astype(np.float32) / float(2**bits - 1)
            meta["window"] = f"0..{2**bits - 1}"
        else:
            pixels, meta["window"] = _normalise_array(arr, source)
        return pixels, meta

    if photometric == "PALETTE COLOR":
        try:
            from pydicom.pixels import apply_color_lut

            rgb = apply_color_lut(arr, ds)
            bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
            return rgb.astype(np.float32) / float(2**bits - 1), meta
        except Exception as err:  # noqa: BLE001
            raise ImageReadError(
                source, f"cannot apply the palette colour LUT ({_short(err)})"
            ) from None

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = apply_modality_lut(arr, ds)
    except Exception as err:  # noqa: BLE001
        raise ImageReadError(source, f"invalid Modality LUT / rescale ({_short(err)})") from None
    values = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ImageReadError(source, "pixel values are NaN/inf after the modality LUT")

    out = None
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence or []) > 0:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lut_out = np.asarray(apply_voi(values, ds), dtype=np.float64)
            item = ds.VOILUTSequence[0]
            nbits = int(item.LUTDescriptor[2])
            top = float(2**nbits - 1) if 1 <= nbits <= 16 else float(lut_out.max() or 1.0)
            if lut_out.max() > top:
                top = float(lut_out.max())
            out = lut_out / top if top > 0 else lut_out
            meta["window"] = "VOI LUT"
        except Exception:  # noqa: BLE001 - fall back to window / robust range
            out = None
    if out is None and "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            center = _first(ds.WindowCenter)
            width = _first(ds.WindowWidth)
            if width > 0 and np.isfinite(center) and np.isfinite(width):
                out = _window(values, center, width, str(ds.get("VOILUTFunction", "LINEAR")))
                meta["window"] = f"C{center:g}/W{width:g}"
        except (ValueError, TypeError):
            out = None
    if out is None:
        out, lo, hi = _robust_window(values)
        meta["window"] = f"robust 0.5-99.5% [{lo:g}, {hi:g}]"
    out = np.clip(out, 0.0, 1.0)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
        meta["inverted"] = True
    return out.astype(np.float32)[:, :, None], meta


def _short(err: BaseException) -> str:
    msg = str(err).strip().splitlines()
    text = msg[0] if msg else ""
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__


NOT_DICOM = "not a DICOM file (no DICM header and no DICOM elements)"


def _has_dicom_elements(ds) -> bool:
    """Whether a dataset read with ``force=True`` holds any file meta or standard DICOM element
    (a headerless DICOM stream does; junk parsed into made-up tags does not)."""
    from pydicom.datadict import dictionary_has_tag

    fm = getattr(ds, "file_meta", None)
    if fm is not None and len(fm) > 0:
        return True
    try:
        return any(dictionary_has_tag(tag) for tag in ds.keys())
    except Exception:  # noqa: BLE001 - an unparseable tag list is no DICOM either
        return False


def _read_dicom(fobj, source: str, max_pixels: int, *, force: bool) -> LoadedImage:
    ds = _dcmread(fobj, source, force=force)
    if force and len(ds) == 0:
        raise ImageReadError(source, "not a DICOM/PNG/JPEG/TIFF/NPY file")
    if force and not _has_dicom_elements(ds):
        # dcmread(force=True) parses any bytes into "elements" of made-up tags: a text file
        # named x.dcm is not a DICOM file without pixel data, it is no DICOM file at all
        raise ImageReadError(source, NOT_DICOM)
    pixels, meta = _dicom_pixels(ds, source, max_pixels)
    return _finish(pixels, source, meta)


# --------------------------------------------------------------------------- entry points

_NOT_AN_IMAGE = "not a DICOM/PNG/JPEG/TIFF/NPY file"


def _read_bytes(data: bytes, source: str, ext: str, max_pixels: int) -> LoadedImage:
    if len(data) == 0:
        raise ImageReadError(source, "empty file")
    fmt = sniff_format(data[:132])
    hint = _EXT_HINT.get(ext)
    if fmt == "dicom":
        return _read_dicom(io.BytesIO(data), source, max_pixels, force=False)
    if fmt == "npy":
        return _read_npy(data, source, max_pixels)
    if fmt == "npz":
        raise ImageReadError(source, "NPZ archives are not supported (save one array with np.save)")
    if fmt is not None:
        return _read_pil(data, source, fmt, max_pixels)
    # no magic: maybe a DICOM without preamble, or a format only Pillow knows
    if hint == "dicom" or _looks_like_headerless_dicom(data[:8]):
        try:
            return _read_dicom(io.BytesIO(data), source, max_pixels, force=True)
        except ImageReadError as err:
            if hint == "dicom" or "pixel" in err.reason or "transfer syntax" in err.reason:
                if err.reason == _NOT_AN_IMAGE:
                    raise ImageReadError(
                        source, f"{_NOT_AN_IMAGE} (named {ext} but holds no DICOM data)"
                    ) from None
                if "not a readable DICOM" in err.reason:
                    raise ImageReadError(source, f"{_NOT_AN_IMAGE} ({err.reason})") from None
                raise
    try:
        from PIL import UnidentifiedImageError

        img = _pil_open(io.BytesIO(data), source, max_pixels)
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        what = f" (named {ext} but its content is not an image)" if hint else ""
        raise ImageReadError(source, _NOT_AN_IMAGE + what) from None
    arr, meta = _pil_to_array(img, source, max_pixels)
    return _finish(arr, source, meta)


def read_image(src: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Read ``src`` (path, ndarray, bytes, PIL image or pydicom Dataset) into a LoadedImage.

    Raises :class:`ImageReadError` with a specific reason on any failure.
    ``max_pixels`` bounds the declared width x height (checked before decoding).
    """
    with warnings.catch_warnings():
        # pydicom / Pillow warn about every odd header value; the reasons that
        # matter come back as ImageReadError instead
        warnings.simplefilter("ignore")
        try:
            return _read_image(src, max_pixels)
        except ImageReadError:
            raise
        except MemoryError:
            raise ImageReadError(_source_name(src), "image too large to decode in memory") from None
        except Exception as err:  # noqa: BLE001 - last line of defence: never a library exception
            msg = " ".join(str(err).split())[:300]
            raise ImageReadError(
                _source_name(src), f"corrupt or unsupported image ({type(err).__name__}: {msg})"
            ) from None


def _source_name(src: Any) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, np.ndarray):
        return "<array>"
    if isinstance(src, (bytes, bytearray, memoryview)):
        return "<bytes>"
    return str(getattr(src, "name", None) or f"<{type(src).__name__}>")


def _read_image(src: Any, max_pixels: int) -> LoadedImage:
    if isinstance(src, LoadedImage):
        return src
    if isinstance(src, np.ndarray):
        return _from_array(src, "<array>", {"format": "array"}, max_pixels)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _read_bytes(bytes(src), "<bytes>", "", max_pixels)
    try:
        from PIL import Image

        if isinstance(src, Image.Image):
            arr, meta = _pil_to_array(src, "<PIL image>", max_pixels)
            return _finish(arr, "<PIL image>", meta)
    except ImportError:  # pragma: no cover
        pass
    try:
        from pydicom.dataset import Dataset

        if isinstance(src, Dataset):
            pixels, meta = _dicom_pixels(src, "<dataset>", max_pixels)
            return _finish(pixels, "<dataset>", meta)
    except ImportError:  # pragma: no cover
        pass
    if hasattr(src, "read") and not isinstance(src, (str, os.PathLike)):
        name = str(getattr(src, "name", "<stream>"))
        try:
            data = src.read()
        except Exception as err:  # noqa: BLE001
            raise ImageReadError(name, f"cannot read the stream ({err})") from None
        return _read_bytes(bytes(data), name, Path(name).suffix.lower(), max_pixels)
    if not isinstance(src, (str, os.PathLike)):
        raise ImageReadError(repr(src)[:80], f"cannot read an image from a {type(src).__name__}")

    path = Path(src)
    source = str(path)
    try:
        if not path.exists():
            raise ImageReadError(source, "file not found")
        if _is_volume(path):
            return _volume_middle_slice(path, source)
        if path.is_dir():
            raise ImageReadError(source, "is a directory, not an image file")
        data = path.read_bytes()
    except ImageReadError:
        raise
    except PermissionError:
        raise ImageReadError(source, "permission denied") from None
    except OSError as err:
        raise ImageReadError(source, f"cannot read the file ({err.strerror or err})") from None
    return _read_bytes(data, source, path.suffix.lower(), max_pixels)


def _is_volume(path: Path) -> bool:
    from retrieval.data.volume import volume_kind

    kind = volume_kind(path)
    if kind == "dicom-series":  # a folder is a volume only when it holds DICOM files
        from retrieval.data.dicom_ingest import is_dicom_file

        try:
            return any(f.is_file() and is_dicom_file(f) for f in path.iterdir())
        except OSError:
            return False
    return kind is not None


def _volume_middle_slice(path: Path, source: str) -> LoadedImage:
    """A volume (see retrieval.data.volume) read as its middle axial slice, for 2-D code."""
    from retrieval.data.volume import VolumeError, read_volume

    try:
        vol = read_volume(path)
    except VolumeError as err:
        reason = str(err).removeprefix(f"{path}: ")
        if path.is_dir():
            reason = f"is a directory, not an image file, nor one usable DICOM series ({reason})"
        raise ImageReadError(source, reason) from None
    return volume_middle_slice(vol, source)


def volume_middle_slice(vol, source: str) -> LoadedImage:
    """A read :class:`~retrieval.data.volume.Volume`'s middle axial slice as a 2-D image (what
    a 2-D model reads of a volume), without reading the volume again."""
    k = vol.shape[0] // 2
    meta = {
        "format": vol.meta.get("format", "volume"),
        "volume_shape": list(vol.shape),
        "slice_index": k,
        "spacing": list(vol.spacing),
        "modality": vol.modality,
        "note": f"volume: middle axial slice {k} of {vol.shape[0]} used (a 2-D model sees one slice)",
    }
    return _finish(vol.array[k][:, :, None], source, meta)


def load_note(image: Any) -> str | None:
    """What a reader should know about how ``image`` (a LoadedImage) was read, or None: the
    middle frame of a multi-frame DICOM, the first page of a multi-page TIFF, the middle slice
    of a volume read for a 2-D model (``meta["note"]``)."""
    meta = getattr(image, "meta", None)
    note = meta.get("note") if isinstance(meta, dict) else None
    return str(note) if note else None


def read_mask(path: Any, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a binary region-of-interest mask as a bool (H, W) array.

    Any non-zero pixel (any channel) is inside the mask; float masks in [0, 1]
    are thresholded at 0.5. ``expected_size`` is the (H, W) of the image the
    mask belongs to; a different geometry raises :class:`ImageReadError`.
    """
    source = str(path) if isinstance(path, (str, os.PathLike)) else "<mask>"
    mask: np.ndarray | None = None
    if isinstance(path, np.ndarray):
        raw = path
        mask = _binarise(raw, source)
    else:
        data: bytes | None = None
        if isinstance(path, (str, os.PathLike)):
            p = Path(path)
            if not p.exists():
                raise ImageReadError(source, "mask file not found")
            if p.is_dir():
                raise ImageReadError(source, "is a directory, not a mask file")
            try:
                data = p.read_bytes()
            except OSError as err:
                raise ImageReadError(
                    source, f"cannot read the mask ({err.strerror or err})"
                ) from None
        elif isinstance(path, (bytes, bytearray)):
            data = bytes(path)
        if data is not None:
            if not data:
                raise ImageReadError(source, "empty mask file")
            fmt = sniff_format(data[:132])
            if fmt in ("png", "tiff", "bmp", "gif", "jpeg", "webp"):
                from PIL import UnidentifiedImageError

                try:
                    img = _pil_open(io.BytesIO(data), source, DEFAULT_MAX_PIXELS)
                    w, h = img.size
                    _check_pixels(h, w, DEFAULT_MAX_PIXELS, source)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        img.load()
                    if img.mode == "P":
                        img = img.convert("RGB")
                    raw = np.asarray(img)
                except ImageReadError:
                    raise
                except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
                    raise ImageReadError(source, f"truncated or corrupt mask ({err})") from None
                if img.mode in ("LA", "RGBA", "PA"):
                    raw = raw[..., :-1]
                if fmt == "jpeg":
                    # lossy: threshold mid-range instead of "non-zero"
                    raw = raw.astype(np.float32) / 255.0
                mask = _binarise(raw, source)
            elif fmt == "npy":
                arr = _read_npy_raw(data, source)
                mask = _binarise(arr, source)
            elif fmt == "dicom" or Path(source).suffix.lower() in (".dcm", ".dicom"):
                from pydicom.pixels import pixel_array

                ds = _dcmread(io.BytesIO(data), source, force=True)
                try:
                    arr = pixel_array(ds)
                except Exception as err:  # noqa: BLE001
                    raise ImageReadError(
                        source, f"truncated or corrupt mask pixel data ({_short(err)})"
                    ) from None
                if arr.ndim == 3 and arr.shape[-1] not in (3, 4):
                    arr = arr[arr.shape[0] // 2]
                mask = _binarise(arr, source)
            else:
                raise ImageReadError(source, "not a PNG/TIFF/NPY/DICOM mask file")
        else:
            img = read_image(path)
            mask = img.pixels.max(axis=2) > 0.5
    assert mask is not None
    if expected_size is not None:
        eh, ew = int(expected_size[0]), int(expected_size[1])
        if mask.shape != (eh, ew):
            raise ImageReadError(
                source,
                f"mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but the image is {ew}x{eh}",
            )
    return mask


def _read_npy_raw(data: bytes, source: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as err:
        if "pickle" in str(err).lower():
            raise ImageReadError(
                source, "NPY holds pickled Python objects; refusing to unpickle"
            ) from None
        raise ImageReadError(source, f"truncated or corrupt NPY data ({err})") from None
    except Exception as err:  # noqa: BLE001
        raise ImageReadError(source, f"truncated or corrupt NPY data ({err})") from None


def _binarise(raw: np.ndarray, source: str) -> np.ndarray:
    raw = np.asarray(raw)
    if raw.ndim == 3:
        if raw.shape[2] in (1, 2, 3, 4):
            raw = raw[:, :, : 3 if raw.shape[2] >= 3 else 1]
        elif raw.shape[0] in (1, 3):
            raw = np.moveaxis(raw, 0, -1)
        else:
            raise ImageReadError(source, f"unsupported mask shape {tuple(raw.shape)}")
    elif raw.ndim != 2:
        raise ImageReadError(source, f"unsupported mask shape {tuple(raw.shape)} (need HxW)")
    if raw.dtype == np.bool_:
        m = raw
    elif raw.dtype.kind == "f":
        if not np.all(np.isfinite(raw)):
            raise ImageReadError(source, "the mask holds NaN/inf values")
        m = raw > 0.5 if raw.max(initial=0) <= 1.0 else raw > 0
    elif raw.dtype.kind in "iu":
        m = raw != 0
    else:
        raise ImageReadError(source, f"unsupported mask dtype {raw.dtype}")
    if m.ndim == 3:
        m = m.any(axis=2)
    return np.ascontiguousarray(m, dtype=bool)


def to_uint8_rgb(pixels: Any) -> np.ndarray:
    """(H, W, 3) uint8 for display, from a LoadedImage, float [0, 1] or uint8 array."""
    if isinstance(pixels, LoadedImage):
        pixels = pixels.pixels
    arr = np.asarray(pixels)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"expected an (H, W[, C]) image, got shape {arr.shape}")
    if arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.shape[2] != 3:
        raise ValueError(f"expected 1, 3 or 4 channels, got {arr.shape[2]}")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    f = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return (np.clip(f, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
