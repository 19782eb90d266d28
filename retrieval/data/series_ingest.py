"""One manifest row per CT / MR series, for ``ingest-dicom`` and ``ingest-dicomweb``.

The rule: files whose Modality is CT or MR, single-frame, sharing one
SeriesInstanceUID and one ImageOrientationPatient, at least
:data:`MIN_SERIES_SLICES` of them, make **one series case** (a volume, see
:mod:`retrieval.data.volume`). Every other file stays one case per image, as
before (so a 3-plane localizer, several orientations in one series, stays per
image). A series that is not one regular volume (missing slices, uneven
spacing, duplicate positions, slices of different sizes or without positions)
is reported with the reason and skipped, none of its files ingested; the rest
of the batch goes on.

A series case's ``image`` is a folder ``<manifest stem>.series/<case_id>/``
holding links ``0000.dcm``, ``0001.dcm``, ... (in slice order) to the series'
files, so that it names exactly one series and no identifying path; it is
created atomically beside the manifest (the previous one replaced). Its
``case_id`` is ``s_`` + 16 hex digits of SHA-256 of the SeriesInstanceUID;
``rows`` / ``columns`` are the slice size; the other columns are as for a
single image (from the series' first slice).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import defaultdict
from pathlib import Path

from retrieval.errors import CasebaseError

__all__ = ["MIN_SERIES_SLICES", "SERIES_MODALITIES", "collapse_series", "series_dir_for"]

SERIES_MODALITIES = ("CT", "MR")
MIN_SERIES_SLICES = 3


def series_dir_for(manifest: Path) -> Path:
    manifest = Path(manifest)
    return manifest.parent / f"{manifest.stem}.series"


class _Shim:
    """What dicom_ingest._attributes reads of a LoadedImage."""

    def __init__(self, size, photometric):
        self.original_size = size
        self.meta = {"photometric": photometric}


def collapse_series(records, out_manifest: Path, used_ids: set[str]):
    """Replace the per-image rows of each CT / MR series by one series row.

    ``records``: ``[(path, rel, row)]`` of the per-image rows already made (the
    series row takes its label from its first file's row).
    Returns ``(rows, skipped)``: the new row list (series rows where their
    first slice was) and ``[(where, reason)]`` for broken series.
    """
    import pydicom

    from retrieval.data.dicom_ingest import _attributes, _get, split_for_patient
    from retrieval.data.privacy import hash_patient_id
    from retrieval.data.volume import VolumeError, series_from_datasets

    groups: dict[str, list[int]] = defaultdict(list)
    headers = {}
    for i, (path, _rel, row) in enumerate(records):
        if row.get("modality", "").upper() not in SERIES_MODALITIES:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:  # noqa: BLE001 - it was decoded once already; leave it per image
            continue
        uid = _get(ds, "SeriesInstanceUID")
        if not uid or int(ds.get("NumberOfFrames", 1) or 1) > 1:
            continue
        headers[i] = ds
        groups[uid].append(i)
    groups = {
        u: ix
        for u, ix in groups.items()
        if len(ix) >= MIN_SERIES_SLICES and len({_orientation(headers[i]) for i in ix}) == 1
    }
    if not groups:
        return [r for _, _, r in records], []

    final = series_dir_for(out_manifest)
    links: list[tuple[str, list[Path]]] = []
    series_row: dict[int, dict[str, str]] = {}
    drop: set[int] = set()
    skipped: list[tuple[str, str]] = []
    for uid, idx in groups.items():
        drop.update(idx)
        first_path = Path(records[idx[0]][0])
        where = f"{first_path.parent} (series of {len(idx)} files)"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                datasets = [pydicom.dcmread(records[i][0], force=True) for i in idx]
            vol = series_from_datasets(datasets, source="series")
        except VolumeError as err:
            skipped.append((where, str(err).removeprefix("series: ")))
            continue
        except Exception as err:  # noqa: BLE001 - one bad series never stops the batch
            skipped.append((where, f"cannot read the series ({type(err).__name__}: {err})"))
            continue
        ordered = [Path(records[idx[j]][0]) for j in _order(datasets, vol)]
        ds0 = headers[idx[0]]
        case_id = "s_" + hashlib.sha256(("series:" + uid).encode()).hexdigest()[:16]
        k = 2
        base = case_id
        while case_id in used_ids:
            case_id = f"{base}-{k}"
            k += 1
        used_ids.add(case_id)
        for i in idx:  # the per-image ids are no longer used
            used_ids.discard(records[i][2]["case_id"])
        pid = hash_patient_id(_get(ds0, "PatientID") or _get(ds0, "StudyInstanceUID") or uid)
        row = {
            "case_id": case_id,
            "image": f"{final.name}/{case_id}",
            "label": records[idx[0]][2]["label"],  # the first slice's, as labelled per file
            "split": split_for_patient(pid),
            "patient_id": pid,
        }
        _, h, w = vol.shape
        row.update(_attributes(ds0, _Shim((h, w), _get(ds0, "PhotometricInterpretation"))))
        series_row[idx[0]] = row
        links.append((case_id, ordered))
    rows = []
    for i, (_, _, r) in enumerate(records):
        if i in series_row:
            rows.append(series_row[i])
        elif i not in drop:
            rows.append(r)
    if links:
        _write_links(final, links)
    return rows, skipped


def _orientation(ds) -> tuple:
    """ImageOrientationPatient rounded (a series of several, e.g. a 3-plane localizer, stays
    per image)."""
    try:
        return tuple(round(float(v), 3) for v in ds.ImageOrientationPatient)
    except (AttributeError, TypeError, ValueError):
        return ()


def _order(datasets, vol) -> list[int]:
    """Indices of ``datasets`` in the volume's slice order (by SOPInstanceUID)."""
    pos = {str(ds.get("SOPInstanceUID", "")): j for j, ds in enumerate(datasets)}
    order = [pos.get(u) for u in vol.meta.get("sop_instance_uids", [])]
    if None in order or len(set(order)) != len(datasets):
        return list(range(len(datasets)))
    return order  # type: ignore[return-value]


def _write_links(final: Path, links) -> None:
    from retrieval import atomic

    try:
        with atomic.atomic_dir(final) as tmp:
            for case_id, paths in links:
                d = tmp / case_id
                d.mkdir()
                for j, target in enumerate(paths):
                    try:
                        os.symlink(Path(target).resolve(), d / f"{j:04d}.dcm")
                    except OSError:
                        os.link(Path(target).resolve(), d / f"{j:04d}.dcm")
    except OSError as err:
        raise CasebaseError(
            f"cannot create the series folders in {final} ({err.strerror or err})"
        ) from None
