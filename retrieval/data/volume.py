"""Volumes (CT / MR series, NIfTI, 3-D arrays) as casebase cases.

Data flow (issue 23; the model side builds on this):

* A manifest row's ``image`` may name a **volume**: a folder holding one DICOM
  series, a ``.nii`` / ``.nii.gz`` file, or a 3-D ``.npy`` array ``(D, H, W)``.
  :func:`is_volume_path` tells a volume from a 2-D image (cheaply: extension,
  folder, NPY header); :func:`read_volume` reads it into a :class:`Volume`.
* ``Volume.array`` is what a model sees: ``float32 (D, H, W)`` in ``[0, 1]``,
  rescale (Modality LUT) and a VOI window applied: the window given to
  :func:`read_volume` (a CT preset name or ``(center, width)``), else the
  file's own (DICOM Window Center/Width, NIfTI ``cal_min``/``cal_max``), else a
  robust 0.5-99.5 percentile window of the values. ``Volume.values`` keeps the
  physical values (HU for CT) so :func:`window` and :func:`resample` can redo it.
* A volume's mask (the manifest's ``mask`` column) is a ``(D, H, W)`` ``.npy``
  (any numeric / bool dtype, non-zero = lesion) or a NIfTI of the same geometry;
  :func:`read_volume_mask` reads it as ``bool (D, H, W)`` in the same orientation.
* :func:`retrieval.data.imageio.read_image` on a volume path returns its middle
  axial slice (``meta["volume_shape"]``, ``meta["slice_index"]``), so 2-D-only
  code (thumbnails, old tools) keeps working; 3-D code calls :func:`read_volume`.

Axis conventions (stated once, used everywhere): ``D`` is the slice axis,
``H`` rows, ``W`` columns; ``spacing`` is ``(z, y, x)`` in mm, in the same order.

* DICOM series: slices ordered by ImagePositionPatient projected on the slice
  normal (row cosines x column cosines), ascending; for a standard axial
  series that is inferior -> superior, rows anterior -> posterior, columns
  patient right -> left (as a viewer shows it). Rows and columns stay as stored.
* NIfTI: reoriented with nibabel to RAS+ (``as_closest_canonical``), then
  ``D`` = S (inferior -> superior), ``H`` = A flipped (anterior -> posterior),
  ``W`` = R flipped (patient right -> left): the same display as the DICOM one.
* ``.npy``: taken as already ``(D, H, W)``; spacing ``(1, 1, 1)`` unless known
  (``meta["spacing_known"]`` says). A ``.npy`` is a volume when it is 3-D and
  neither channel-first ``(1|3, H, W)`` nor narrower than 8 columns (so ``(H, W, C)``
  images with up to 7 channels are never taken for volumes).

Broken series raise :class:`VolumeError` (a :class:`CasebaseError`) with one
clear line: several series in one folder, several orientations, missing
slices, uneven spacing, duplicate positions, slices of different sizes.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import CasebaseError

__all__ = [
    "CT_PRESETS",
    "Volume",
    "VolumeError",
    "is_volume_path",
    "read_volume",
    "read_volume_mask",
    "resample",
    "window",
    "series_from_datasets",
    "series_geometry",
    "volume_kind",
]

# (center, width) in HU: the usual radiology presets
CT_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "soft_tissue": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
_PRESET_ALIASES = {
    "soft-tissue": "soft_tissue",
    "soft": "soft_tissue",
    "mediastinum": "soft_tissue",
}

# relative tolerance on slice gaps: beyond it spacing is "uneven"; about 2x the median gap is a
# missing slice
_GAP_TOL = 0.05
MIN_SLICES = 2


class VolumeError(CasebaseError):
    """A volume (series, NIfTI, array) cannot be used; the message says why in one line."""


@dataclass(frozen=True)
class Volume:
    """A volume as casebase sees it. See the module docstring for the axis conventions."""

    array: np.ndarray  # float32 (D, H, W) in [0, 1]: rescale + VOI window applied
    spacing: tuple[float, float, float]  # (z, y, x) mm
    values: np.ndarray  # float32 (D, H, W): physical values (HU for CT), before the window
    window: tuple[float, float]  # (center, width) used to make ``array`` from ``values``
    modality: str = ""  # "CT", "MR", ... ("" when unknown: NPY, most NIfTI)
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # never a name, an id or a date

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]


# --------------------------------------------------------------------------- detection


def volume_kind(path: str | os.PathLike) -> str | None:
    """``"dicom-series"``, ``"nifti"``, ``"npy"`` for a volume path, else None (cheap)."""
    p = Path(path)
    name = p.name.lower()
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        return "nifti"
    try:
        if p.is_dir():
            return "dicom-series"
    except (OSError, ValueError):  # unreadable, or a NUL in the name
        return None
    if name.endswith(".npy"):
        shape = _npy_shape(p)
        if shape is not None and _is_volume_shape(shape):
            return "npy"
    return None


def is_volume_path(path: str | os.PathLike) -> bool:
    """True when ``path`` names a volume (DICOM series folder, NIfTI, 3-D NPY)."""
    return volume_kind(path) is not None


def _is_volume_shape(shape: tuple[int, ...]) -> bool:
    # (H, W, C) images have C <= 4 channels; 5-7 "channels" stay refused as images, not volumes
    return len(shape) == 3 and shape[0] not in (1, 3) and shape[2] >= 8


def _npy_shape(p: Path) -> tuple[int, ...] | None:
    try:
        with open(p, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _, _ = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, _, _ = np.lib.format.read_array_header_2_0(fh)
        return tuple(int(s) for s in shape)
    except Exception:  # noqa: BLE001 - not an NPY: not a volume
        return None


# --------------------------------------------------------------------------- windowing


def _resolve_window(spec: str | tuple[float, float]) -> tuple[float, float]:
    if isinstance(spec, str):
        key = _PRESET_ALIASES.get(spec.strip().lower(), spec.strip().lower())
        if key not in CT_PRESETS:
            raise VolumeError(
                f"unknown window preset {spec!r} (one of {', '.join(CT_PRESETS)}, "
                "or (center, width))"
            )
        return CT_PRESETS[key]
    try:
        c, w = (float(v) for v in spec)
    except (TypeError, ValueError):
        raise VolumeError(f"a window is a preset name or (center, width), got {spec!r}") from None
    if not (np.isfinite(c) and np.isfinite(w)) or w <= 0:
        raise VolumeError(f"window width must be positive and finite (got center {c}, width {w})")
    return c, w


def _apply_window(values: np.ndarray, win: tuple[float, float]) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 LINEAR window to [0, 1]."""
    c, w = win
    if w <= 1.0:
        return (values > c - 0.5).astype(np.float32)
    out = ((values - (c - 0.5)) / (w - 1.0) + 0.5).astype(np.float32)
    return np.clip(out, 0.0, 1.0, out=out)


def _robust_window(values: np.ndarray) -> tuple[float, float]:
    lo, hi = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return lo, 2.0  # constant volume: everything at 0.5 of a 2-wide window
    return (lo + hi) / 2.0, hi - lo + 1.0


def window(volume: Volume, preset: str | tuple[float, float]) -> Volume:
    """The same volume windowed with a CT preset (lung, soft_tissue, bone, brain) or (c, w)."""
    win = _resolve_window(preset)
    return replace(volume, array=_apply_window(volume.values, win), window=win)


def _make(values, spacing, win, modality, source, meta, override) -> Volume:
    values = np.ascontiguousarray(values, dtype=np.float32)
    if values.ndim != 3 or min(values.shape) < 1:
        raise VolumeError(f"{source}: not a 3-D volume (shape {tuple(values.shape)})")
    if not np.all(np.isfinite(values)):
        raise VolumeError(f"{source}: the volume holds NaN/inf values")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise VolumeError(f"{source}: invalid voxel spacing {spacing} (need 3 positive mm)")
    meta = dict(meta)
    if override is not None:
        win = _resolve_window(override)
        meta["window_source"] = override if isinstance(override, str) else "given"
    elif win is None:
        win = _robust_window(values)
        meta.setdefault("window_source", "percentile")
    else:
        meta.setdefault("window_source", "file")
    return Volume(
        array=_apply_window(values, win),
        spacing=spacing,  # type: ignore[arg-type]
        values=values,
        window=(float(win[0]), float(win[1])),
        modality=modality,
        source=source,
        meta=meta,
    )


# --------------------------------------------------------------------------- resampling


def resample(volume: Volume, spacing: tuple[float, float, float] | float, order: int = 1) -> Volume:
    """The volume resampled to ``spacing`` (z, y, x) mm (a number: isotropic), linear by default.

    The physical extent is kept (output size = round(size * old / new)); the
    window is re-applied to the resampled values. ``order=0`` for label maps.
    """
    from scipy import ndimage

    if np.isscalar(spacing):
        spacing = (float(spacing),) * 3  # type: ignore[assignment]
    new = tuple(float(s) for s in spacing)  # type: ignore[union-attr]
    if len(new) != 3 or not all(np.isfinite(s) and s > 0 for s in new):
        raise VolumeError(f"resample: spacing must be 3 positive mm values (got {spacing})")
    old = volume.spacing
    shape = tuple(
        max(1, int(round(n * o / s))) for n, o, s in zip(volume.shape, old, new, strict=True)
    )
    if shape == volume.shape and np.allclose(old, new):
        return volume
    factors = [t / n for t, n in zip(shape, volume.shape, strict=True)]
    values = ndimage.zoom(volume.values, factors, order=order, mode="nearest", grid_mode=True)
    values = values.astype(np.float32)
    real = tuple(o * n / t for o, n, t in zip(old, volume.shape, values.shape, strict=True))
    meta = dict(volume.meta, resampled_from=list(old))
    return replace(
        volume,
        values=values,
        array=_apply_window(values, volume.window),
        spacing=real,  # type: ignore[arg-type]
        meta=meta,
    )


# --------------------------------------------------------------------------- reading


def read_volume(
    path: str | os.PathLike,
    *,
    window: str | tuple[float, float] | None = None,
    max_voxels: int = 512 * 512 * 2048,
) -> Volume:
    """Read a DICOM series folder, a NIfTI file or a 3-D ``.npy`` into a :class:`Volume`.

    ``window``: a CT preset name or ``(center, width)`` that overrides the
    file's own VOI. Raises :class:`VolumeError` with one line on any problem.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise VolumeError(f"{p}: file not found")
    kind = volume_kind(p)
    if kind == "nifti":
        return _read_nifti(p, window, max_voxels)
    if kind == "dicom-series":
        return _read_series_folder(p, window, max_voxels)
    if p.name.lower().endswith(".npy"):
        return _read_npy_volume(p, window, max_voxels)
    raise VolumeError(
        f"{p}: not a volume (need a DICOM series folder, .nii / .nii.gz, or 3-D .npy)"
    )


def _read_npy_volume(p: Path, win, max_voxels: int) -> Volume:
    shape = _npy_shape(p)
    if shape is None:
        raise VolumeError(f"{p}: corrupt NPY header")
    if not _is_volume_shape(shape):
        raise VolumeError(f"{p}: NPY shape {shape} is not a (D, H, W) volume")
    if int(np.prod(shape)) > max_voxels:
        raise VolumeError(f"{p}: {int(np.prod(shape)):,} voxels exceed the limit {max_voxels:,}")
    try:
        arr = np.load(p, allow_pickle=False)
    except ValueError as err:
        if "pickle" in str(err).lower():
            raise VolumeError(
                f"{p}: NPY holds pickled Python objects; refusing to unpickle"
            ) from None
        raise VolumeError(f"{p}: truncated or corrupt NPY data ({err})") from None
    except OSError as err:
        raise VolumeError(f"{p}: cannot read ({err.strerror or err})") from None
    if arr.dtype.kind not in "biuf":
        raise VolumeError(f"{p}: unsupported array dtype {arr.dtype} (need numbers)")
    if arr.dtype == np.uint8:
        file_win: tuple[float, float] | None = (127.5, 256.0)  # /255 up to the window's rounding
    elif arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and arr.min() >= 0 and arr.max() <= 1:
        file_win = (0.5, 1.0 + 1e-6)  # already in [0, 1]: kept (nearly) as is
    elif arr.dtype == np.bool_:
        file_win = (0.5, 1.0 + 1e-6)
    else:
        file_win = None
    meta = {"format": "npy", "spacing_known": False}
    vol = _make(arr, (1.0, 1.0, 1.0), file_win, "", str(p), meta, win)
    if file_win is not None and win is None and vol.meta["window_source"] == "file":
        # [0, 1] floats and uint8 keep their exact values (no window rounding)
        scale = 255.0 if arr.dtype == np.uint8 else 1.0
        exact = np.clip(vol.values / scale, 0.0, 1.0).astype(np.float32)
        vol = replace(vol, array=exact, meta=dict(vol.meta, window_source="as-is"))
    return vol


def _read_nifti(p: Path, win, max_voxels: int) -> Volume:
    try:
        import nibabel as nib
    except ImportError:  # pragma: no cover - a dependency
        raise VolumeError("reading NIfTI needs nibabel (pip install nibabel)") from None
    try:
        img = nib.load(str(p))
        shape = tuple(int(s) for s in img.shape)
        if len(shape) == 4 and shape[3] == 1:
            img = img.slicer[..., 0]
            shape = shape[:3]
        if len(shape) != 3:
            raise VolumeError(f"{p}: NIfTI has shape {shape}; a volume needs 3 dimensions")
        if int(np.prod(shape)) > max_voxels:
            raise VolumeError(
                f"{p}: {int(np.prod(shape)):,} voxels exceed the limit {max_voxels:,}"
            )
        canon = nib.as_closest_canonical(img)
        data = np.asarray(canon.get_fdata(dtype=np.float32))
        zooms = tuple(float(z) for z in canon.header.get_zooms()[:3])
        cal = (float(img.header["cal_min"]), float(img.header["cal_max"]))
        descrip = img.header["descrip"].tobytes().split(b"\0")[0].decode("ascii", "replace")
    except VolumeError:
        raise
    except Exception as err:  # noqa: BLE001 - nibabel raises many kinds
        raise VolumeError(f"{p}: cannot read as NIfTI ({type(err).__name__}: {err})") from None
    # RAS+ (i, j, k) -> (D = k: I->S, H = j flipped: A->P, W = i flipped: R->L)
    values = np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, ::-1])
    spacing = (zooms[2], zooms[1], zooms[0])
    file_win = None
    if np.isfinite(cal[0]) and np.isfinite(cal[1]) and cal[1] > cal[0]:
        file_win = ((cal[0] + cal[1]) / 2.0, cal[1] - cal[0] + 1.0)
    modality = ""
    for m in ("CT", "MR"):
        if descrip.upper().startswith(m):
            modality = m
    meta = {"format": "nifti", "spacing_known": True, "orientation": "RAS+ -> (S, P, L)"}
    return _make(values, spacing, file_win, modality, str(p), meta, win)


# --------------------------------------------------------------------------- DICOM series


def _read_series_folder(p: Path, win, max_voxels: int) -> Volume:
    from retrieval.data.dicom_ingest import is_dicom_file

    files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    dicom = [f for f in files if is_dicom_file(f)]
    if not dicom:
        raise VolumeError(f"{p}: no DICOM files in the folder")
    datasets = []
    for f in dicom:
        datasets.append(_dcmread(f))
    return series_from_datasets(datasets, source=str(p), window=win, max_voxels=max_voxels)


def _dcmread(f: Path):
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(f, force=True)
    except Exception as err:  # noqa: BLE001
        raise VolumeError(f"{f}: unreadable DICOM ({type(err).__name__}: {err})") from None


def _floats(ds, keyword: str, n: int, source: str) -> np.ndarray:
    v = ds.get(keyword)
    try:
        arr = np.array([float(x) for x in v], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.array([])
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise VolumeError(f"{source}: a slice lacks a valid {keyword}; cannot order the series")
    return arr


def series_geometry(datasets: list, source: str = "series"):
    """Order slices along the normal and check the series is one regular volume.

    Returns ``(order, slice_spacing, (row_mm, col_mm), normal)``; raises
    :class:`VolumeError` for several series / orientations, missing slices,
    uneven spacing, duplicate positions or mismatched slice sizes.
    """
    uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(uids) > 1:
        raise VolumeError(
            f"{source}: {len(uids)} series in one folder (SeriesInstanceUID differs); "
            "put each series in its own folder, or use `casebase ingest-dicom`"
        )
    if len(datasets) < MIN_SLICES:
        raise VolumeError(
            f"{source}: a volume needs at least {MIN_SLICES} slices (found {len(datasets)})"
        )
    orients = [_floats(ds, "ImageOrientationPatient", 6, source) for ds in datasets]
    ref = orients[0]
    if any(np.max(np.abs(o - ref)) > 1e-3 for o in orients[1:]):
        n = len({tuple(np.round(o, 3)) for o in orients})
        raise VolumeError(f"{source}: {n} slice orientations in one series; need one")
    row, col = ref[:3], ref[3:]
    normal = np.cross(row, col)
    if np.linalg.norm(normal) < 0.5:
        raise VolumeError(f"{source}: invalid ImageOrientationPatient {list(ref)}")
    normal = normal / np.linalg.norm(normal)
    pos = np.array(
        [np.dot(_floats(ds, "ImagePositionPatient", 3, source), normal) for ds in datasets]
    )
    sizes = {(int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) for ds in datasets}
    if len(sizes) > 1:
        raise VolumeError(
            f"{source}: slices of {len(sizes)} different sizes {sorted(sizes)} in one series"
        )
    spacings = {tuple(np.round(_floats(ds, "PixelSpacing", 2, source), 4)) for ds in datasets}
    if len(spacings) > 1:
        raise VolumeError(f"{source}: {len(spacings)} different PixelSpacing values in one series")
    order = np.argsort(pos, kind="stable")
    z = pos[order]
    gaps = np.diff(z)
    if np.any(gaps < 1e-3):
        raise VolumeError(f"{source}: two slices share one position (duplicate slice?)")
    med = float(np.median(gaps))
    bad = np.abs(gaps - med) > _GAP_TOL * med
    if np.any(bad):
        missing = int(np.sum(np.round(gaps[bad] / med) - 1).clip(0))
        if missing > 0 and np.all(np.abs(gaps / med - np.round(gaps / med)) < _GAP_TOL):
            at = float(z[int(np.flatnonzero(bad)[0])])
            raise VolumeError(
                f"{source}: {missing} missing slice(s) (gap of {float(gaps[bad].max()):.2f} mm "
                f"after position {at:.2f} mm, spacing {med:.2f} mm)"
            )
        raise VolumeError(
            f"{source}: uneven slice spacing ({float(gaps.min()):.2f} to {float(gaps.max()):.2f} mm)"
        )
    px = next(iter(spacings))
    return order, med, (float(px[0]), float(px[1])), normal


def _slice_values(ds, source: str) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
            if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 or arr.ndim != 2:
                raise VolumeError(
                    f"{source}: multi-frame or colour slices are not supported in a series"
                )
            vals = apply_modality_lut(arr, ds)
    except VolumeError:
        raise
    except Exception as err:  # noqa: BLE001
        raise VolumeError(
            f"{source}: cannot decode a slice ({type(err).__name__}: {err})"
        ) from None
    vals = np.asarray(vals, dtype=np.float32)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        vals = -vals  # bright means dense
    return vals


def _first_float(value) -> float | None:
    try:
        if value is None:
            return None
        if (
            isinstance(value, (list, tuple))
            or hasattr(value, "__iter__")
            and not isinstance(value, str)
        ):
            value = list(value)[0]
        return float(value)
    except (TypeError, ValueError, IndexError):
        return None


def series_from_datasets(
    datasets: list,
    *,
    source: str = "series",
    window: str | tuple[float, float] | None = None,
    max_voxels: int = 512 * 512 * 2048,
) -> Volume:
    """Build a :class:`Volume` from the pydicom datasets of one series (any order)."""
    order, dz, (dy, dx), normal = series_geometry(datasets, source)
    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    if rows * cols * len(datasets) > max_voxels:
        raise VolumeError(
            f"{source}: {rows * cols * len(datasets):,} voxels exceed the limit {max_voxels:,}"
        )
    values = np.stack([_slice_values(datasets[int(i)], source) for i in order])
    first = datasets[int(order[0])]
    c = _first_float(first.get("WindowCenter"))
    w = _first_float(first.get("WindowWidth"))
    file_win = (c, w) if c is not None and w is not None and w > 0 else None
    if (
        file_win is not None
        and str(first.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"
    ):
        file_win = (-c, w)  # type: ignore[operator]
    modality = str(first.get("Modality", "") or "")
    meta = {
        "format": "dicom-series",
        "spacing_known": True,
        "n_slices": len(datasets),
        "slice_normal": [round(float(v), 6) for v in normal],
        "orientation": [
            round(float(v), 6) for v in _floats(first, "ImageOrientationPatient", 6, source)
        ],
        "origin": [float(v) for v in _floats(first, "ImagePositionPatient", 3, source)],
        # UIDs identify no person; kept so that DICOM out can reference the source
        "series_uid": str(first.get("SeriesInstanceUID", "")),
        "study_uid": str(first.get("StudyInstanceUID", "")),
        "frame_of_reference_uid": str(first.get("FrameOfReferenceUID", "")),
        "sop_instance_uids": [str(datasets[int(i)].get("SOPInstanceUID", "")) for i in order],
    }
    return _make(values, (dz, dy, dx), file_win, modality, source, meta, window)


# --------------------------------------------------------------------------- masks


def read_volume_mask(
    path: str | os.PathLike, expected_shape: tuple[int, int, int] | None = None
) -> np.ndarray:
    """A lesion mask of a volume as ``bool (D, H, W)`` (``.npy`` or NIfTI, same conventions)."""
    p = Path(path).expanduser()
    kind = volume_kind(p)
    if kind == "npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except Exception as err:  # noqa: BLE001
            raise VolumeError(f"{p}: cannot read the mask ({err})") from None
        if arr.dtype.kind not in "biuf":
            raise VolumeError(f"{p}: unsupported mask dtype {arr.dtype}")
        mask = arr != 0
    elif kind == "nifti":
        mask = _read_nifti(p, None, 2**34).values != 0
    else:
        raise VolumeError(f"{p}: a volume's mask must be a (D, H, W) .npy or a NIfTI file")
    if expected_shape is not None and tuple(mask.shape) != tuple(expected_shape):
        raise VolumeError(
            f"{p}: mask shape {tuple(mask.shape)} differs from the volume's {tuple(expected_shape)}"
        )
    return np.ascontiguousarray(mask)


def to_npy_bytes(arr: np.ndarray) -> bytes:
    """``arr`` as NPY bytes (for atomic writes)."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()
