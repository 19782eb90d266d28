"""Synthetic 3-D data sets (``casebase phantom OUT --dim 3``): CT-like chests, MR-like heads.

Like the 2-D phantom (:mod:`retrieval.data.phantom`, whose case plan, patients and
splits it reuses), the lesion classes differ only by lesion *shape and texture*
(never by size or brightness: both are drawn from the same ranges for every
class), with patient-level anatomy and scanner effects independent of the label.

``modality="ct"`` (default): an axial chest CT in HU: air, a body outline with a
fat rim, two lungs (-850 HU with vessel-like texture), heart and spine; one lung
lesion of class ``nodule`` (round, smooth, homogeneous ellipsoid), ``mass``
(lobulated outline, mottled, with spicules) or ``cavity`` (thick wall, air
centre). Scanner noise level and texture vary with the ``scanner`` attribute.

``modality="mr"``: the variant nobody tuned on: an MR-like head (scalp, dark
skull, grey and white matter, ventricles), arbitrary units, a smooth bias field
and Rician noise varying with the scanner; one brain lesion of class ``cyst``
(round, homogeneous), ``glioma`` (irregular, infiltrative, mottled) or
``metastasis`` (ring: bright rim, dark necrotic centre). Same three geometric
archetypes, different anatomy, contrast and noise.

Geometry: ``(D, H, W)`` = ``(depth, size, size)``, default 32 x 64 x 64; the field
of view is fixed in mm (CT 320 x 320 in plane, 240 along z; MR 220 x 220, 180)
so the spacing follows from the size (CT default (7.5, 5, 5) mm).
Lesion radius 6-9 % of the in-plane field of view.

Output (deterministic; the axis conventions of :mod:`retrieval.data.volume`)::

    OUT/manifest.csv                        the first of --format's formats
    OUT/manifest_<format>.csv               one more per further format
    OUT/images/<label>/case_0000.npy        float32 (D, H, W) in [0, 1] (CT: lung window)
    OUT/nifti/<label>/case_0000.nii.gz      int16 HU / MR units; cal_min/cal_max = the window
    OUT/dicom/<label>/case_0000/0000.dcm..  one DICOM file per slice (CT / MR Image Storage)
    OUT/masks/case_0000.npy                 uint8 (D, H, W) lesion mask, for every format

All three formats read back (:func:`retrieval.data.volume.read_volume`) to the
same ``array`` (values are rounded to integers before windowing). DICOM headers
carry a fake PatientName / PatientID / dates, as the 2-D phantom's do, so tests
can prove none reaches a manifest; the manifest's ``patient_id`` is hashed.
Manifest columns: the 2-D phantom's (``case_id, image, label, split,
patient_id, mask, site, sex, age, scanner``) and ``FACTOR_COLUMNS_3D``.
"""

from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from retrieval.data.phantom import SCANNERS, _atomic_write_text, _plan, _sigmoid, _uid
from retrieval.data.volume import _apply_window, to_npy_bytes
from retrieval.errors import CasebaseError

__all__ = [
    "CT_CLASSES",
    "MR_CLASSES",
    "NORMAL",
    "FACTOR_COLUMNS_3D",
    "FORMATS",
    "MODALITIES_3D",
    "WINDOWS",
    "make_phantom3d",
    "render_case",
]

CT_CLASSES = ("nodule", "mass", "cavity")
MR_CLASSES = ("cyst", "glioma", "metastasis")
# The optional lesion-free class (``normals=True``). Without it every class has a lesion, and a
# model may learn one class as "none of the others' lesions": that class then has no evidence
# at its own lesion for Grad-CAM to show (bench/volume_cam_layer.py measures it).
NORMAL = "normal"
MODALITIES_3D = ("ct", "mr")
FORMATS = ("npy", "nifti", "dicom")
FACTOR_COLUMNS_3D = (
    "lesion_size",
    "lesion_x",
    "lesion_y",
    "lesion_z",
    "lesion_shape",
    "lesion_contrast",
)
# (center, width): the window written into DICOM / NIfTI and used for the .npy
WINDOWS = {"ct": (-600.0, 1500.0), "mr": (500.0, 1001.0)}
_FOV = {"ct": (240.0, 320.0), "mr": (180.0, 220.0)}  # (z, in-plane) mm
_ARCHETYPE = {
    "nodule": "round",
    "cyst": "round",
    "mass": "irregular",
    "glioma": "irregular",
    "cavity": "ring",
    "metastasis": "ring",
}
# scanner -> (noise sd as a fraction of the lesion amplitude, texture blur voxels, MR bias)
_SCANNER_3D = {
    "Acme": (0.035, 0.6, 0.10),
    "Borealis": (0.06, 0.9, 0.18),
    "Cygnus": (0.045, 0.4, 0.14),
}


@dataclass(frozen=True)
class RenderedCase:
    values: np.ndarray  # float32 (D, H, W), integer-valued: HU (CT) or MR units
    mask: np.ndarray  # bool (D, H, W)
    spacing: tuple[float, float, float]  # (z, y, x) mm
    factors: dict[str, str]


def _noise3d(rng: np.random.Generator, shape, sigma) -> np.ndarray:
    z = rng.standard_normal(shape).astype(np.float32)
    z = ndimage.gaussian_filter(z, sigma, mode="wrap")
    z -= z.mean()
    return z / (z.std() + 1e-8)


def _grid_mm(shape, spacing):
    d, h, w = shape
    sz, sy, sx = spacing
    z = (np.arange(d, dtype=np.float32) + 0.5) * sz
    y = (np.arange(h, dtype=np.float32) + 0.5) * sy
    x = (np.arange(w, dtype=np.float32) + 0.5) * sx
    return np.meshgrid(z, y, x, indexing="ij")


def _ellipsoid(zz, yy, xx, c, semi, p: float = 2.0):
    return (
        np.abs((zz - c[0]) / semi[0]) ** p
        + np.abs((yy - c[1]) / semi[1]) ** p
        + np.abs((xx - c[2]) / semi[2]) ** p
    )


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _lesion3d(rng, archetype: str, zz, yy, xx, c, r: float, spikes: bool):
    """(profile, mask, shape) around centre ``c`` (mm), radius ``r`` mm; profile ~[-0.4, 1.3].

    ``shape`` is the class's own shape parameter in [0, 1] (elongation, outline
    irregularity, wall thickness), telling nothing about the label.
    """
    dz, dy, dx = zz - c[0], yy - c[1], xx - c[2]
    dist = np.sqrt(dz * dz + dy * dy + dx * dx) + 1e-6
    u = np.stack([dz, dy, dx]) / dist
    edge = 0.07
    if archetype == "round":
        axes = rng.uniform(0.88, 1.12, size=3)
        shape = float(np.clip(np.abs(axes - 1).max() / 0.12, 0, 1))
        rot = _rotation(rng)
        local = np.tensordot(rot, np.stack([dz, dy, dx]), axes=1)
        d = np.sqrt(sum((local[i] / (r * axes[i])) ** 2 for i in range(3)))
        prof = _sigmoid((1 - d) / edge) * (1.0 - 0.12 * np.clip(d, 0, 1) ** 2)
        return prof, d <= 1.0, shape
    if archetype == "irregular":
        lobes = [(rng.uniform(0.05, 0.12), _rotation(rng)[0], int(k)) for k in (2, 3, 4, 5)]
        shape = float(np.clip((sum(a for a, _, _ in lobes) - 0.2) / 0.28, 0, 1))
        rad = 1.0 + sum(
            a
            * np.cos(
                k * np.arccos(np.clip(np.tensordot(v, u, axes=1), -1, 1)) + rng.uniform(0, 6.28)
            )
            for a, v, k in lobes
        )
        d = dist / (r * rad)
        sharp = 0.04 if spikes else 0.12  # the MR glioma: infiltrative, fuzzy edge
        body = _sigmoid((1 - d) / sharp)
        tex = _noise3d(rng, d.shape, max(0.7, 0.12 * r / 5.0))
        body = body * (1.0 + 0.3 * tex)
        spic = np.zeros_like(body)
        if spikes:
            for _ in range(int(rng.integers(6, 11))):
                v = _rotation(rng)[0]
                along = np.tensordot(v, np.stack([dz, dy, dx]), axes=1)
                perp = np.sqrt(np.maximum(dist**2 - along**2, 0))
                t = (along - 0.85 * r) / (r * rng.uniform(0.45, 0.8))
                fall = np.clip(1 - t, 0, 1) * (t >= 0)
                spic = np.maximum(
                    spic, np.exp(-((perp / max(2.5, 0.09 * r)) ** 2)) * (0.35 + 0.65 * fall)
                )
        prof = np.maximum(body, 0.85 * spic)
        return prof, (d <= 1.0) | (spic > 0.45), shape
    # ring
    d = dist / r
    wall = rng.uniform(0.35, 0.48)
    shape = float((wall - 0.35) / 0.13)
    v1, v2 = _rotation(rng)[:2]
    ri = (1 - wall) * (
        1 + 0.08 * np.tensordot(v1, u, axes=1) ** 2 + 0.05 * np.tensordot(v2, u, axes=1)
    )
    outer = _sigmoid((1 - d) / edge)
    inner = _sigmoid((ri - d) / edge)
    prof = 1.2 * (outer - inner) - 0.4 * inner
    return prof, d <= 1.0, shape


def _place(rng, field: np.ndarray, spacing, r: float):
    """A centre (mm) inside ``field`` at least ``r`` mm from its edge (else the deepest part)."""
    dist = ndimage.distance_transform_edt(field, sampling=spacing)
    ok = np.flatnonzero(dist.ravel() >= r * 1.05)
    if ok.size == 0:
        ok = np.flatnonzero(dist.ravel() >= 0.8 * dist.max())
    k = np.unravel_index(int(ok[int(rng.integers(0, ok.size))]), field.shape)
    return tuple((k[i] + rng.uniform(0.0, 1.0)) * spacing[i] for i in range(3))


def render_case(
    rng: np.random.Generator,
    label: str,
    scanner: str,
    anatomy_rng: np.random.Generator,
    modality: str = "ct",
    depth: int = 32,
    size: int = 64,
) -> RenderedCase:
    """One volume: values (HU / MR units, integer-valued), lesion mask, spacing, factors."""
    fz, fxy = _FOV[modality]
    spacing = (fz / depth, fxy / size, fxy / size)
    shape = (depth, size, size)
    zz, yy, xx = _grid_mm(shape, spacing)
    noise_frac, blur, bias = _SCANNER_3D[scanner]
    A = anatomy_rng  # per-patient anatomy: the same patient looks alike across studies
    cz, cxy = fz / 2, fxy / 2
    jitter = rng.normal(0, 0.01 * fxy, size=2)
    cy, cx = cxy + jitter[0], cxy + jitter[1]
    if modality == "ct":
        body_e = (np.abs((yy - cy) / (A.uniform(0.28, 0.33) * fxy)) ** 4) + (
            np.abs((xx - cx) / (A.uniform(0.40, 0.45) * fxy)) ** 4
        )
        body = _sigmoid((1 - body_e) / 0.05)
        inner = _sigmoid((0.78 - body_e) / 0.05)
        vals = -1000.0 + (1000.0 - 100.0) * body + 140.0 * inner  # fat rim -100, soft tissue 40
        lung_semi = (
            A.uniform(0.35, 0.42) * fz,
            A.uniform(0.20, 0.24) * fxy,
            A.uniform(0.13, 0.16) * fxy,
        )
        sep = A.uniform(0.19, 0.22) * fxy
        lungs = np.zeros(shape, np.float32)
        for side in (-1, 1):
            e = _ellipsoid(
                zz, yy, xx, (cz + A.uniform(-0.03, 0.03) * fz, cy, cx + side * sep), lung_semi
            )
            lungs = np.maximum(lungs, _sigmoid((1 - e) / 0.08))
        heart_e = _ellipsoid(
            zz, yy, xx, (cz - 0.12 * fz, cy - 0.08 * fxy, cx + A.uniform(0.02, 0.06) * fxy),
            (0.2 * fz, 0.11 * fxy, 0.12 * fxy),
        )  # fmt: skip
        heart = _sigmoid((1 - heart_e) / 0.1)
        lungs = lungs * (1 - heart)
        vessels = np.clip(_noise3d(rng, shape, 1.2), 0, None) ** 2
        lung_hu = -850.0 + 60.0 * vessels
        vals = vals * (1 - lungs) + lung_hu * lungs
        spine = ((yy - (cy + 0.22 * fxy)) ** 2 + (xx - cx) ** 2) <= (0.05 * fxy) ** 2
        vals = np.where(spine, 500.0, vals)
        field = lungs > 0.5
        amp_lo, amp_hi = 800.0, 900.0
        lo_clip, hi_clip = -1024.0, 3071.0
    else:  # mr head
        head_semi = (
            A.uniform(0.40, 0.44) * fz,
            A.uniform(0.40, 0.44) * fxy,
            A.uniform(0.33, 0.37) * fxy,
        )
        head_e = _ellipsoid(zz, yy, xx, (cz, cy, cx), head_semi)
        head = _sigmoid((1 - head_e) / 0.04)
        skull = _sigmoid((0.86 - head_e) / 0.04)
        brain = _sigmoid((0.72 - head_e) / 0.04)
        wm = _sigmoid((0.40 - head_e + 0.08 * _noise3d(rng, shape, 2.0)) / 0.05)
        vals = 900.0 * head - 840.0 * skull + 390.0 * brain + 150.0 * wm * brain
        vent = np.zeros(shape, np.float32)
        vsep = A.uniform(0.04, 0.06) * fxy
        for side in (-1, 1):
            e = _ellipsoid(
                zz, yy, xx, (cz + 0.05 * fz, cy - 0.02 * fxy, cx + side * vsep),
                (A.uniform(0.10, 0.14) * fz, A.uniform(0.10, 0.13) * fxy, 0.03 * fxy),
            )  # fmt: skip
            vent = np.maximum(vent, _sigmoid((1 - e) / 0.1))
        vals = vals * (1 - vent * brain) + 150.0 * vent * brain
        field = (brain > 0.5) & (vent < 0.2)
        amp_lo, amp_hi = 300.0, 350.0
        lo_clip, hi_clip = 0.0, 4095.0

    r = rng.uniform(0.06, 0.09) * fxy
    c = _place(rng, field, spacing, r)
    half = [int(np.ceil(2.3 * r / s)) + 1 for s in spacing]
    k = [int(c[i] / spacing[i]) for i in range(3)]
    sl = tuple(slice(max(0, k[i] - half[i]), min(shape[i], k[i] + half[i] + 1)) for i in range(3))
    # a normal case draws a lesion as a nodule case would and leaves it out, so that its
    # anatomy and noise come from the same draws as a lesion case's
    normal = label == NORMAL
    arche = "round" if normal else _ARCHETYPE[label]
    prof, lmask, lshape = _lesion3d(
        rng, arche, zz[sl], yy[sl], xx[sl], c, r, spikes=modality == "ct"
    )
    if normal:
        prof, lmask = np.zeros_like(prof), np.zeros_like(lmask)
    amp = rng.uniform(amp_lo, amp_hi)
    vals[sl] = vals[sl] + amp * prof
    mask = np.zeros(shape, bool)
    mask[sl] = lmask

    sd = noise_frac * amp_lo
    if modality == "ct":
        vals = vals + sd * _noise3d(rng, shape, blur)
    else:
        bias_field = 1.0 + bias * _noise3d(rng, shape, max(shape) / 3)
        vals = vals * bias_field
        n1 = rng.standard_normal(shape).astype(np.float32) * sd
        n2 = rng.standard_normal(shape).astype(np.float32) * sd
        vals = np.sqrt((vals + n1) ** 2 + n2**2)  # Rician magnitude noise
    vals = np.round(np.clip(vals, lo_clip, hi_clip)).astype(np.float32)
    f = (r / fxy, c[2] / fxy, c[1] / fxy, c[0] / fz, lshape, (amp - amp_lo) / (amp_hi - amp_lo))
    factors = {k_: f"{float(v):.4f}" for k_, v in zip(FACTOR_COLUMNS_3D, f, strict=True)}
    if normal:  # no lesion, so no lesion factors
        factors = dict.fromkeys(FACTOR_COLUMNS_3D, "")
    return RenderedCase(values=vals, mask=mask, spacing=spacing, factors=factors)


# --------------------------------------------------------------------------- writers


def _write_nifti(path: Path, case: RenderedCase, modality: str) -> None:
    import nibabel as nib

    sz, sy, sx = case.spacing
    # stored as (i = column, j = row, k = slice) with columns toward patient left (-R) and rows
    # toward posterior (-A): read_volume's RAS+ reorientation gives back (D, H, W) as written
    data = case.values.transpose(2, 1, 0).astype(np.int16)
    affine = np.diag([-sx, -sy, sz, 1.0])
    img = nib.Nifti1Image(data, affine)
    c, w = WINDOWS[modality]
    img.header["cal_min"] = c - (w - 1) / 2
    img.header["cal_max"] = c + (w - 1) / 2
    img.header["descrip"] = f"{modality.upper()} casebase phantom".encode()
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=6, mtime=0))  # deterministic


_SOP_3D = {"ct": "1.2.840.10008.5.1.4.1.1.2", "mr": "1.2.840.10008.5.1.4.1.1.4"}


def _write_dicom_series(folder: Path, case: RenderedCase, plan_case, patient, modality, run_key):
    import datetime as _dt

    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    folder.mkdir(parents=True, exist_ok=True)
    sz, sy, sx = case.spacing
    d, h, w = case.values.shape
    intercept = -1024.0 if modality == "ct" else 0.0
    stored = np.clip(case.values - intercept, 0, 4095).astype(np.uint16)
    wc, ww = WINDOWS[modality]
    study_uid = _uid(f"{run_key}/study/{plan_case.index}")
    series_uid = _uid(f"{run_key}/series/{plan_case.index}")
    for_uid = _uid(f"{run_key}/for/{plan_case.index}")
    study = _dt.date(*patient.first_study) + _dt.timedelta(days=plan_case.study_days)
    by, bm, bd = patient.birth
    origin = (-w * sx / 2, -h * sy / 2, -d * sz / 2)
    for k in range(d):
        sop_uid = _uid(f"{run_key}/sop/{plan_case.index}/{k}")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = _SOP_3D[modality]
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
        meta.ImplementationVersionName = "CASEBASE_PHX"
        ds = FileDataset(str(folder / f"{k:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = _SOP_3D[modality]
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = for_uid
        ds.PatientName = patient.name
        ds.PatientID = patient.raw_id
        ds.PatientBirthDate = f"{by:04d}{bm:02d}{bd:02d}"
        ds.PatientSex = patient.sex
        ds.PatientAge = f"{plan_case.age:03d}Y"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = study.strftime("%Y%m%d")
        ds.StudyTime = "090000"
        ds.AccessionNumber = f"ACC{plan_case.index:06d}"
        ds.StudyID = str(1 + plan_case.index)
        ds.SeriesNumber = 2
        ds.InstanceNumber = k + 1
        ds.Modality = modality.upper()
        ds.Manufacturer = plan_case.scanner
        ds.InstitutionName = f"Phantom Site {plan_case.site}"
        ds.ReferringPhysicianName = "PHANTOM^REFERRER"
        ds.BodyPartExamined = "CHEST" if modality == "ct" else "HEAD"
        ds.StudyDescription = "CT CHEST" if modality == "ct" else "MR HEAD"
        ds.SeriesDescription = "AXIAL"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [
            f"{origin[0]:.4f}",
            f"{origin[1]:.4f}",
            f"{origin[2] + k * sz:.4f}",
        ]
        ds.SliceThickness = f"{sz:.4f}"
        ds.SliceLocation = f"{origin[2] + k * sz:.4f}"
        ds.PixelSpacing = [f"{sy:.4f}", f"{sx:.4f}"]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = h, w
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope = "1"
        ds.RescaleIntercept = f"{intercept:g}"
        ds.RescaleType = "HU" if modality == "ct" else "US"
        ds.WindowCenter = f"{wc:g}"
        ds.WindowWidth = f"{ww:g}"
        if modality == "mr":
            ds.MagneticFieldStrength = "1.5"
            ds.ScanningSequence = "SE"
            ds.SequenceVariant = "NONE"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "2D"
            ds.EchoTime = "15"
            ds.RepetitionTime = "500"
        else:
            ds.KVP = "120"
        ds.PixelData = stored[k].tobytes()
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        (folder / f"{k:04d}.dcm").write_bytes(buf.getvalue())


def _parse_formats(formats) -> tuple[str, ...]:
    if isinstance(formats, str):
        formats = [f.strip().lower() for f in formats.split(",") if f.strip()]
    out: list[str] = []
    for f in formats:
        if f == "all":
            out.extend(x for x in FORMATS if x not in out)
            continue
        if f not in FORMATS:
            raise CasebaseError(f"unknown --format {f!r} (npy, nifti, dicom, a comma list, or all)")
        if f not in out:
            out.append(f)
    if not out:
        raise CasebaseError("--format: name at least one of npy, nifti, dicom")
    return tuple(out)


def make_phantom3d(
    out_dir: str | Path,
    n: int = 300,
    size: int = 64,
    depth: int = 32,
    seed: int = 0,
    modality: str = "ct",
    formats: str | tuple[str, ...] = "npy",
    *,
    normals: bool = False,
    progress: bool = False,
) -> Path:
    """Write a synthetic 3-D data set under ``out_dir``; return the path of its manifest.csv.

    ``normals``: a fourth class, ``normal``, of volumes without a lesion (empty mask, empty
    lesion factors), about as many as each lesion class."""
    from retrieval.data.privacy import hash_patient_id

    if modality not in MODALITIES_3D:
        raise CasebaseError(f"unknown 3-D phantom modality {modality!r} (ct or mr)")
    fmts = _parse_formats(formats)
    n, size, depth, seed = int(n), int(size), int(depth), int(seed)
    if n < 12:
        raise CasebaseError(f"--n must be at least 12 (got {n})")
    if n > 20_000:
        raise CasebaseError(f"--n must be at most 20000 for volumes (got {n})")
    if not 32 <= size <= 512:
        raise CasebaseError(f"--size must be between 32 and 512 pixels for volumes (got {size})")
    if not 8 <= depth <= 512:
        raise CasebaseError(f"--depth must be between 8 and 512 slices (got {depth})")
    classes = (CT_CLASSES if modality == "ct" else MR_CLASSES) + ((NORMAL,) if normals else ())
    cases, patients = _plan(n, seed, "none", 0.0, classes, SCANNERS)
    run_key = f"casebase-phantom3d/{modality}/{seed}/{n}/{depth}x{size}" + (
        "/normals" if normals else ""
    )
    out = Path(out_dir)
    try:
        (out / "masks").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CasebaseError(f"cannot create {out}: {err.strerror or err}") from None
    hashed = {p.index: hash_patient_id(p.raw_id) for p in patients}
    rows: dict[str, list[dict[str, str]]] = {f: [] for f in fmts}
    iterator = cases
    if progress:
        from tqdm import tqdm

        iterator = tqdm(cases, desc="phantom 3-D", unit="volume", leave=False)
    try:
        for case in iterator:
            patient = patients[case.patient]
            rng = np.random.default_rng([seed, case.index, 0x3D3D])
            anat = np.random.default_rng([seed, patient.index, 0xA7])
            vol = render_case(rng, case.label, case.scanner, anat, modality, depth, size)
            mask_rel = f"masks/{case.case_id}.npy"
            (out / mask_rel).write_bytes(to_npy_bytes(vol.mask.astype(np.uint8)))
            for f in fmts:
                if f == "npy":
                    rel = f"images/{case.label}/{case.case_id}.npy"
                    (out / rel).parent.mkdir(parents=True, exist_ok=True)
                    arr = _apply_window(vol.values, WINDOWS[modality])
                    (out / rel).write_bytes(to_npy_bytes(arr))
                elif f == "nifti":
                    rel = f"nifti/{case.label}/{case.case_id}.nii.gz"
                    (out / rel).parent.mkdir(parents=True, exist_ok=True)
                    _write_nifti(out / rel, vol, modality)
                else:
                    rel = f"dicom/{case.label}/{case.case_id}"
                    _write_dicom_series(out / rel, vol, case, patient, modality, run_key)
                row = {
                    "case_id": case.case_id,
                    "image": rel,
                    "label": case.label,
                    "split": case.split,
                    "patient_id": hashed[case.patient],
                    "mask": mask_rel,
                    "site": case.site,
                    "sex": patient.sex,
                    "age": str(case.age),
                    "scanner": case.scanner,
                }
                row.update(vol.factors)
                rows[f].append(row)
    except OSError as err:
        raise CasebaseError(
            f"cannot write the phantom under {out}: {err.strerror or err}"
        ) from None
    first = None
    for i, f in enumerate(fmts):
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[f][0].keys()), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows[f])
        path = out / ("manifest.csv" if i == 0 else f"manifest_{f}.csv")
        _atomic_write_text(path, buf.getvalue())
        first = first or path
    assert first is not None
    return first
