"""Synthetic data sets with known ground truth and known shortcuts.

``make_phantom`` writes a small, fully synthetic data set whose lesion classes
differ only by lesion *shape and texture* (never by size or brightness), with
patient-level anatomy, scanner / device effects independent of the label, and
optionally a *confounder* (a burned-in site letter, or a ruler for photos)
that is tied to the label in the train and val splits but not in test. It is
what the tests, the benchmarks and ``casebase demo`` use to check that
retrieval, explanations and the shortcut audit behave as claimed.

``modality="xray"`` (default) writes chest-radiograph-like DICOM files:

* per *patient*: body outline, lung fields, heart, rib spacing and contrast;
  2–4 cases per patient, patient-disjoint ~70/15/15 train/val/test splits;
* lesion classes (radius 7–13 % of the side, same amplitude range):
  ``nodule`` (round, smooth, homogeneous), ``mass`` (lobulated outline with
  spicules, mottled), ``cavity`` (thick wall, dark centre);
* headers vary the way real archives do: CR / DX / Secondary Capture SOP
  classes, 12- or 16-bit stored values, ~20 % MONOCHROME1 (inverted stored
  values), varied Rescale Slope/Intercept, Window Center/Width (or none),
  Explicit / Implicit VR Little Endian, Deflated, RLE Lossless and JPEG 2000
  Lossless transfer syntaxes;
* every header carries a fake PatientName (``PHANTOM^ALICE^17``), PatientID
  (``PHX`` + digits), birth and study dates, so tests can prove that none of
  it reaches a manifest, an index or a report. The manifest's ``patient_id``
  is ``hash_patient_id(PatientID)``.

``modality="photo"`` writes RGB dermoscopy-like PNGs (skin texture, vignette,
hairs) with classes ``naevus`` (round, uniform brown), ``melanoma``
(irregular, multi-coloured) and ``keratosis`` (waxy, crypts and milia), and
a ``device`` attribute instead of ``scanner``.

Confounders: ``site-marker`` burns the site letter (A/B/C, ~10 % of the side)
into the top-right corner of every image; in train and val the site is the
class's own site with probability ``strength`` (else uniform), in test it is
uniform. ``ruler`` (photo only) draws a ruler along the bottom edge with
probability ``strength`` for ``melanoma`` and ``1 - strength`` for the other
classes in train and val, and 1/3 for every class in test; the manifest's
``ruler`` column says which images have one. ``scanner`` ties the acquisition
device (``scanner`` for x-ray: noise, gamma and contrast; ``device`` for photo: colour
cast, vignette and blur) to the class: in train and val each class's own vendor with
probability ``strength`` (else uniform), uniform in test.

``render_variant`` re-renders one case of a phantom with its confounder changed (another
site letter, the ruler added or removed, another device) and everything else identical:
the intervention that tells whether a model *uses* a confounder.

Every case's known generative factors go into the manifest too (``FACTOR_COLUMNS``:
lesion_size, lesion_x, lesion_y, lesion_shape, lesion_contrast; none tied to the label), so
benchmarks can measure whether neighbours resemble each other beyond the label.

Output (deterministic: the same arguments give byte-identical files)::

    OUT_DIR/manifest.csv
    OUT_DIR/images/<label>/case_0000.dcm   (.png for photos)
    OUT_DIR/masks/case_0000.png            (0/255, same geometry as the image)
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from retrieval.errors import CasebaseError

__all__ = [
    "XRAY_CLASSES",
    "PHOTO_CLASSES",
    "SITES",
    "make_phantom",
    "CONFOUNDERS",
    "render_marker",
    "render_variant",
    "write_concept_images",
    "FACTOR_COLUMNS",
]

XRAY_CLASSES = ("nodule", "mass", "cavity")
PHOTO_CLASSES = ("naevus", "melanoma", "keratosis")
SITES = ("A", "B", "C")
CONFOUNDERS = ("none", "site-marker", "ruler", "scanner")
SCANNERS = ("Acme", "Borealis", "Cygnus")
DEVICES = ("DermLite", "Heine", "Canfield")
RULER_CLASS = "melanoma"

_FIRST_NAMES = (
    "ALICE", "BRUNO", "CLARA", "DMITRI", "ELENA", "FARID", "GRETA", "HUGO", "INES", "JONAS",
    "KEIKO", "LUCA", "MARTA", "NILS", "OLGA", "PEDRO", "QUINN", "ROSA", "SVEN", "TARA",
)  # fmt: skip

# 5x7 bitmaps of the site letters
_GLYPHS = {
    "A": [".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"],
    "B": ["####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."],
    "C": [".####", "#....", "#....", "#....", "#....", "#....", ".####"],
}

# scanner vendor -> (noise sigma, gamma, contrast gain); independent of the label
_SCANNER_FX = {
    "Acme": (0.012, 1.00, 1.00),
    "Borealis": (0.022, 0.92, 0.95),
    "Cygnus": (0.017, 1.08, 1.05),
}
# device -> (colour cast RGB gain, vignette strength, blur sigma px)
_DEVICE_FX = {
    "DermLite": ((1.00, 0.98, 0.96), 0.35, 0.0),
    "Heine": ((1.03, 0.99, 0.93), 0.45, 0.4),
    "Canfield": ((0.97, 1.00, 1.03), 0.30, 0.2),
}


# --------------------------------------------------------------------------- plan


@dataclass
class _Case:
    index: int
    case_id: str
    split: str
    patient: int
    label: str
    site: str
    marker: bool
    ruler: bool
    scanner: str
    age: int
    study_days: int  # days after the patient's first study


@dataclass
class _Patient:
    index: int
    raw_id: str
    name: str
    sex: str
    age: int
    birth: tuple[int, int, int]
    first_study: tuple[int, int, int]
    params: dict


def _split_sizes(n: int) -> dict[str, int]:
    n_hold = max(int(round(0.15 * n)), min(6, n // 5))
    return {"train": n - 2 * n_hold, "val": n_hold, "test": n_hold}


def _patient_sizes(rng: np.random.Generator, total: int) -> list[int]:
    sizes: list[int] = []
    remaining = total
    while remaining > 0:
        if remaining <= 4:
            s = remaining
        else:
            s = int(rng.integers(2, 5))
            if remaining - s == 1:
                s = s + 1 if s < 4 else s - 1
        sizes.append(s)
        remaining -= s
    return sizes


def _plan(
    n: int, seed: int, confounder: str, strength: float, classes: tuple[str, ...], vendors
) -> tuple[list[_Case], list[_Patient]]:
    rng = np.random.default_rng([seed, 0xCA5E])
    sizes = _split_sizes(n)
    patients: list[_Patient] = []
    slots: list[tuple[str, int]] = []  # (split, patient index) per case
    used_ids: set[str] = set()
    for split in ("train", "val", "test"):
        for s in _patient_sizes(rng, sizes[split]):
            p = len(patients)
            while True:
                raw_id = f"PHX{int(rng.integers(0, 10**7)):07d}"
                if raw_id not in used_ids:
                    used_ids.add(raw_id)
                    break
            age = int(rng.integers(20, 88))
            year = 2016 + int(rng.integers(0, 7))
            first = (year, int(rng.integers(1, 13)), int(rng.integers(1, 29)))
            birth = (year - age, int(rng.integers(1, 13)), int(rng.integers(1, 29)))
            if (birth[1], birth[2]) > (first[1], first[2]):
                birth = (birth[0] - 1, birth[1], birth[2])
            name = f"PHANTOM^{_FIRST_NAMES[p % len(_FIRST_NAMES)]}^{p}"
            patients.append(
                _Patient(
                    index=p,
                    raw_id=raw_id,
                    name=name,
                    sex=str(rng.choice(["F", "M"])),
                    age=age,
                    birth=birth,
                    first_study=first,
                    params=_patient_params(rng),
                )
            )
            slots.extend((split, p) for _ in range(s))

    labels_by_split: dict[str, list[str]] = {}
    for split, m in sizes.items():
        lab = [classes[i % len(classes)] for i in range(m)]
        rng.shuffle(lab)
        labels_by_split[split] = lab

    order = rng.permutation(len(slots))
    counters = {k: 0 for k in sizes}
    cases: list[_Case] = []
    class_site = {c: SITES[i % len(SITES)] for i, c in enumerate(classes)}
    study_offsets: dict[int, int] = {}
    for idx, slot_i in enumerate(order):
        split, p = slots[int(slot_i)]
        label = labels_by_split[split][counters[split]]
        counters[split] += 1
        tied = split in ("train", "val")
        if confounder == "site-marker" and tied and rng.random() < strength:
            site = class_site[label]
        else:
            site = SITES[int(rng.integers(0, len(SITES)))]
        ruler = False
        if confounder == "ruler":
            if tied:
                pr = strength if label == RULER_CLASS else 1.0 - strength
            else:
                pr = 1.0 / 3.0
            ruler = bool(rng.random() < pr)
        days = study_offsets.get(p, 0)
        study_offsets[p] = days + int(rng.integers(20, 400))
        # the vendor draw stays where it always was (same phantoms for the other confounders)
        vendor = str(vendors[int(rng.integers(0, len(vendors)))])
        if confounder == "scanner" and tied and rng.random() < strength:
            vendor = str(vendors[classes.index(label) % len(vendors)])
        age = patients[p].age + days // 365
        cases.append(
            _Case(
                index=idx,
                case_id=f"case_{idx:04d}",
                split=split,
                patient=p,
                label=label,
                site=site,
                marker=confounder == "site-marker",
                ruler=ruler,
                scanner=vendor,
                age=int(min(age, 90)),
                study_days=days,
            )
        )
    return cases, patients


def _patient_params(rng: np.random.Generator) -> dict:
    return {
        # x-ray anatomy
        "body_w": rng.uniform(0.41, 0.47),
        "body_h": rng.uniform(0.55, 0.65),
        "lung_sep": rng.uniform(0.19, 0.22),
        "lung_w": rng.uniform(0.15, 0.18),
        "lung_h": rng.uniform(0.27, 0.33),
        "lung_cy": rng.uniform(0.45, 0.51),
        "heart_w": rng.uniform(0.09, 0.12),
        "heart_dx": rng.uniform(0.02, 0.06),
        "body_level": rng.uniform(0.55, 0.68),
        "lung_level": rng.uniform(0.16, 0.26),
        "rib_spacing": rng.uniform(0.065, 0.085),
        "rib_amp": rng.uniform(0.04, 0.07),
        "rib_curv": rng.uniform(1.5, 3.0),
        "rib_phase": rng.uniform(0, 2 * np.pi),
        # skin
        "skin": rng.uniform(0.0, 1.0),
        "skin_texture": rng.uniform(0.02, 0.05),
        "hairiness": rng.uniform(0.0, 1.0),
    }


# --------------------------------------------------------------------------- drawing helpers


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _smooth_noise(rng: np.random.Generator, size: int, sigma_px: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-filtered noise."""
    sigma_px = max(sigma_px, 0.5)
    # draw at reduced resolution for large sigmas (fast), then upsample
    factor = int(max(1, sigma_px // 3))
    small = max(4, -(-size // factor))
    z = rng.standard_normal((small, small)).astype(np.float32)
    z = ndimage.gaussian_filter(z, sigma_px / factor, mode="wrap")
    if factor > 1:
        z = ndimage.zoom(z, size / small, order=1, mode="nearest", grid_mode=True)[:size, :size]
    z -= z.mean()
    sd = z.std()
    return z / sd if sd > 0 else z


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    xx, yy = np.meshgrid(c, c, indexing="xy")
    return yy, xx


def render_marker(letter: str, size: int) -> np.ndarray:
    """A bold bitmap of ``letter`` about 10 % of ``size`` tall (bool array)."""
    glyph = np.array([[ch == "#" for ch in row] for row in _GLYPHS[letter]], dtype=bool)
    scale = max(1, int(round(0.1 * size / 7)))
    big = np.kron(glyph, np.ones((scale, scale), dtype=bool))
    big = np.pad(big, 1)
    if scale >= 2:
        big = ndimage.binary_dilation(big, iterations=max(1, scale // 3))
    return big


def _marker_slot(size: int, shape: tuple[int, int]) -> tuple[int, int]:
    margin = max(2, int(round(0.03 * size)))
    return margin, size - margin - shape[1]  # top-right corner: (row, col)


def _burn_marker(img: np.ndarray, letter: str, value) -> None:
    size = img.shape[0]
    glyph = render_marker(letter, size)
    r0, c0 = _marker_slot(size, glyph.shape)
    region = img[r0 : r0 + glyph.shape[0], c0 : c0 + glyph.shape[1]]
    region[glyph] = value


def _segment_distance(
    yy: np.ndarray, xx: np.ndarray, p0: tuple[float, float], p1: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distance of every pixel to segment p0->p1 and the position t in [0, 1] along it."""
    (y0, x0), (y1, x1) = p0, p1
    dy, dx = y1 - y0, x1 - x0
    length2 = max(dy * dy + dx * dx, 1e-9)
    t = ((yy - y0) * dy + (xx - x0) * dx) / length2
    tc = np.clip(t, 0.0, 1.0)
    d = np.hypot(yy - (y0 + tc * dy), xx - (x0 + tc * dx))
    return d, t


# --------------------------------------------------------------------------- lesions


def _lesion(
    rng: np.random.Generator, label: str, size: int, cy: float, cx: float, r: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """(profile, mask, shape) of a lesion; profile ~[0, 1.3] (negative = darker), in pixels.

    ``shape`` is the class's own shape parameter scaled to [0, 1] within the class (so it
    says nothing about the label): elongation for nodule / naevus / keratosis, outline
    irregularity (summed lobe amplitudes) for mass / melanoma, wall thickness for cavity.
    """
    half = int(np.ceil(r * 2.2)) + 2
    y0, y1 = max(0, int(cy) - half), min(size, int(cy) + half + 1)
    x0, x1 = max(0, int(cx) - half), min(size, int(cx) + half + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    yy += 0.5
    xx += 0.5
    dy, dx = yy - cy, xx - cx
    theta = np.arctan2(dy, dx)
    edge = 0.06
    prof = np.zeros(yy.shape, np.float32)
    if label in ("nodule", "naevus"):
        aspect = rng.uniform(0.88, 1.12)
        shape = abs(aspect - 1.0) / 0.12
        rot = rng.uniform(0, np.pi)
        u = dx * np.cos(rot) + dy * np.sin(rot)
        v = -dx * np.sin(rot) + dy * np.cos(rot)
        d = np.hypot(u * aspect, v / aspect) / r
        prof = _sigmoid((1 - d) / edge) * (1.0 - 0.12 * np.clip(d, 0, 1) ** 2)
        mask = d <= 1.0
    elif label in ("mass", "melanoma"):
        lobes = [(k, rng.uniform(0.05, 0.12), rng.uniform(0, 2 * np.pi)) for k in range(2, 6)]
        shape = (sum(a for _, a, _ in lobes) - 0.2) / 0.28

        def radius_at(angle):
            return 1.0 + sum(amp * np.cos(k * angle + ph) for k, amp, ph in lobes)

        rad = radius_at(theta)
        d = np.hypot(dx, dy) / (r * rad)
        body = _sigmoid((1 - d) / 0.04)
        tex = rng.standard_normal(yy.shape).astype(np.float32)
        tex = ndimage.gaussian_filter(tex, max(0.7, r / 6))
        tex /= tex.std() + 1e-6
        body = body * (1.0 + 0.3 * tex)
        spic = np.zeros_like(body)
        n_sp = int(rng.integers(6, 11)) if label == "mass" else 0
        width = max(0.55, 0.05 * r)
        for j in range(n_sp):
            a = 2 * np.pi * j / n_sp + rng.uniform(-0.25, 0.25)
            rr = r * 0.85 * radius_at(a)
            start = (cy + rr * np.sin(a), cx + rr * np.cos(a))
            length = r * rng.uniform(0.45, 0.8)
            end = (start[0] + length * np.sin(a), start[1] + length * np.cos(a))
            dist, t = _segment_distance(yy, xx, start, end)
            fall = np.clip(1.0 - t, 0.0, 1.0) * (t >= 0)
            spic = np.maximum(spic, np.exp(-((dist / width) ** 2)) * (0.35 + 0.65 * fall))
        prof = np.maximum(body, 0.85 * spic)
        mask = (d <= 1.0) | (spic > 0.45)
    elif label == "cavity":
        d = np.hypot(dx, dy) / r
        wall = rng.uniform(0.35, 0.48)
        shape = (wall - 0.35) / 0.13
        ri = (1 - wall) * (
            1
            + 0.08 * np.cos(2 * theta + rng.uniform(0, 2 * np.pi))
            + 0.05 * np.cos(3 * theta + rng.uniform(0, 2 * np.pi))
        )
        outer = _sigmoid((1 - d) / edge)
        inner = _sigmoid((ri - d) / edge)
        prof = 1.2 * (outer - inner) - 0.4 * inner
        mask = d <= 1.0
    elif label == "keratosis":
        aspect = rng.uniform(0.8, 1.0)
        shape = (1.0 - aspect) / 0.2
        rot = rng.uniform(0, np.pi)
        u = dx * np.cos(rot) + dy * np.sin(rot)
        v = -dx * np.sin(rot) + dy * np.cos(rot)
        d = np.hypot(u * aspect, v / aspect) / r
        prof = _sigmoid((1 - d) / 0.025)
        mask = d <= 1.0
    else:  # pragma: no cover
        raise ValueError(label)
    full = np.zeros((size, size), np.float32)
    full_mask = np.zeros((size, size), bool)
    full[y0:y1, x0:x1] = prof
    full_mask[y0:y1, x0:x1] = mask
    return full, full_mask, float(np.clip(shape, 0.0, 1.0))


# --------------------------------------------------------------------------- factors

# The lesion's known generative factors, written to the manifest for every case, so that a
# benchmark can ask whether neighbours agree on them beyond the label. None is tied to the label.
FACTOR_COLUMNS = ("lesion_size", "lesion_x", "lesion_y", "lesion_shape", "lesion_contrast")


def _factors(size: float, x: float, y: float, shape: float, contrast: float) -> dict[str, str]:
    """lesion_size: radius / image side; lesion_x, lesion_y: centre / side (x right, y down);
    lesion_shape: the class's shape parameter in [0, 1] (see _lesion); lesion_contrast: the
    lesion's amplitude (x-ray) or colour depth (photo) in [0, 1] of its range."""
    vals = (size, x, y, float(np.clip(shape, 0, 1)), float(np.clip(contrast, 0, 1)))
    return {k: f"{v:.4f}" for k, v in zip(FACTOR_COLUMNS, vals, strict=True)}


# --------------------------------------------------------------------------- x-ray


def _xray_image(
    rng: np.random.Generator, case: _Case, patient: _Patient, size: int, lesion: bool = True
) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    P = patient.params
    yy, xx = _grid(size)
    sy, sx = rng.normal(0, 0.012, size=2)
    yy = yy - sy
    xx = xx - sx
    bg = 0.04
    body_level = P["body_level"] * rng.uniform(0.97, 1.03)
    lung_level = P["lung_level"] * rng.uniform(0.95, 1.05)
    e_body = np.abs((xx - 0.5) / P["body_w"]) ** 4 + np.abs((yy - 0.6) / P["body_h"]) ** 4
    body = _sigmoid((1 - e_body) / 0.06)
    dens = bg + (body_level - bg) * body
    cy = P["lung_cy"]
    lungs = np.zeros_like(dens)
    ribs = np.zeros_like(dens)
    centres = []
    for side in (-1.0, 1.0):
        cx = 0.5 + side * P["lung_sep"]
        centres.append(cx)
        top = cy - P["lung_h"]
        taper = 0.7 + 0.35 * np.clip((yy - top) / (2 * P["lung_h"]), 0, 1)
        e = ((xx - cx) / (P["lung_w"] * taper)) ** 2 + ((yy - cy) / P["lung_h"]) ** 2
        lung = _sigmoid((1 - e) / 0.09)
        lungs = np.maximum(lungs, lung)
        phase = 2 * np.pi * (yy + P["rib_curv"] * (xx - cx) ** 2) / P["rib_spacing"]
        band = (0.5 + 0.5 * np.cos(phase + P["rib_phase"])) ** 6
        ribs = np.maximum(ribs, band * lung)
    dens = dens - (body_level - lung_level) * lungs
    eh = ((xx - 0.5 - P["heart_dx"]) / P["heart_w"]) ** 2 + ((yy - cy - 0.14) / 0.1) ** 2
    heart = _sigmoid((1 - eh) / 0.15)
    dens = dens + (body_level - lung_level) * 0.8 * heart * lungs
    dens = dens + P["rib_amp"] * ribs
    dens = dens + 0.025 * _smooth_noise(rng, size, size / 14) * body
    dens = dens + 0.01 * _smooth_noise(rng, size, size / 45) * body

    # lesion centre: a random lung-field pixel at least r from the field's edge
    # (away from the heart), so that the whole lesion lies inside the lung
    r = rng.uniform(0.07, 0.13) * size
    field = (lungs * (1.0 - heart)) > 0.5
    dist = ndimage.distance_transform_edt(field)
    ok = np.flatnonzero(dist.ravel() >= r * 1.05)
    if ok.size == 0:
        ok = np.flatnonzero(dist.ravel() >= 0.8 * dist.max())
    pick = int(ok[int(rng.integers(0, ok.size))])
    ly = pick // size + rng.uniform(0.0, 1.0)
    lx = pick % size + rng.uniform(0.0, 1.0)
    prof, mask, shape = _lesion(rng, case.label, size, ly, lx, r)
    amp = rng.uniform(0.2, 0.3)
    dens = dens + amp * prof * float(lesion)  # lesion=False: background alone (concepts)
    factors = _factors(r / size, lx / size, ly / size, shape, (amp - 0.2) / 0.1)

    noise_sd, gamma, gain = _SCANNER_FX[case.scanner]
    dens = np.clip(dens, 0.0, 1.0)
    dens = np.clip(0.5 + gain * (dens - 0.5), 0, 1) ** gamma
    white = rng.standard_normal(dens.shape).astype(np.float32)
    dens = dens + noise_sd * ndimage.gaussian_filter(white, 0.6) * 1.6
    dens = np.clip(dens, 0.0, 1.0).astype(np.float32)
    if case.marker:
        _burn_marker(dens, case.site, 1.0)
    return dens, mask, factors


_SOP_CLASSES = {
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
    "OT": "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
}


def _uid(seed_key: str) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[seed_key]))


def _write_dicom(
    path: Path,
    dens: np.ndarray,
    case: _Case,
    patient: _Patient,
    rng: np.random.Generator,
    run_key: str,
) -> None:
    import datetime as _dt

    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import (
        DeflatedExplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        JPEG2000Lossless,
        RLELossless,
    )

    size = dens.shape[0]
    kind = ("CR", "DX", "OT")[int(rng.choice(3, p=[0.45, 0.4, 0.15]))]
    bits = 12 if rng.random() < 0.5 else 16
    maxval = 2**bits - 1
    mono1 = rng.random() < 0.2
    lo = rng.uniform(0.0, 0.06) * maxval
    hi = rng.uniform(0.9, 0.99) * maxval
    stored = np.round(lo + dens.astype(np.float64) * (hi - lo))
    if mono1:
        stored = maxval - stored
    stored = np.clip(stored, 0, maxval).astype(np.uint16)
    slope = float(rng.choice([1.0, 0.5, 2.0, 0.25]))
    intercept = float(rng.choice([0.0, -1024.0, 100.0, -500.0]))
    # physical values of density 0 and 1 under this photometric
    s0, s1 = (maxval - lo, maxval - hi) if mono1 else (lo, hi)
    p0, p1 = s0 * slope + intercept, s1 * slope + intercept
    ts_draw = rng.random()
    if ts_draw < 0.62:
        ts = ExplicitVRLittleEndian
    elif ts_draw < 0.72:
        ts = RLELossless
    elif ts_draw < 0.82:
        ts = JPEG2000Lossless
    elif ts_draw < 0.91:
        ts = DeflatedExplicitVRLittleEndian
    else:
        ts = ImplicitVRLittleEndian
    has_window = rng.random() < 0.85
    win_c = (p0 + p1) / 2.0
    win_w = abs(p1 - p0) * rng.uniform(1.0, 1.12)

    sop_uid = _uid(f"{run_key}/sop/{case.index}")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _SOP_CLASSES[kind]
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    meta.ImplementationVersionName = "CASEBASE_PHX"
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = _SOP_CLASSES[kind]
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = _uid(f"{run_key}/study/{case.index}")
    ds.SeriesInstanceUID = _uid(f"{run_key}/series/{case.index}")
    ds.FrameOfReferenceUID = _uid(f"{run_key}/for/{patient.index}")
    ds.PatientName = patient.name
    ds.PatientID = patient.raw_id
    by, bm, bd = patient.birth
    ds.PatientBirthDate = f"{by:04d}{bm:02d}{bd:02d}"
    ds.PatientSex = patient.sex
    ds.PatientAge = f"{case.age:03d}Y"
    study = _dt.date(*patient.first_study) + _dt.timedelta(days=case.study_days)
    ds.StudyDate = study.strftime("%Y%m%d")
    ds.SeriesDate = ds.StudyDate
    ds.ContentDate = ds.StudyDate
    ds.StudyTime = f"{8 + case.index % 10:02d}{case.index % 60:02d}{(7 * case.index) % 60:02d}"
    ds.AccessionNumber = f"ACC{case.index:06d}"
    ds.StudyID = str(1 + case.index)
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = kind
    if kind == "OT":
        ds.ConversionType = "WSD"
    ds.Manufacturer = case.scanner
    ds.ManufacturerModelName = f"{case.scanner} Phantom {1 + (case.index % 3)}"
    ds.InstitutionName = f"Phantom Site {case.site}"
    ds.ReferringPhysicianName = "PHANTOM^REFERRER"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.StudyDescription = "CHEST PA"
    ds.SeriesDescription = "PA"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
    ds.Rows = size
    ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [f"{350.0 / size:.4f}", f"{350.0 / size:.4f}"]
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleType = "US"
    if has_window:
        ds.WindowCenter = f"{win_c:.2f}"
        ds.WindowWidth = f"{win_w:.2f}"
        ds.VOILUTFunction = "LINEAR"
    ds.BurnedInAnnotation = "YES" if case.marker else "NO"
    ds.PixelData = stored.tobytes()
    if ts in (RLELossless, JPEG2000Lossless):
        ds.compress(
            ts,
            stored,
            encoding_plugin="pydicom" if ts == RLELossless else "pylibjpeg",
            generate_instance_uid=False,  # lossless: same instance; keeps the output deterministic
        )
    else:
        ds.file_meta.TransferSyntaxUID = ts
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    path.write_bytes(buf.getvalue())


# --------------------------------------------------------------------------- photo


def _skin_rgb(t: float) -> np.ndarray:
    light = np.array([0.93, 0.78, 0.68])
    dark = np.array([0.52, 0.36, 0.26])
    return light + (dark - light) * t


def _photo_image(
    rng: np.random.Generator, case: _Case, patient: _Patient, size: int, lesion: bool = True
) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    P = patient.params
    yy, xx = _grid(size)
    skin = _skin_rgb(P["skin"] * 0.8 + rng.uniform(-0.05, 0.05))
    img = np.ones((size, size, 3), np.float32) * skin.astype(np.float32)
    tex = 0.6 * _smooth_noise(rng, size, size / 10) + 0.4 * _smooth_noise(rng, size, 1.2)
    img *= (1.0 + P["skin_texture"] * tex)[..., None]
    # redness blotches
    red = np.clip(_smooth_noise(rng, size, size / 6), 0, None)[..., None]
    img += 0.03 * red * np.array([0.6, -0.3, -0.3], np.float32)

    # lesion
    r = rng.uniform(0.1, 0.16) * size
    cy = (0.5 + rng.uniform(-0.12, 0.12)) * size
    cx = (0.5 + rng.uniform(-0.12, 0.12)) * size
    prof, mask, shape = _lesion(rng, case.label, size, cy, cx, r)
    prof = np.clip(prof, 0, 1.2)
    alpha = np.clip(prof, 0, 1)[..., None] * float(lesion)
    if case.label == "naevus":
        tone = rng.uniform(0.9, 1.1)
        base = np.array([0.47, 0.30, 0.20]) * tone
        colour = np.ones_like(img) * base.astype(np.float32)
        colour *= (1.0 + 0.03 * _smooth_noise(rng, size, r / 3))[..., None]
    elif case.label == "melanoma":
        palette = np.array(
            [[0.36, 0.22, 0.14], [0.14, 0.09, 0.07], [0.38, 0.38, 0.46], [0.55, 0.30, 0.26]],
            np.float32,
        )
        fields = np.stack([_smooth_noise(rng, size, r / 4) for _ in range(len(palette))], -1)
        w = np.exp(2.5 * fields)
        w /= w.sum(-1, keepdims=True)
        colour = w @ palette
        # mean lightness comparable to the naevus; the tone comes from a stream of its own so
        # that every other draw (and every other class's image) is what it was before
        tone = np.random.default_rng(rng.bit_generator.seed_seq.spawn(1)[0]).uniform(0.9, 1.1)
        colour *= 1.15 * tone
    else:  # keratosis
        tone = rng.uniform(0.9, 1.1)
        base = np.array([0.62, 0.45, 0.30]) * tone
        colour = np.ones_like(img) * base.astype(np.float32)
        ridges = _smooth_noise(rng, size, max(1.0, r / 8))
        colour *= (1.0 + 0.12 * np.sin(3.0 * ridges))[..., None]
        crypts = (_smooth_noise(rng, size, max(0.8, r / 14)) > 1.6) & mask
        milia = (_smooth_noise(rng, size, max(0.8, r / 14)) > 1.9) & mask
        colour[crypts] = colour[crypts] * 0.45
        colour[milia] = np.array([0.92, 0.88, 0.80], np.float32)
    img = img * (1 - alpha) + colour * alpha
    factors = _factors(r / size, cx / size, cy / size, shape, (tone - 0.9) / 0.2)

    # hairs: thin dark curved strokes
    n_hairs = int(rng.poisson(1 + 5 * P["hairiness"]))
    hair = np.zeros((size, size), np.float32)
    for _ in range(n_hairs):
        p0 = rng.uniform(0, 1, 2) * size
        ang = rng.uniform(0, 2 * np.pi)
        length = rng.uniform(0.3, 0.9) * size
        bend = rng.uniform(-0.3, 0.3)
        pts = [p0]
        for _k in range(6):
            ang += bend / 3
            pts.append(pts[-1] + length / 6 * np.array([np.sin(ang), np.cos(ang)]))
        width = max(0.45, size / 300)
        pad = 3.0 * width + 1.0
        for a, b in zip(pts[:-1], pts[1:], strict=False):
            # only the segment's bounding box can be touched by it
            y0 = max(0, int(np.floor(min(a[0], b[0]) - pad)))
            y1 = min(size, int(np.ceil(max(a[0], b[0]) + pad)))
            x0 = max(0, int(np.floor(min(a[1], b[1]) - pad)))
            x1 = min(size, int(np.ceil(max(a[1], b[1]) + pad)))
            if y1 <= y0 or x1 <= x0:
                continue
            d, _t = _segment_distance(
                yy[y0:y1, x0:x1] * size, xx[y0:y1, x0:x1] * size, tuple(a), tuple(b)
            )
            hair[y0:y1, x0:x1] = np.maximum(hair[y0:y1, x0:x1], np.exp(-((d / width) ** 2)))
    img = img * (1 - 0.75 * hair[..., None]) + 0.75 * hair[..., None] * np.array(
        [0.10, 0.07, 0.05], np.float32
    )

    cast, vig, blur = _DEVICE_FX[case.scanner]
    img = img * np.array(cast, np.float32)
    rr = np.hypot(yy - 0.5, xx - 0.5) / 0.707
    img = img * (1.0 - vig * np.clip(rr, 0, 1) ** 2.5)[..., None]
    if blur > 0:
        img = ndimage.gaussian_filter(img, (blur, blur, 0))
    img = img + 0.01 * rng.standard_normal(img.shape).astype(np.float32)
    img = np.clip(img, 0, 1)
    if case.ruler:
        _draw_ruler(img)
    if case.marker:
        _burn_marker(img, case.site, np.array([1.0, 1.0, 1.0], np.float32))
    return img.astype(np.float32), mask, factors


def _draw_ruler(img: np.ndarray) -> None:
    size = img.shape[0]
    h = max(4, int(round(0.08 * size)))
    strip = img[size - h :, :, :]
    strip[:] = np.array([0.93, 0.92, 0.85], np.float32)
    step = max(2, size // 32)
    tick_w = max(1, size // 128)
    for i, c in enumerate(range(step // 2, size, step)):
        tick_h = h * (0.8 if i % 5 == 0 else 0.45)
        strip[: int(round(tick_h)), c : c + tick_w, :] = 0.08
    strip[-max(1, size // 128) :, :, :] = 0.2


# --------------------------------------------------------------------------- writing


def _png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def make_phantom(
    out_dir: str | Path,
    n: int = 600,
    size: int = 128,
    seed: int = 0,
    confounder: str = "none",
    strength: float = 0.9,
    modality: str = "xray",
    *,
    progress: bool = False,
) -> Path:
    """Write a synthetic data set under ``out_dir``; return the path of its manifest.csv."""
    import csv

    from retrieval.data.privacy import hash_patient_id

    if modality not in ("xray", "photo"):
        raise CasebaseError(f"unknown phantom modality {modality!r} (xray or photo)")
    if confounder not in CONFOUNDERS:
        raise CasebaseError(f"unknown confounder {confounder!r} (one of {', '.join(CONFOUNDERS)})")
    if confounder == "ruler" and modality != "photo":
        raise CasebaseError("--confounder ruler needs --modality photo")
    n, size, seed = int(n), int(size), int(seed)
    if n < 12:
        raise CasebaseError(f"--n must be at least 12 (got {n})")
    if n > 200_000:
        raise CasebaseError(f"--n must be at most 200000 (got {n})")
    if not 32 <= size <= 2048:
        raise CasebaseError(f"--size must be between 32 and 2048 pixels (got {size})")
    strength = float(strength)
    if not 0.0 <= strength <= 1.0:
        raise CasebaseError(f"--strength must be within [0, 1] (got {strength})")

    classes = XRAY_CLASSES if modality == "xray" else PHOTO_CLASSES
    vendors = SCANNERS if modality == "xray" else DEVICES
    cases, patients = _plan(n, seed, confounder, strength, classes, vendors)
    run_key = _run_key(modality, seed, n, size, confounder, strength)

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "masks").mkdir(exist_ok=True)
        for c in classes:
            (out / "images" / c).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CasebaseError(f"cannot create {out}: {err.strerror or err}") from None

    hashed = {p.index: hash_patient_id(p.raw_id) for p in patients}
    ext = ".dcm" if modality == "xray" else ".png"
    attr_name = "scanner" if modality == "xray" else "device"
    rows = []
    iterator = cases
    if progress:
        from tqdm import tqdm

        iterator = tqdm(cases, desc="phantom", unit="case", file=None, leave=False)
    try:
        for case in iterator:
            patient = patients[case.patient]
            image_rel = f"images/{case.label}/{case.case_id}{ext}"
            mask_rel = f"masks/{case.case_id}.png"
            mask, factors = _render_case(
                out / image_rel, case, patient, seed, size, modality, run_key
            )
            (out / mask_rel).write_bytes(_png_bytes(mask.astype(np.uint8) * 255))
            row = {
                "case_id": case.case_id,
                "image": image_rel,
                "label": case.label,
                "split": case.split,
                "patient_id": hashed[case.patient],
                "mask": mask_rel,
                "site": case.site,
                "sex": patient.sex,
                "age": str(case.age),
                attr_name: case.scanner,
            }
            if modality == "photo":
                row["ruler"] = "yes" if case.ruler else "no"
            row.update(factors)
            rows.append(row)
    except OSError as err:
        raise CasebaseError(
            f"cannot write the phantom under {out}: {err.strerror or err}"
        ) from None

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    manifest = out / "manifest.csv"
    _atomic_write_text(manifest, buf.getvalue())
    return manifest


def _run_key(modality: str, seed: int, n: int, size: int, confounder: str, strength: float) -> str:
    return f"casebase-phantom/{modality}/{seed}/{n}/{size}/{confounder}/{strength:.6f}"


def _render_case(
    path: Path, case: _Case, patient: _Patient, seed: int, size: int, modality: str, run_key: str
) -> tuple[np.ndarray, dict[str, str]]:
    """Render one case (its own random stream) and write its image; (mask, factors)."""
    rng = np.random.default_rng([seed, case.index, 0x1A6E])
    if modality == "xray":
        dens, mask, factors = _xray_image(rng, case, patient, size)
        _write_dicom(path, dens, case, patient, rng, run_key)
    else:
        img, mask, factors = _photo_image(rng, case, patient, size)
        path.write_bytes(_png_bytes((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)))
    return mask, factors


_VARIANT_FIELDS = ("site", "marker", "ruler", "scanner")


def render_variant(
    path: str | Path,
    case_id: str,
    *,
    n: int,
    size: int,
    seed: int,
    confounder: str = "none",
    strength: float = 0.9,
    modality: str = "xray",
    **changes,
) -> Path:
    """Write case ``case_id`` of the phantom ``make_phantom(n, size, seed, confounder, strength,
    modality)`` to ``path`` with ``changes`` applied (``site`` letter, ``marker`` on/off,
    ``ruler`` on/off, ``scanner``: the vendor, a device for photos) and every other pixel drawn
    exactly as in the phantom: an intervention on the confounder alone. An x-ray variant keeps
    the case's DICOM UIDs (it is the same case, intervened on): keep it out of a PACS."""
    unknown = sorted(set(changes) - set(_VARIANT_FIELDS))
    if unknown:
        raise CasebaseError(
            f"cannot change {', '.join(unknown)} (only {', '.join(_VARIANT_FIELDS)})"
        )
    vendors = SCANNERS if modality == "xray" else DEVICES
    if "site" in changes and changes["site"] not in SITES:
        raise CasebaseError(f"unknown site {changes['site']!r} (one of {', '.join(SITES)})")
    if "scanner" in changes and changes["scanner"] not in vendors:
        raise CasebaseError(f"unknown vendor {changes['scanner']!r} (one of {', '.join(vendors)})")
    classes = XRAY_CLASSES if modality == "xray" else PHOTO_CLASSES
    cases, patients = _plan(int(n), int(seed), confounder, float(strength), classes, vendors)
    found = [c for c in cases if c.case_id == case_id]
    if not found:
        raise CasebaseError(f"no case {case_id!r} in this phantom")
    case = replace(found[0], **changes)
    run_key = _run_key(modality, int(seed), int(n), int(size), confounder, float(strength))
    _render_case(Path(path), case, patients[case.patient], int(seed), int(size), modality, run_key)
    return Path(path)


# --------------------------------------------------------------------------- concept images

CONCEPT_KINDS = ("marker", "ruler", "device", "control", "plain")


def write_concept_images(
    out_dir: str | Path,
    kind: str = "marker",
    modality: str = "xray",
    n: int = 60,
    size: int = 128,
    seed: int = 1000,
    site: str = "A",
    confounder: str = "none",
    background_only: bool = False,
    strength: float = 0.9,
    vendor: str | None = None,
) -> list[Path]:
    """Example images of one concept for TCAV (``casebase concepts --concept NAME=DIR``).

    ``marker``: the site letter ``site`` burned into cases drawn like the data (lesions of
    every class); ``ruler`` (photo): the ruler on such cases; ``device``: such cases all taken
    with one acquisition device ``vendor`` (a photo device's colour cast, vignette and blur; an
    x-ray scanner's noise, gamma and contrast), the artefact ``--confounder scanner`` ties to a
    class; ``control``: cases drawn like the
    data set itself (``confounder`` at ``strength`` as in ``make_phantom``, over the same
    train/val/test mix), a concept that should be significant for no class; ``plain``: the
    very cases ``marker`` / ``ruler`` draw with the same seed, without the artefact
    (pixel-identical elsewhere: the artefact is burned in last), so the pair measures what
    adding the artefact does to a model. ``background_only``: the marker / ruler on the
    background alone (no lesion); against random data images such a concept also carries
    "no lesion", which the classes do depend on (bench/concepts.py measures both). Same file
    formats as ``make_phantom`` (DICOM for x-ray, PNG for photo); a seed of its own so that no
    concept image repeats a data image.
    """
    if kind not in CONCEPT_KINDS:
        raise CasebaseError(f"unknown concept kind {kind!r} (one of {', '.join(CONCEPT_KINDS)})")
    if modality not in ("xray", "photo"):
        raise CasebaseError(f"unknown phantom modality {modality!r} (xray or photo)")
    if kind == "ruler" and modality != "photo":
        raise CasebaseError("the ruler concept needs --modality photo")
    if site not in SITES:
        raise CasebaseError(f"unknown site {site!r} (one of {', '.join(SITES)})")
    vendors = SCANNERS if modality == "xray" else DEVICES
    if kind == "device" and vendor not in vendors:
        raise CasebaseError(
            f"the device concept needs a {modality} vendor (one of {', '.join(vendors)}), "
            f"got {vendor!r}"
        )
    if not 1 <= int(n) <= 10_000:
        raise CasebaseError(f"--n must be between 1 and 10000 (got {n})")
    classes = XRAY_CLASSES if modality == "xray" else PHOTO_CLASSES
    # n >= 12 for the planner
    cases, patients = _plan(max(12, int(n)), int(seed), confounder, strength, classes, vendors)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CasebaseError(f"cannot create {out}: {err.strerror or err}") from None
    run_key = f"casebase-concept/{kind}/{modality}/{seed}/{n}/{size}/{site}"
    run_key += f"/{vendor}" if kind == "device" else ""
    written = []
    for case in cases[: int(n)]:
        rng = np.random.default_rng([seed, case.index, 0xC0C])
        if kind == "marker":
            case.marker, case.site, case.ruler = True, site, False
        elif kind == "ruler":
            case.marker, case.ruler = False, True
        elif kind == "device":
            case.marker, case.ruler, case.scanner = False, False, vendor
        elif kind == "plain":
            case.marker, case.ruler = False, False
        # control: the planner's own draw, like a manifest of the data set (its train/val/test
        # mix, the confounder tied as often as there), so that it is exchangeable with the
        # random counterexamples TCAV draws from a manifest
        lesion = kind == "control" or not background_only
        name = f"{kind}_{case.index:04d}"
        try:
            if modality == "xray":
                dens, _mask, _f = _xray_image(rng, case, patients[case.patient], size, lesion)
                path = out / f"{name}.dcm"
                _write_dicom(path, dens, case, patients[case.patient], rng, run_key)
            else:
                img, _mask, _f = _photo_image(rng, case, patients[case.patient], size, lesion)
                path = out / f"{name}.png"
                path.write_bytes(_png_bytes((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)))
        except OSError as err:
            raise CasebaseError(f"cannot write {out}: {err.strerror or err}") from None
        written.append(path)
    return written
