"""Manifests from public data sets' own metadata files.

``convert(source, METADATA, images=DIR, out=MANIFEST)`` reads a data set's
metadata in the format its publisher ships, finds every image under ``DIR``,
and writes a casebase manifest (see ``data_manifests/README.md`` for the
per-source mapping). One function per source, registered in
:data:`CONVERTERS`:

==================  =====================================================
``ham10000``        HAM10000_metadata.csv (Harvard Dataverse)
``isic``            ISIC 2020 ``ISIC_2020_Training_GroundTruth*.csv``, or
                    ISIC 2019 ``ISIC_2019_Training_GroundTruth.csv`` (+ its
                    ``ISIC_2019_Training_Metadata.csv``)
``chexpert``        CheXpert ``train.csv`` / ``valid.csv``
``nih-cxr14``       NIH ChestX-ray14 ``Data_Entry_2017*.csv`` (+ the official
                    ``train_val_list.txt`` / ``test_list.txt``)
``rsna-pneumonia``  ``stage_2_train_labels.csv`` (+
                    ``stage_2_detailed_class_info.csv``); box masks as PNGs
==================  =====================================================

Shared rules (the helpers below):

* **patient ids are never written raw**: the grouping id (patient, or lesion
  where the data set has no patient id) goes through
  :func:`retrieval.data.privacy.hash_patient_id`; case ids are the data set's image
  ids where those carry no patient id, else built from the hashed id;
* **patient-disjoint splits**, deterministic for a ``seed``: a data set's
  official test set is kept as ``test``; every other patient is assigned
  whole to train / val / test, stratified by the patient's most common label,
  in an order given by SHA-256 of (seed, patient) — so reruns agree, and the
  split does not depend on the row order or on the PHI key;
* **no patient id through paths**: CheXpert (``patientNNNNN/``), NIH
  ChestX-ray14 (``<patient>_<follow-up>.png``) and RSNA (``<patientId>.dcm``)
  name their files by patient, which would undo the keyed hash; their rows
  point at pseudonymous links ``<manifest stem>.links/<case_id><ext>`` beside
  the manifest (:mod:`retrieval.data.phi_paths`) instead of the files;
* ``sex`` is ``F`` / ``M`` / ``O`` / empty, ``age`` a whole number of years
  (empty when missing or implausible);
* every image must exist under ``--images``: rows whose image is missing are
  skipped and counted (``--strict``: an error).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from retrieval.errors import CasebaseError

__all__ = [
    "CONVERTERS",
    "ConvertOptions",
    "ConvertReport",
    "Record",
    "convert",
    "normalise_age",
    "normalise_sex",
    "patient_disjoint_splits",
]

# data sets whose image paths carry the patient id: rows point at pseudonymous links
LINKED_SOURCES = ("chexpert", "nih-cxr14", "rsna-pneumonia")

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp", ".npy")

# --------------------------------------------------------------------------- options & records


@dataclass
class ConvertOptions:
    images: Path
    out: Path
    seed: int = 0
    extra: list[Path] = field(default_factory=list)
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    ignore_official_split: bool = False
    label_policy: str = "single"  # single | priority
    uncertain: str = "ignore"  # ignore | positive | negative (CheXpert)
    label_field: str | None = None
    masks: Path | None = None
    strict: bool = False
    progress: bool = True
    log: Callable[[str], None] | None = None

    def say(self, line: str) -> None:
        if self.log is not None:
            self.log(line)
        else:
            print(line, file=sys.stderr)


@dataclass
class Record:
    """One candidate row before hashing, splitting and the image check."""

    case_id: str  # may contain "{pid}", replaced by the hashed group id
    image: str  # file name or relative path to find under --images
    label: str
    group: str  # raw patient (or lesion) id: hashed, never written
    attributes: dict[str, str] = field(default_factory=dict)
    official_split: str | None = None  # "test" | "trainval" | "train" | "val" | None
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)  # RSNA
    image_path: Path | None = None  # resolved by the image finder
    shape: tuple[int, int] | None = None  # (rows, columns) where known (RSNA: from the header)


@dataclass
class ConvertReport:
    source: str
    manifest: Path | None = None
    n_rows: int = 0  # metadata rows read
    n_written: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    missing_examples: list[str] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)
    n_patients: int = 0
    n_masks: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def n_missing(self) -> int:
        return self.skipped.get("image not found", 0)

    def summary(self) -> str:
        text = f"{self.source}: wrote {self.n_written} cases of {self.n_patients} patients from {self.n_rows} metadata rows"
        if self.skipped:
            parts = ", ".join(f"{n} {why}" for why, n in self.skipped.most_common())
            text += f"; skipped {sum(self.skipped.values())} ({parts})"
        if self.n_masks:
            text += f"; {self.n_masks} masks"
        return text


# --------------------------------------------------------------------------- shared helpers


_SEX = {
    "m": "M",
    "male": "M",
    "man": "M",
    "f": "F",
    "female": "F",
    "woman": "F",
    "o": "O",
    "other": "O",
}


def normalise_sex(value) -> str:
    """``F`` / ``M`` / ``O``, or ``""`` when unknown."""
    return _SEX.get(str(value or "").strip().lower(), "")


def normalise_age(value, *, max_age: int = 120) -> str:
    """Whole years as text (``"58"``): accepts ``58``, ``"58.0"``, ``"058Y"``, ``"6M"``; else ``""``."""
    text = str(value if value is not None else "").strip()
    if not text:
        return ""
    m = re.fullmatch(r"(\d{1,3})\s*([DWMYdwmy])", text)
    if m:
        n = int(m.group(1))
        years = {"D": n / 365.25, "W": n * 7 / 365.25, "M": n / 12, "Y": n}[m.group(2).upper()]
    else:
        try:
            years = float(text)
        except ValueError:
            return ""
    if math.isnan(years) or years < 0 or years > max_age:
        return ""
    return str(int(years))


def _is_true(value) -> bool:
    try:
        return float(str(value).strip() or "nan") == 1.0
    except ValueError:
        return str(value).strip().lower() in ("true", "yes")


def _split_key(seed: int, group: str) -> str:
    return hashlib.sha256(f"casebase-split\x00{seed}\x00{group}".encode()).hexdigest()


def patient_disjoint_splits(
    groups: Sequence[str],
    labels: Sequence[str],
    *,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    official: Sequence[str | None] | None = None,
) -> list[str]:
    """A split per row such that no group (patient) straddles two splits.

    ``official[i]`` ("test", "trainval", "train", "val" or None) pins a row's
    patient: a patient with any official ``test`` row is ``test``; one with
    ``trainval`` rows is split between train and val only; ``train`` / ``val``
    are kept. Every other patient is assigned by label stratum (its most common
    label) in SHA-256(seed, group) order: test until the stratum's test share
    is reached, then val, then train. Deterministic; independent of row order.
    """
    n = len(groups)
    if len(labels) != n or (official is not None and len(official) != n):
        raise ValueError("groups, labels and official must have one entry per row")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise CasebaseError("--val-fraction and --test-fraction must be in [0, 1) and sum below 1")
    rows_of: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        rows_of[g].append(i)
    pinned: dict[str, str] = {}
    pool: dict[str, str] = {}  # group -> "all" | "trainval"
    for g, rows in rows_of.items():
        offs = {official[i] for i in rows} if official is not None else {None}
        if "test" in offs:
            pinned[g] = "test"
        elif "trainval" in offs:
            pool[g] = "trainval"
        elif offs & {"train", "val"}:
            # majority of the pinned rows; a patient never straddles
            c = Counter(official[i] for i in rows if official[i] in ("train", "val"))
            pinned[g] = sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        else:
            pool[g] = "all"

    split_of: dict[str, str] = dict(pinned)
    for kind in ("all", "trainval"):
        members = [g for g, k in pool.items() if k == kind]
        t_frac = test_fraction if kind == "all" else 0.0
        v_frac = val_fraction if kind == "all" else val_fraction / max(1e-9, 1.0 - test_fraction)
        v_frac = min(v_frac, 0.95)
        strata: dict[str, list[str]] = defaultdict(list)
        for g in members:
            c = Counter(labels[i] for i in rows_of[g])
            top = sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
            strata[top].append(g)
        for _label, gs in sorted(strata.items()):
            gs.sort(key=lambda g: _split_key(seed, g))
            total = sum(len(rows_of[g]) for g in gs)
            want_test = round(total * t_frac)
            want_val = round(total * v_frac)
            n_test = n_val = 0
            for g in gs:
                size = len(rows_of[g])
                if n_test < want_test:
                    split_of[g] = "test"
                    n_test += size
                elif n_val < want_val:
                    split_of[g] = "val"
                    n_val += size
                else:
                    split_of[g] = "train"
    return [split_of[g] for g in groups]


def _read_csv(path: Path, what: str) -> pd.DataFrame:
    """A metadata table as strings (missing -> ""), comma- or tab-separated (Dataverse .tab)."""
    if not path.is_file():
        raise CasebaseError(f"{path}: {what} not found")
    try:
        with open(path, "rb") as fh:
            head = fh.readline()
    except OSError as err:
        raise CasebaseError(f"{path}: cannot read {what} ({err.strerror or err})") from None
    sep = "\t" if head.count(b"\t") > head.count(b",") else ","
    df = None
    for encoding in ("utf-8-sig", "latin-1"):
        try:
            df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding=encoding, sep=sep)
            break
        except UnicodeDecodeError:
            continue
        except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError, ValueError) as err:
            raise CasebaseError(
                f"{path}: cannot read {what} ({' '.join(str(err).split())[:200]})"
            ) from None
    assert df is not None
    df.columns = [str(c).strip() for c in df.columns]
    return df.apply(lambda col: col.str.strip()) if len(df) else df


def _require(df: pd.DataFrame, path: Path, columns: Iterable[str], source: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        found = ", ".join(list(df.columns)[:12]) or "none"
        raise CasebaseError(
            f"{path}: not a {source} metadata file: missing column(s) {', '.join(missing)} "
            f"(found {found})"
        )


def _companion(opts: ConvertOptions, metadata: Path, patterns: Sequence[str]) -> Path | None:
    """An --extra file whose name matches one of ``patterns`` (regex), else one beside METADATA."""
    for p in opts.extra:
        if any(re.search(pat, p.name, re.IGNORECASE) for pat in patterns):
            return p
    folder = metadata.parent
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return None
    for pat in patterns:
        for name in names:
            if re.search(pat, name, re.IGNORECASE) and (folder / name) != metadata:
                return folder / name
    return None


class _ImageFinder:
    """Finds images under --images by relative path, file name, or stem (+ known extensions)."""

    def __init__(self, root: Path, progress: bool):
        if not root.exists():
            raise CasebaseError(f"--images {root}: folder not found")
        if not root.is_dir():
            raise CasebaseError(f"--images {root}: not a folder")
        self.root = root
        self._by_name: dict[str, Path] | None = None
        self._progress = progress

    def _index(self) -> dict[str, Path]:
        if self._by_name is None:
            from tqdm import tqdm

            idx: dict[str, Path] = {}
            bar = tqdm(desc="indexing images", unit="file", disable=not self._progress, leave=False)
            for dirpath, dirnames, filenames in os.walk(self.root):
                dirnames.sort()
                for name in sorted(filenames):
                    p = Path(dirpath) / name
                    idx.setdefault(name.lower(), p)
                    stem, ext = os.path.splitext(name)
                    if ext.lower() in IMAGE_EXTS:
                        idx.setdefault("\x00stem:" + stem.lower(), p)
                bar.update(len(filenames))
            bar.close()
            self._by_name = idx
        return self._by_name

    def by_relpath(self, rel: str) -> Path | None:
        rel = rel.replace("\\", "/").lstrip("/")
        parts = Path(rel).parts
        # the path as given, then with leading folders dropped (CheXpert-v1.0-small/train/...)
        for k in range(len(parts)):
            cand = self.root.joinpath(*parts[k:])
            if cand.is_file():
                return cand
        cand = self.root.parent / rel  # --images pointed at the data set's top folder itself
        if cand.is_file():
            return cand
        return None  # no file-name fallback: CheXpert names (view1_frontal.jpg) repeat

    def by_name(self, name: str, stems: Sequence[str] = ()) -> Path | None:
        idx = self._index()
        hit = idx.get(name.lower())
        if hit is not None:
            return hit
        for stem in (os.path.splitext(name)[0], *stems):
            hit = idx.get("\x00stem:" + stem.lower())
            if hit is not None:
                return hit
        return None


# --------------------------------------------------------------------------- HAM10000


def convert_ham10000(
    metadata: Path, opts: ConvertOptions, report: ConvertReport
) -> tuple[list[Record], list[str]]:
    df = _read_csv(metadata, "HAM10000 metadata")
    _require(
        df,
        metadata,
        ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"),
        "HAM10000",
    )
    report.n_rows = len(df)
    has_site = "dataset" in df.columns
    recs = []
    for r in df.to_dict("records"):
        label = r["dx"].strip().lower()
        if not label:
            report.skipped["no diagnosis"] += 1
            continue
        attrs = {
            "sex": normalise_sex(r["sex"]),
            "age": normalise_age(r["age"]),
            "localization": r["localization"].strip().lower().replace("unknown", ""),
            "dx_type": r["dx_type"].strip().lower(),
        }
        if has_site:
            attrs["site"] = r["dataset"].strip()
        group = r["lesion_id"] or r["image_id"]
        recs.append(
            Record(
                case_id=r["image_id"],
                image=r["image_id"],
                label=label,
                group="lesion:" + group,
                attributes=attrs,
            )
        )
    cols = ["sex", "age", "localization", "dx_type"] + (["site"] if has_site else [])
    return recs, cols


# --------------------------------------------------------------------------- ISIC

ISIC2019_CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")


def convert_isic(
    metadata: Path, opts: ConvertOptions, report: ConvertReport
) -> tuple[list[Record], list[str]]:
    df = _read_csv(metadata, "ISIC metadata")
    cols = set(df.columns)
    if "image_name" in cols and ({"target", "benign_malignant", "diagnosis"} & cols):
        return _isic2020(df, metadata, opts, report)
    if "image" in cols:
        if {"MEL", "NV"} <= cols:
            gt, meta_df = df, None
            companion = _companion(opts, metadata, [r"2019.*metadata.*\.csv$", r"metadata.*\.csv$"])
            if companion is not None:
                meta_df = _read_csv(companion, "ISIC 2019 metadata")
                opts.say(f"isic: attributes from {companion}")
        else:  # the metadata file was given: look for the ground truth
            meta_df = df
            companion = _companion(
                opts, metadata, [r"2019.*groundtruth.*\.csv$", r"groundtruth.*\.csv$"]
            )
            if companion is None:
                raise CasebaseError(
                    f"{metadata}: ISIC 2019 metadata without labels; pass the ground truth "
                    "(ISIC_2019_Training_GroundTruth.csv) as METADATA"
                )
            gt = _read_csv(companion, "ISIC 2019 ground truth")
            metadata = companion
        return _isic2019(gt, meta_df, metadata, opts, report)
    if "image_name" in cols:
        raise CasebaseError(
            f"{metadata}: ISIC metadata without labels (no target / benign_malignant / diagnosis "
            "column): the challenge test sets are unlabelled; use the training ground truth"
        )
    raise CasebaseError(
        f"{metadata}: not an ISIC 2019/2020 metadata file (expected image_name,patient_id,...,target "
        f"or image,MEL,NV,...; found {', '.join(list(df.columns)[:12])})"
    )


def _isic2020(df, metadata, opts, report):
    _require(df, metadata, ("image_name", "patient_id"), "ISIC 2020")
    report.n_rows = len(df)
    field_ = (opts.label_field or "benign_malignant").strip()
    if field_ not in ("benign_malignant", "diagnosis", "target"):
        raise CasebaseError(
            f"--label-field {field_!r}: for ISIC 2020 use benign_malignant or diagnosis"
        )
    site_col = next(
        (c for c in ("anatom_site_general_challenge", "anatom_site_general") if c in df.columns),
        None,
    )
    recs = []
    for r in df.to_dict("records"):
        if field_ == "diagnosis":
            label = r.get("diagnosis", "").strip().lower()
        else:
            label = r.get("benign_malignant", "").strip().lower()
            if not label and r.get("target", "") != "":
                label = "malignant" if _is_true(r["target"]) else "benign"
        if not label:
            report.skipped["no label"] += 1
            continue
        group = r["patient_id"] or r.get("lesion_id", "") or r["image_name"]
        attrs = {
            "sex": normalise_sex(r.get("sex", "")),
            "age": normalise_age(r.get("age_approx", "")),
            "localization": (r.get(site_col, "") if site_col else "").strip().lower(),
        }
        recs.append(
            Record(
                case_id=r["image_name"],
                image=r["image_name"],
                label=label,
                group="patient:" + group,
                attributes=attrs,
            )
        )
    return recs, ["sex", "age", "localization"]


def _isic2019(gt, meta_df, metadata, opts, report):
    classes = [c for c in ISIC2019_CLASSES if c in gt.columns]
    _require(gt, metadata, ("image", "MEL", "NV"), "ISIC 2019 ground truth")
    report.n_rows = len(gt)
    meta = {}
    if meta_df is not None and "image" in meta_df.columns:
        meta = {r["image"]: r for r in meta_df.to_dict("records")}
    recs = []
    for r in gt.to_dict("records"):
        hot = [c for c in classes if _is_true(r[c])]
        if len(hot) != 1:
            report.skipped["no single class" if hot else "no label"] += 1
            continue
        label = hot[0].lower()
        if label == "unk":
            report.skipped["UNK class"] += 1
            continue
        m = meta.get(r["image"], {})
        lesion = (m.get("lesion_id") or "").strip()
        site_m = re.match(r"^([A-Za-z]+)_", lesion)
        attrs = {
            "sex": normalise_sex(m.get("sex", "")),
            "age": normalise_age(m.get("age_approx", "")),
            "localization": (
                m.get("anatom_site_general") or m.get("anatom_site_general_challenge") or ""
            )
            .strip()
            .lower(),
            "site": site_m.group(1).upper() if site_m else "",
        }
        group = ("lesion:" + lesion) if lesion else ("image:" + r["image"])
        image = r["image"]
        recs.append(
            Record(
                case_id=image.replace("_downsampled", ""),
                image=image,
                label=label,
                group=group,
                attributes=attrs,
            )
        )
    if not meta:
        opts.say(
            "isic: no ISIC_2019_Training_Metadata.csv found (pass it with --extra): "
            "no sex/age/site attributes, each image its own group"
        )
    return recs, ["sex", "age", "localization", "site"]


# --------------------------------------------------------------------------- CheXpert

CHEXPERT_FINDINGS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
# the findings a label can be (No Finding is the fallback, Support Devices an attribute);
# --label-policy priority takes the first positive one in this order (specific before generic)
CHEXPERT_PRIORITY = (
    "Pneumothorax",
    "Fracture",
    "Lung Lesion",
    "Pneumonia",
    "Consolidation",
    "Edema",
    "Pleural Effusion",
    "Pleural Other",
    "Atelectasis",
    "Cardiomegaly",
    "Enlarged Cardiomediastinum",
    "Lung Opacity",
)


def _chexpert_value(v: str, uncertain: str) -> bool | None:
    """True positive / False negative / None unknown, under the uncertainty policy."""
    s = str(v).strip()
    if not s:
        return None
    try:
        x = float(s)
    except ValueError:
        return None
    if x == 1:
        return True
    if x == 0:
        return False
    if x == -1:
        return {"positive": True, "negative": False}.get(uncertain)
    return None


def _pick_label(positives: list[str], no_finding: bool, policy: str, priority: Sequence[str]):
    """(label, None) or (None, skip reason)."""
    if positives:
        if len(positives) == 1:
            return positives[0], None
        if policy == "priority":
            order = {f: i for i, f in enumerate(priority)}
            return sorted(positives, key=lambda f: (order.get(f, len(order)), f))[0], None
        return None, "several findings"
    if no_finding:
        return "No Finding", None
    return None, "no confident finding"


def convert_chexpert(
    metadata: Path, opts: ConvertOptions, report: ConvertReport
) -> tuple[list[Record], list[str]]:
    need = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding")
    df = _read_csv(metadata, "CheXpert labels")
    _require(df, metadata, need, "CheXpert")
    if metadata.name.lower() != "valid.csv":
        # the official validation set (radiologist consensus) beside train.csv is the test split
        valid = _companion(opts, metadata, [r"^valid\.csv$"])
        if valid is not None:
            vdf = _read_csv(valid, "CheXpert labels")
            _require(vdf, valid, need, "CheXpert")
            df = pd.concat([df, vdf], ignore_index=True).fillna("")
            opts.say(
                f"chexpert: {len(vdf)} images of the official validation set ({valid}) -> test"
            )
    report.n_rows = len(df)
    findings = [
        f
        for f in CHEXPERT_FINDINGS
        if f in df.columns and f not in ("No Finding", "Support Devices")
    ]
    recs = []
    for r in df.to_dict("records"):
        path = r["Path"].replace("\\", "/")
        m = re.search(r"(patient\d+)/study(\d+)/([^/]+?)(?:\.\w+)?$", path)
        if not m:
            report.skipped["unrecognised Path"] += 1
            continue
        raw_patient, study, view_file = m.group(1), m.group(2), m.group(3)
        positives = [f for f in findings if _chexpert_value(r[f], opts.uncertain) is True]
        label, why = _pick_label(
            positives,
            _chexpert_value(r["No Finding"], "ignore") is True,
            opts.label_policy,
            CHEXPERT_PRIORITY,
        )
        if label is None:
            report.skipped[why] += 1
            continue
        sd = r.get("Support Devices", "").strip()
        devices = {
            "1.0": "yes",
            "1": "yes",
            "0.0": "no",
            "0": "no",
            "-1.0": "uncertain",
            "-1": "uncertain",
        }.get(sd, "")
        part = "/valid/" in f"/{path}" or path.startswith("valid/")
        attrs = {
            "sex": normalise_sex(r["Sex"]),
            "age": normalise_age(r["Age"]),
            "view": r["Frontal/Lateral"].strip().lower(),
            "projection": r["AP/PA"].strip().upper(),
            "support_devices": devices,
        }
        view_tag = re.sub(r"[^A-Za-z0-9_]+", "_", view_file)
        recs.append(
            Record(
                case_id="{pid}" + f"_s{study}_{view_tag}",
                image=path,
                label=label,
                group="patient:" + raw_patient,
                attributes=attrs,
                official_split="test" if part else "trainval",
            )
        )
    return recs, ["sex", "age", "view", "projection", "support_devices"]


# --------------------------------------------------------------------------- NIH ChestX-ray14

NIH_FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis",
    "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax",
)  # fmt: skip
NIH_PRIORITY = (
    "Pneumothorax", "Mass", "Nodule", "Pneumonia", "Consolidation", "Edema", "Effusion",
    "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia", "Cardiomegaly", "Atelectasis",
    "Infiltration",
)  # fmt: skip


def _read_list(path: Path) -> set[str]:
    try:
        return {
            ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines() if ln.strip()
        }
    except OSError as err:
        raise CasebaseError(f"{path}: cannot read ({err.strerror or err})") from None


def convert_nih_cxr14(
    metadata: Path, opts: ConvertOptions, report: ConvertReport
) -> tuple[list[Record], list[str]]:
    df = _read_csv(metadata, "NIH ChestX-ray14 Data_Entry")
    df = df[[c for c in df.columns if c and not c.startswith("Unnamed")]]
    _require(
        df,
        metadata,
        (
            "Image Index",
            "Finding Labels",
            "Patient ID",
            "Patient Age",
            "Patient Gender",
            "View Position",
        ),
        "NIH ChestX-ray14",
    )
    report.n_rows = len(df)
    test_list = train_list = None
    if not opts.ignore_official_split:
        t = _companion(opts, metadata, [r"^test_list\.txt$"])
        tv = _companion(opts, metadata, [r"^train_val_list\.txt$"])
        test_list = _read_list(t) if t else None
        train_list = _read_list(tv) if tv else None
        if t or tv:
            opts.say(f"nih-cxr14: official split from {', '.join(str(p) for p in (t, tv) if p)}")
    spacing_col = next((c for c in df.columns if c.startswith("OriginalImagePixelSpacing")), None)
    recs = []
    for r in df.to_dict("records"):
        name = r["Image Index"]
        found = [f.strip() for f in r["Finding Labels"].split("|") if f.strip()]
        positives = [f for f in found if f != "No Finding"]
        label, why = _pick_label(
            positives, "No Finding" in found and not positives, opts.label_policy, NIH_PRIORITY
        )
        if label is None:
            report.skipped[why] += 1
            continue
        m = re.match(r"^\d+_(\d+)", name)
        follow = (r.get("Follow-up #") or (m.group(1) if m else "")).strip()
        try:
            follow_txt = str(int(float(follow)))
        except ValueError:
            follow_txt = ""
        suffix = m.group(1) if m else hashlib.sha256(name.encode()).hexdigest()[:8]
        official = None
        if test_list is not None and name in test_list:
            official = "test"
        elif train_list is not None and name in train_list:
            official = "trainval"
        elif test_list is not None:  # listed nowhere, but a test list exists: not test
            official = "trainval"
        elif train_list is not None:  # only the train/val list: the rest is the test set
            official = "test"
        spacing = ""
        if spacing_col and r.get(spacing_col):
            try:
                spacing = f"{float(r[spacing_col]):.3f}"
            except ValueError:
                spacing = ""
        attrs = {
            "sex": normalise_sex(r["Patient Gender"]),
            "age": normalise_age(r["Patient Age"]),
            "view": r["View Position"].strip().upper(),
            "follow_up": follow_txt,
            "pixel_spacing": spacing,
        }
        pid_raw = r["Patient ID"].strip()
        recs.append(
            Record(
                case_id="{pid}" + f"_{suffix}",
                image=name,
                label=label,
                group="patient:" + pid_raw,
                attributes=attrs,
                official_split=official,
            )
        )
    return recs, ["sex", "age", "view", "follow_up", "pixel_spacing"]


# --------------------------------------------------------------------------- RSNA Pneumonia


def convert_rsna_pneumonia(
    metadata: Path, opts: ConvertOptions, report: ConvertReport
) -> tuple[list[Record], list[str]]:
    df = _read_csv(metadata, "RSNA Pneumonia labels")
    _require(df, metadata, ("patientId", "Target"), "RSNA Pneumonia")
    report.n_rows = len(df)
    classes: dict[str, str] = {}
    cls_path = _companion(opts, metadata, [r"detailed_class_info.*\.csv$", r"class_info.*\.csv$"])
    if cls_path is not None:
        cdf = _read_csv(cls_path, "RSNA detailed class info")
        _require(cdf, cls_path, ("patientId", "class"), "RSNA detailed class info")
        classes = dict(zip(cdf["patientId"], cdf["class"], strict=True))
    field_ = (opts.label_field or ("class" if classes else "target")).strip()
    if field_ not in ("class", "target"):
        raise CasebaseError(f"--label-field {field_!r}: for RSNA use class or target")
    if field_ == "class" and not classes:
        raise CasebaseError(
            f"--label-field class needs stage_2_detailed_class_info.csv beside {metadata} or via --extra"
        )
    boxes: dict[str, list[tuple[float, float, float, float]]] = defaultdict(list)
    target: dict[str, bool] = {}
    order: list[str] = []
    for r in df.to_dict("records"):
        pid = r["patientId"]
        if pid not in target:
            order.append(pid)
            target[pid] = False
        if _is_true(r["Target"]):
            target[pid] = True
            try:
                box = tuple(float(r[k]) for k in ("x", "y", "width", "height"))
            except (KeyError, ValueError):
                report.notes.append(
                    f"a Target=1 row without a usable box (patient row {len(order)})"
                )
                continue
            if box[2] > 0 and box[3] > 0:
                boxes[pid].append(box)
    recs = []
    for pid in order:
        if field_ == "class":
            label = classes.get(pid, "").strip()
            if not label:
                report.skipped["no class"] += 1
                continue
        else:
            label = "Lung Opacity" if target[pid] else "No Lung Opacity"
        recs.append(
            Record(
                case_id="{cid}",
                image=f"{pid}.dcm",
                label=label,
                group="patient:" + pid,
                boxes=boxes.get(pid, []),
            )
        )
    return recs, ["sex", "age", "view"]


def _rsna_headers(recs: list[Record], opts: ConvertOptions, report: ConvertReport) -> list[Record]:
    """Fill sex / age / view / geometry from each DICOM header; drop unreadable files."""
    import warnings

    import pydicom
    from tqdm import tqdm

    kept = []
    for rec in tqdm(
        recs, desc="reading DICOM headers", unit="file", disable=not opts.progress, leave=False
    ):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(rec.image_path, stop_before_pixels=True)
            rows, cols = int(ds.Rows), int(ds.Columns)
        except Exception as err:  # noqa: BLE001 - one bad file is reported, not fatal
            report.skipped["unreadable DICOM header"] += 1
            opts.say(f"skipped: {rec.image_path}: unreadable DICOM header ({type(err).__name__})")
            continue
        rec.attributes = {
            "sex": normalise_sex(ds.get("PatientSex", "")),
            "age": normalise_age(ds.get("PatientAge", "")),
            "view": str(ds.get("ViewPosition", "") or "").strip().upper(),
        }
        rec.shape = (rows, cols)
        kept.append(rec)
    return kept


def _box_mask_png(
    shape: tuple[int, int], boxes: Sequence[tuple[float, float, float, float]]
) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    h, w = shape
    mask = np.zeros((h, w), np.uint8)
    for x, y, bw, bh in boxes:
        x0, y0 = max(0, int(math.floor(x))), max(0, int(math.floor(y)))
        x1, y1 = min(w, int(math.ceil(x + bw))), min(h, int(math.ceil(y + bh)))
        if x1 > x0 and y1 > y0:
            mask[y0:y1, x0:x1] = 255
    buf = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# --------------------------------------------------------------------------- driver

CONVERTERS: dict[
    str, Callable[[Path, ConvertOptions, ConvertReport], tuple[list[Record], list[str]]]
] = {
    "ham10000": convert_ham10000,
    "isic": convert_isic,
    "chexpert": convert_chexpert,
    "nih-cxr14": convert_nih_cxr14,
    "rsna-pneumonia": convert_rsna_pneumonia,
}


def _manifest_path(p: Path, out_dir: Path) -> str:
    """Relative to the manifest's folder when the file is under it, else absolute."""
    ap = p.resolve()
    try:
        return ap.relative_to(out_dir).as_posix()
    except ValueError:
        return ap.as_posix()


def convert(source: str, metadata: str | os.PathLike, opts: ConvertOptions) -> ConvertReport:
    """Convert ``metadata`` of data set ``source`` into a manifest at ``opts.out``."""
    from retrieval import atomic
    from retrieval.data.manifest import write_manifest
    from retrieval.data.privacy import hash_patient_id

    if source not in CONVERTERS:
        raise CasebaseError(f"unknown source {source!r} (one of {', '.join(CONVERTERS)})")
    if opts.label_policy not in ("single", "priority"):
        raise CasebaseError(f"--label-policy {opts.label_policy!r}: use single or priority")
    if opts.uncertain not in ("ignore", "positive", "negative"):
        raise CasebaseError(f"--uncertain {opts.uncertain!r}: use ignore, positive or negative")
    out = Path(opts.out).expanduser()
    if out.suffix.lower() not in (".csv", ".parquet", ".pq"):
        raise CasebaseError(f"--out {out}: the manifest must end in .csv or .parquet")
    meta_path = Path(metadata).expanduser()
    opts.extra = [Path(p).expanduser() for p in opts.extra]
    for p in opts.extra:
        if not p.is_file():
            raise CasebaseError(f"--extra {p}: file not found")
    finder = _ImageFinder(Path(opts.images).expanduser(), opts.progress)
    report = ConvertReport(source=source)
    recs, attr_cols = CONVERTERS[source](meta_path, opts, report)
    if opts.ignore_official_split:
        for r in recs:
            r.official_split = None

    # images: every row's file must exist under --images
    kept: list[Record] = []
    for rec in recs:
        if source == "chexpert":
            path = finder.by_relpath(rec.image)
        elif source == "isic":
            path = finder.by_name(rec.image, stems=(rec.image + "_downsampled",))
        else:
            path = finder.by_name(rec.image)
        if path is None:
            report.skipped["image not found"] += 1
            if len(report.missing_examples) < 5:
                report.missing_examples.append(rec.image)
            continue
        rec.image_path = path
        kept.append(rec)
    if report.n_missing:
        examples = ", ".join(report.missing_examples)
        msg = (
            f"{report.n_missing} of {len(recs)} images not found under {opts.images} "
            f"(e.g. {examples})"
        )
        if opts.strict:
            raise CasebaseError(msg + " (--strict)")
        opts.say(f"{source}: skipping {msg}")
    if source == "rsna-pneumonia":
        kept = _rsna_headers(kept, opts, report)
    if not kept:
        hint = "; is --images the folder holding the images?" if report.n_missing else ""
        raise CasebaseError(f"{source}: no usable rows in {meta_path} ({report.summary()}){hint}")

    # hashed groups, case ids, splits
    hashed = {g: hash_patient_id(g.split(":", 1)[1]) for g in {r.group for r in kept}}
    splits = patient_disjoint_splits(
        [r.group for r in kept],
        [r.label for r in kept],
        seed=opts.seed,
        val_fraction=opts.val_fraction,
        test_fraction=opts.test_fraction,
        official=[r.official_split for r in kept],
    )
    out_dir = out.resolve().parent
    from retrieval.data.phi_paths import PseudonymousLinks

    links = PseudonymousLinks(out.resolve()) if source in LINKED_SOURCES else None
    mask_dir = Path(opts.masks).expanduser().resolve() if opts.masks else out_dir / "masks"
    rows = []
    seen: Counter = Counter()
    for rec, split in zip(kept, splits, strict=True):
        pid = hashed[rec.group]
        if rec.case_id == "{cid}":
            cid = "c" + pid[1:]
        else:
            cid = rec.case_id.replace("{pid}", pid)
        seen[cid] += 1
        if seen[cid] > 1:
            cid = f"{cid}-{seen[cid]}"
        row = {
            "case_id": cid,
            "image": (
                links.add(rec.image_path, cid)
                if links is not None
                else _manifest_path(rec.image_path, out_dir)
            ),
            "label": rec.label,
            "split": split,
            "patient_id": pid,
        }
        if source == "rsna-pneumonia":
            row["mask"] = ""
            if rec.boxes:
                mpath = mask_dir / f"{cid}.png"
                atomic.write_bytes(mpath, _box_mask_png(rec.shape, rec.boxes))
                row["mask"] = _manifest_path(mpath, out_dir)
                report.n_masks += 1
        for c in attr_cols:
            row[c] = rec.attributes.get(c, "")
        rows.append(row)
    columns = ["case_id", "image", "label", "split", "patient_id"]
    if source == "rsna-pneumonia":
        columns.append("mask")
    df = pd.DataFrame(rows, columns=columns + list(attr_cols))
    if links is not None and links.commit() is not None:
        opts.say(
            f"{source}: the file names carry patient ids: the manifest points at "
            f"{len(links)} pseudonymous links in {links.final}"
        )
    try:
        write_manifest(df, out)
    except Exception as err:  # noqa: BLE001 - OSError, pyarrow errors
        raise CasebaseError(f"cannot write {out}: {type(err).__name__}: {err}") from None
    report.manifest = out
    report.n_written = len(df)
    report.n_patients = df["patient_id"].nunique()
    report.labels = dict(sorted(Counter(df["label"]).items()))
    report.splits = {s: int(n) for s, n in sorted(Counter(df["split"]).items())}
    return report
