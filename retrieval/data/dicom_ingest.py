"""Turn a folder tree of DICOM files into a casebase manifest, without PHI.

``ingest_dicom(DICOM_DIR, OUT)`` walks every file under ``DICOM_DIR`` (DICOM
is recognised by content: the ``DICM`` magic, or a file without preamble that
parses as DICOM), reads each header, decodes the pixels with
:func:`retrieval.data.imageio.read_image` to prove the image can be used, and
writes one manifest row per decodable image (CSV or Parquet by the output's
extension, atomically), except that a CT / MR series of at least 3 slices becomes
one row, a volume (the rule: :mod:`retrieval.data.series_ingest`).

What goes into the manifest:

* ``case_id``: ``c_`` + 16 hex digits of SHA-256 of the SOPInstanceUID (or a
  keyed hash of the relative path when there is none); UIDs shared by several
  files get a path-derived suffix;
* ``image``: the path relative to the manifest's folder; when that path looks
  identifying (a folder or file named after the patient, an MRN, a date: see
  :mod:`retrieval.data.phi_paths`), a pseudonymous link
  ``<manifest stem>.links/<case_id>.dcm`` to the file instead;
* ``label``: from ``--label-from`` (required: a DICOM keyword, ``csv:PATH``
  mapping ``file`` -> ``label``, or ``folder`` for the parent folder's name,
  refused when a folder name looks identifying), "unknown" if empty;
* ``split``: train / val / test (70/15/15), decided by the hashed patient so
  that a patient's files never straddle splits and reruns agree;
* ``patient_id``: :func:`retrieval.data.privacy.hash_patient_id` of PatientID (of
  StudyInstanceUID when PatientID is empty);
* attributes ``modality``, ``manufacturer``, ``body_part``, ``view``, ``sex``,
  ``age_band`` (from PatientAge, else birth date vs study date), ``rows``,
  ``columns``, ``photometric``.

Never written: PatientName, the raw PatientID, birth or any other date, or
any other header value not listed above, nor a path component that looks
like a name, an id or a date.
"""

from __future__ import annotations

import csv
import hashlib
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from retrieval.errors import CasebaseError, ImageReadError, ManifestError

__all__ = ["IngestReport", "ingest_dicom", "split_for_patient", "is_dicom_file"]

ATTRIBUTE_COLUMNS = (
    "modality",
    "manufacturer",
    "body_part",
    "view",
    "sex",
    "age_band",
    "rows",
    "columns",
    "photometric",
)
COLUMNS = ("case_id", "image", "label", "split", "patient_id") + ATTRIBUTE_COLUMNS

# keywords that identify a person or a date: never usable as labels
_PHI_KEYWORDS = {
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "IssuerOfPatientID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "InstitutionAddress",
    "StudyID",
    "MedicalRecordLocator",
}


@dataclass
class IngestReport:
    manifest: Path | None
    n_ingested: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of DICOM files
    ignored: list[tuple[str, str]] = field(default_factory=list)  # non-DICOM files
    labels: dict[str, int] = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)
    n_linked: int = 0  # images written as pseudonymous links (identifying paths)
    # (path, note) of ingested files read in part: a multi-frame file's middle frame
    notes: list[tuple[str, str]] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def summary(self) -> str:
        text = f"ingested {self.n_ingested}, skipped {self.n_skipped}"
        if self.ignored:
            text += f" (and ignored {len(self.ignored)} non-DICOM files)"
        if self.notes:
            n = len(self.notes)
            text += (
                f"; {n} multi-frame file{'s' if n != 1 else ''}: a 2-D model reads only the "
                "middle frame of each"
            )
        return text


def split_for_patient(patient_hash: str) -> str:
    """Deterministic 70/15/15 split of a (hashed) patient id."""
    u = int(hashlib.sha256(("split:" + patient_hash).encode()).hexdigest()[:8], 16) / 2**32
    return "train" if u < 0.70 else ("val" if u < 0.85 else "test")


def _looks_like_headerless(head: bytes) -> bool:
    if len(head) < 8:
        return False
    return int.from_bytes(head[0:2], "little") in (0x0002, 0x0008) or int.from_bytes(
        head[0:2], "big"
    ) in (0x0002, 0x0008)


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True when the file's content looks like DICOM (magic, or a preamble-less stream)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return (len(head) >= 132 and head[128:132] == b"DICM") or _looks_like_headerless(head)


def _read_header(path: Path):
    """(dataset or None, reason-if-not-DICOM or None, is_dicom)."""
    import pydicom

    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as err:
        return None, f"cannot read ({err.strerror or err})", True
    if not head:
        return None, "empty file", path.suffix.lower() in (".dcm", ".dicom", ".dic")
    magic = len(head) >= 132 and head[128:132] == b"DICM"
    # a file named .dcm that cannot be read is a bad DICOM file (skipped by name), not "other"
    named_dicom = path.suffix.lower() in (".dcm", ".dicom", ".dic")
    headerless = not magic and (_looks_like_headerless(head) or named_dicom)
    if not magic and not headerless:
        return None, "not a DICOM file", False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=not magic)
    except Exception as err:  # noqa: BLE001
        reason = (
            f"unreadable DICOM header ({type(err).__name__}: {' '.join(str(err).split())[:200]})"
        )
        return None, reason, magic or named_dicom
    if not magic and not (named_dicom and len(ds) > 0):
        known = (
            "SOPClassUID",
            "SOPInstanceUID",
            "StudyInstanceUID",
            "Rows",
            "PatientID",
            "Modality",
        )
        try:
            ok = any(k in ds for k in known)
        except Exception:  # noqa: BLE001
            ok = False
        if not ok:
            if named_dicom:
                return None, f"not a DICOM file (named {path.suffix} but holds no DICOM data)", True
            return None, "not a DICOM file", False
    return ds, None, True


def _get(ds, keyword: str) -> str:
    from pydicom.config import disable_value_validation

    try:
        # no validation: pydicom's reading warnings ("Invalid value for VR UI: '<the value>'")
        # would put header values on stderr and in logs
        with disable_value_validation(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = ds.get(keyword, "")
    except Exception:  # noqa: BLE001 - a malformed element is just missing to us
        return ""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    text = str(value).replace("\x00", "").strip()
    return " ".join(text.split())


def _sop_class_name(ds) -> str:
    uid = _get(ds, "SOPClassUID") or _get(
        getattr(ds, "file_meta", {}) or {}, "MediaStorageSOPClassUID"
    )
    if not uid:
        return ""
    try:
        from pydicom.config import disable_value_validation
        from pydicom.uid import UID

        with disable_value_validation(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            u = UID(uid)
            # a corrupted header can make this "UID" swallow the bytes after it (names, ids):
            # never echo one that is not a well-formed UID
            return u.name if u.is_valid else ""
    except Exception:  # noqa: BLE001
        return ""


class _LabelSource:
    def __init__(self, spec: str | None, root: Path):
        self.root = root
        if spec is None or not str(spec).strip():
            raise CasebaseError(
                "ingest-dicom needs --label-from: a DICOM keyword (e.g. SeriesDescription, "
                "BodyPartExamined), csv:PATH (columns file,label), or folder (each file's parent "
                "folder name; refused when a folder is named after a patient, an MRN or a date)"
            )
        spec = str(spec).strip()
        self.kind = "folder"
        self.keyword = ""
        self.mapping: dict[str, str] = {}
        self.by_name: dict[str, str] = {}
        if spec == "folder":
            return
        csv_path = None
        if spec.startswith("csv:"):
            csv_path = Path(spec[4:]).expanduser()
        elif spec.lower().endswith((".csv", ".tsv")) or os.sep in spec or "/" in spec:
            csv_path = Path(spec).expanduser()
        if csv_path is not None:
            self.kind = "csv"
            self._load_csv(csv_path)
            return
        from pydicom.datadict import tag_for_keyword

        if tag_for_keyword(spec) is None:
            raise CasebaseError(
                f"--label-from {spec!r}: not 'folder', 'csv:PATH' or a DICOM keyword "
                "(e.g. SeriesDescription, BodyPartExamined)"
            )
        allowed_patient = ("PatientSex", "PatientAge", "PatientOrientation", "PatientPosition")
        if (
            spec in _PHI_KEYWORDS
            or spec.endswith(("Date", "Time", "DateTime"))
            or (spec.startswith("Patient") and spec not in allowed_patient)
        ):
            raise CasebaseError(
                f"--label-from {spec}: refusing to use an identifying or date element as a label"
            )
        self.kind = "keyword"
        self.keyword = spec

    def _load_csv(self, path: Path) -> None:
        if not path.is_file():
            raise CasebaseError(f"--label-from: mapping file {path} not found")
        try:
            with open(path, newline="", encoding="utf-8-sig") as fh:
                sample = fh.read(4096)
                fh.seek(0)
                delim = "\t" if sample.count("\t") > sample.count(",") else ","
                reader = csv.DictReader(fh, delimiter=delim)
                fields = [f.strip().lower() for f in (reader.fieldnames or [])]
                if "file" not in fields or "label" not in fields:
                    raise CasebaseError(
                        f"--label-from {path}: the mapping needs columns 'file' and 'label' "
                        f"(found {', '.join(fields) or 'none'})"
                    )
                for row in reader:
                    row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
                    f, lab = row.get("file", ""), row.get("label", "")
                    if not f:
                        continue
                    key = f.replace("\\", "/")
                    p = Path(key)
                    if p.is_absolute():
                        try:
                            key = p.resolve().relative_to(self.root.resolve()).as_posix()
                        except ValueError:
                            key = p.as_posix()
                    if key.startswith("./"):
                        key = key[2:]
                    self.mapping[key] = lab
                    self.by_name.setdefault(p.name, lab)
        except CasebaseError:
            raise
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            raise CasebaseError(f"--label-from {path}: cannot read the mapping ({err})") from None

    def label(self, path: Path, rel: str, ds) -> str:
        if self.kind == "folder":
            value = path.parent.name
            from retrieval.data.phi_paths import header_identifiers, identifying_reason

            why = identifying_reason(value, *header_identifiers(ds))
            if why:  # never echo the name: it may be a patient's
                raise CasebaseError(
                    f"--label-from folder: refusing folder names as labels: one {why} (the "
                    "name is not repeated here); name the folders after the classes, or use "
                    "--label-from csv:PATH or a DICOM keyword"
                )
        elif self.kind == "keyword":
            value = _get(ds, self.keyword)
        else:
            value = self.mapping.get(rel) or self.by_name.get(path.name, "")
        value = " ".join(str(value).split())
        return value or "unknown"


def _case_id(ds, rel: str, used: set[str]) -> str:
    uid = _get(ds, "SOPInstanceUID")
    from retrieval.data.privacy import keyed_digest

    # a path may carry a patient's name: only a keyed hash of it (a UID identifies no one)
    cid = "c_" + (hashlib.sha256(("uid:" + uid).encode()).hexdigest()[:16] if uid else "")
    if not uid:
        cid += keyed_digest("path:" + rel)
    if cid in used:
        cid = cid + "-" + keyed_digest("path:" + rel, 6)
    k = 2
    base = cid
    while cid in used:
        cid = f"{base}-{k}"
        k += 1
    used.add(cid)
    return cid


def _attributes(ds, loaded) -> dict[str, str]:
    from retrieval.data.privacy import age_band, age_band_from_dates, parse_dicom_age

    sex = _get(ds, "PatientSex").upper()[:1]
    sex = sex if sex in ("M", "F", "O") else ""
    band = ""
    age = parse_dicom_age(_get(ds, "PatientAge"))
    if age is not None:
        band = age_band(age)
    if not band:
        study = _get(ds, "StudyDate") or _get(ds, "SeriesDate") or _get(ds, "AcquisitionDate")
        band = age_band_from_dates(_get(ds, "PatientBirthDate"), study)
    view = _get(ds, "ViewPosition") or _get(ds, "ImageLaterality") or _get(ds, "Laterality")
    rows, cols = loaded.original_size
    return {
        "modality": _get(ds, "Modality"),
        "manufacturer": _get(ds, "Manufacturer"),
        "body_part": _get(ds, "BodyPartExamined"),
        "view": view,
        "sex": sex,
        "age_band": band,
        "rows": str(rows),
        "columns": str(cols),
        "photometric": str(loaded.meta.get("photometric", ""))
        or _get(ds, "PhotometricInterpretation"),
    }


def _walk(root: Path, exclude: set[Path], skip_dirs: set[Path] = frozenset()) -> list[Path]:
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if (Path(dirpath) / d).resolve() not in skip_dirs)
        for name in sorted(filenames):
            p = Path(dirpath) / name
            try:
                if p.is_symlink() and not p.exists():
                    continue
                if p.resolve() in exclude:
                    continue
            except OSError:
                continue
            files.append(p)
    return files


def record_for_file(
    path: Path,
    rel: str,
    label_for,
    used_ids: set[str],
    out_dir: Path,
    links=None,
    notes: list[str] | None = None,
):
    """The manifest row for one file: ``(row, None, True)`` or ``(None, reason, is_dicom)``.

    Shared by ``ingest-dicom`` and ``ingest-dicomweb`` so both write identical
    rows. ``label_for(path, rel, ds)`` gives the label; ``used_ids`` keeps
    case ids unique across calls; ``links`` (a
    :class:`retrieval.data.phi_paths.PseudonymousLinks`): where an image whose
    path looks identifying is linked under its case id instead. ``notes``: a list to receive
    how the file's image was read when only part of it was (a multi-frame file's middle frame).
    """
    from retrieval.data.imageio import read_image
    from retrieval.data.privacy import hash_patient_id

    ds, reason, is_dicom = _read_header(path)
    if ds is None and not is_dicom:
        return None, reason or "not a DICOM file", False
    loaded = None
    if ds is not None:
        try:
            loaded = read_image(path)
        except ImageReadError as err:
            reason = err.reason
        except Exception as err:  # noqa: BLE001 - never a traceback for one bad file
            reason = f"cannot decode ({type(err).__name__}: {err})"
    if loaded is None:
        reason = reason or "cannot decode"
        if ds is not None and reason.startswith("no pixel data"):
            kind = _sop_class_name(ds)
            if kind:
                reason = f"no pixel data ({kind})"
        return None, reason, True
    raw_pid = _get(ds, "PatientID")
    basis = raw_pid or _get(ds, "StudyInstanceUID") or ("file:" + rel)
    pid = hash_patient_id(basis)
    try:
        image_rel = os.path.relpath(path.resolve(), out_dir)
    except ValueError:  # another drive on Windows
        image_rel = str(path.resolve())
    label = label_for(path, rel, ds)
    case_id = _case_id(ds, rel, used_ids)
    image = Path(image_rel).as_posix()
    if links is not None:
        from retrieval.data.phi_paths import header_identifiers, path_reason

        if path_reason(links.scope(rel), *header_identifiers(ds)):
            image = links.add(path, case_id)
    row = {
        "case_id": case_id,
        "image": image,
        "label": label,
        "split": split_for_patient(pid),
        "patient_id": pid,
    }
    row.update(_attributes(ds, loaded))
    if notes is not None and loaded.meta.get("note"):
        notes.append(str(loaded.meta["note"]))
    return row, None, True


def ingest_dicom(
    dicom_dir: str | os.PathLike,
    out: str | os.PathLike,
    label_from: str | None = None,
    strict: bool = False,
    progress: bool = True,
    log=None,
) -> IngestReport:
    """Walk ``dicom_dir`` and write a PHI-free manifest at ``out``; see the module doc."""
    from tqdm import tqdm

    from retrieval.data.manifest import write_manifest

    root = Path(dicom_dir).expanduser()
    if not root.exists():
        raise CasebaseError(f"{root}: folder not found")
    if not root.is_dir():
        raise CasebaseError(f"{root}: not a folder")
    out_path = Path(out).expanduser()
    if out_path.suffix.lower() not in (".csv", ".parquet", ".pq"):
        raise CasebaseError(f"--out {out_path}: the manifest must end in .csv or .parquet")
    from retrieval.data.phi_paths import PseudonymousLinks

    labeler = _LabelSource(label_from, root)
    out_dir = out_path.resolve().parent
    exclude = {out_path.resolve()}
    links = PseudonymousLinks(out_path.resolve(), root)
    from retrieval.data.series_ingest import collapse_series, series_dir_for

    series_dir = series_dir_for(out_path.resolve())
    files = _walk(root, exclude, {links.final.resolve(), series_dir.resolve()})

    def say(line: str) -> None:
        if log is not None:
            log(line)
        else:
            tqdm.write(line, file=sys.stderr)

    report = IngestReport(manifest=None, n_ingested=0)
    rows: list[dict[str, str]] = []
    records: list[tuple[Path, str, dict[str, str]]] = []
    used_ids: set[str] = set()
    bar = tqdm(files, desc="ingesting DICOM", unit="file", disable=not progress, leave=False)
    for path in bar:
        rel = path.relative_to(root).as_posix()
        file_notes: list[str] = []
        row, reason, is_dicom = record_for_file(
            path, rel, labeler.label, used_ids, out_dir, links, notes=file_notes
        )
        if row is None and not is_dicom:
            report.ignored.append((str(path), reason))
            continue
        if row is None:
            if strict:
                bar.close()
                raise CasebaseError(
                    f"{path}: {reason} (--strict: stopping at the first unreadable file)"
                )
            report.skipped.append((str(path), reason))
            say(f"skipped: {path}: {reason}")
            continue
        for note in file_notes:
            report.notes.append((str(path), note))
            say(f"note: {path}: {note}")
        records.append((path, rel, row))
    bar.close()
    # CT / MR series -> one row each (retrieval.data.series_ingest states the rule)
    rows, broken = collapse_series(records, out_path.resolve(), used_ids)
    for where, reason in broken:
        if strict:
            raise CasebaseError(
                f"{where}: {reason} (--strict: stopping at the first broken series)"
            )
        report.skipped.append((where, reason))
        say(f"skipped: {where}: {reason}")

    report.n_ingested = len(rows)
    if not rows:
        raise CasebaseError(
            f"{root}: no decodable DICOM image found ({report.n_skipped} DICOM files skipped, "
            f"{len(report.ignored)} other files ignored)"
        )
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    if links.commit() is not None:
        report.n_linked = len(links)
        say(
            f"{len(links)} images lie under a folder or file name that looks identifying: the "
            f"manifest points at pseudonymous links in {links.final} instead"
        )
    try:
        write_manifest(df, out_path)
    except (OSError, ManifestError) as err:
        raise CasebaseError(f"cannot write {out_path}: {err}") from None
    except Exception as err:  # noqa: BLE001 - pyarrow errors
        raise CasebaseError(f"cannot write {out_path}: {type(err).__name__}: {err}") from None
    report.manifest = out_path
    report.labels = dict(sorted(df["label"].value_counts().to_dict().items()))
    report.splits = dict(sorted(df["split"].value_counts().to_dict().items()))
    return report
