"""No patient name, id or MRN from a file path reaches a manifest.

Hospital exports often name folders and files after the patient
(``DOE_JOHN_MRN123456/IM0001.dcm``) and public data sets name files by patient
id (NIH ChestX-ray14 ``00000001_000.png``, CheXpert ``patient00001/``, RSNA
``<patientId>.dcm``). Two rules keep those names out of manifests, bundles,
JSON, reports and the app:

* a folder name becomes a label only when asked (``--label-from folder``), and
  then :func:`identifying_reason` refuses one that looks identifying;
* an image whose path looks identifying (or, for the data sets above, always)
  is written to the manifest as a *pseudonymous link*
  ``<manifest stem>.links/<case_id><ext>`` beside the manifest, pointing at the
  original file (:class:`PseudonymousLinks`). The name lives on only in the
  file system the data already sits in.

What "looks identifying" means (a heuristic, stated honestly): the component
holds a token of the DICOM PatientName, or the PatientID / OtherPatientIDs /
AccessionNumber, of the file(s) it names; or it has the shape of a DICOM
person name (``FAMILY^GIVEN``) or ``Family, Given``; or a record number (MRN,
ID, PID, patient, accession followed by 3+ digits); or a run of 6+ digits; or a
date. DICOM UIDs and hex digests (what casebase and PACS caches name files by)
are not identifying. A plain ``SURNAME_GIVEN`` with no digits is recognised only
through the headers (it cannot be told from a label such as ``LUNG_OPACITY``).
Messages never echo the name they refuse.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path

from retrieval.errors import CasebaseError

__all__ = ["PseudonymousLinks", "header_identifiers", "identifying_reason", "links_dir_for"]

_UID = re.compile(r"^\d+(?:\.\d+){3,}$")
_HEX_DIGEST = re.compile(r"^[0-9a-f]{24,}$", re.I)
_PERSON_NAME = re.compile(r"[^\W\d_]{2,}\s*\^\s*[^\W\d_]{2,}|[^\W\d_]{2,},\s*[^\W\d_]{2,}")
_RECORD_NO = re.compile(
    r"(?:^|[^a-z])(?:mrn|mr|pid|patient|pat|pt|id|acc|accession|nhs|ssn)[\s_#:.\-]*\d{3,}",
    re.I,
)
_DIGITS = re.compile(r"\d{6,}")
_DATE = re.compile(r"(?:19|20)\d\d[-./]\d\d?[-./]\d\d?|\d\d?[-./]\d\d?[-./](?:19|20)\d\d")


def _fold(text: str) -> str:
    """Case- and accent-insensitive form (``Zéldà`` -> ``zelda``)."""
    norm = unicodedata.normalize("NFKD", str(text))
    return "".join(c for c in norm if not unicodedata.combining(c)).casefold()


def _alnum(text: str) -> str:
    return re.sub(r"[\W_]+", "", _fold(text))


def _tokens(text: str) -> set[str]:
    return {t for t in re.split(r"[\W_\d]+", _fold(text)) if len(t) >= 2}


def _stem(name: str) -> str:
    """The name without a short file extension (``case.dcm`` -> ``case``)."""
    base, ext = os.path.splitext(name)
    return base if ext and len(ext) <= 6 and ext[1:].isalnum() else name


def header_identifiers(ds) -> tuple[list[str], list[str]]:
    """(name tokens, id values) of a pydicom dataset: PatientName parts; patient ids and accession."""
    from retrieval.data.dicom_ingest import _get

    names: list[str] = []
    for kw in ("PatientName", "OtherPatientNames", "PatientBirthName"):
        names += [p for p in re.split(r"[\^=\\,\s]+", _get(ds, kw)) if p]
    ids = [
        v
        for kw in ("PatientID", "OtherPatientIDs", "AccessionNumber", "MedicalRecordLocator")
        for v in re.split(r"\\", _get(ds, kw))
        if v.strip()
    ]
    return names, ids


def identifying_reason(name: str, names: Iterable[str] = (), ids: Iterable[str] = ()) -> str | None:
    """Why a folder or file name looks identifying, or None. Never includes the name itself.

    ``names``: parts of the PatientName (and similar) of the files it holds or
    names; ``ids``: their PatientID / OtherPatientIDs / AccessionNumber values.
    """
    stem = _stem(name).strip()
    if not stem or stem in (".", ".."):
        return None
    if _UID.match(stem) or _HEX_DIGEST.match(stem):
        return None
    toks = _tokens(stem)
    for part in names:
        folded = _tokens(part)
        if any(len(t) >= 3 for t in folded & toks):  # 2-letter parts ("de", "la") are too common
            return "holds the patient's name from the DICOM header"
    flat = _alnum(stem)
    for value in ids:
        v = _alnum(value)
        if len(v) >= 3 and v in flat:
            return "holds the patient id (or accession number) from the DICOM header"
    if _PERSON_NAME.search(stem):
        return "has the shape of a person's name (FAMILY^GIVEN or 'Family, Given')"
    if _RECORD_NO.search(stem):
        return "looks like a record number (MRN / ID / patient followed by digits)"
    if _DATE.search(stem):
        return "holds a date"
    if _DIGITS.search(stem):
        return "holds a run of 6 or more digits (an MRN, an id or a date?)"
    return None


def path_reason(rel_path: str, names: Iterable[str] = (), ids: Iterable[str] = ()) -> str | None:
    """:func:`identifying_reason` of the first identifying component of a relative path."""
    names, ids = list(names), list(ids)
    for part in Path(rel_path).parts:
        if part in ("..", ".", "/"):
            continue
        why = identifying_reason(part, names, ids)
        if why:
            return why
    return None


def links_dir_for(manifest: Path) -> Path:
    """``<folder>/<stem>.links`` beside the manifest."""
    manifest = Path(manifest)
    return manifest.parent / f"{manifest.stem}.links"


_SAFE_EXT = re.compile(r"^\.[A-Za-z0-9]{1,6}$")


class PseudonymousLinks:
    """Links named by case id, beside the manifest, to images whose own path is identifying.

    ``add(target, case_id)`` returns the manifest-relative path of the link
    (``<stem>.links/<case_id><ext>``); ``commit()`` creates every link in a
    temporary folder and swaps it into place atomically (the previous links
    folder of that manifest is replaced). Symbolic links, else hard links.
    """

    def __init__(self, manifest: Path, root: Path | None = None):
        self.manifest = Path(manifest)
        self.final = links_dir_for(self.manifest)
        self.items: list[tuple[Path, str]] = []
        self.root_name = Path(root).resolve().name if root is not None else ""

    def scope(self, rel: str) -> str:
        """What is checked of a file's path: the data folder's own name and the path below it
        (the folders above it are where the user keeps data, and often share words with the
        headers, e.g. a folder named "phantom" for phantom data)."""
        return f"{self.root_name}/{rel}" if self.root_name else rel

    def add(self, target: Path, case_id: str) -> str:
        ext = Path(target).suffix
        name = f"{case_id}{ext.lower() if _SAFE_EXT.match(ext) else ''}"
        self.items.append((Path(target).resolve(), name))
        return f"{self.final.name}/{name}"

    def __len__(self) -> int:
        return len(self.items)

    def commit(self) -> Path | None:
        if not self.items:
            return None
        from retrieval import atomic

        try:
            with atomic.atomic_dir(self.final) as tmp:
                for target, name in self.items:
                    try:
                        os.symlink(target, tmp / name)
                    except OSError:
                        os.link(target, tmp / name)
        except OSError as err:
            raise CasebaseError(
                f"cannot create the pseudonymous image links in {self.final} "
                f"({err.strerror or err})"
            ) from None
        return self.final


def is_inside(path: Path, folder: Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except ValueError:
        return False
