"""The answer back to the PACS as DICOM: a Structured Report and parametric maps (highdicom).

``casebase query ... --dicom-sr OUT.dcm [--stow URL]`` (issue 23, item 6):

* **SR** (Comprehensive 3D SR, :func:`build_sr`): a container "casebase retrieval
  result" holding the predicted label, each class probability, the outcome
  and the OOD flag, then one container per neighbour: its case id, label,
  cosine similarity, its UIDs when the index's attributes carry them
  (``study_instance_uid`` / ``series_instance_uid`` / ``sop_instance_uid``
  columns), and its matched regions: the *query's* box of each region as a
  spatial coordinate on the query: SCOORD (closed polyline rectangle, pixel
  coordinates, SELECTED FROM the query image) for a 2-D query
  ``[x0, y0, x1, y1]``; SCOORD3D (the 8 corners as a MULTIPOINT in patient mm,
  in the query series' frame of reference) for a volume ``[x0, y0, z0, x1, y1, z1]``.
* **Maps** (:func:`build_parametric_maps`): each explanation map as a
  Parametric Map (float32, the query's geometry, one frame per slice) for a
  CT / MR query, which viewers overlay on the source image; a projection
  image (CR / DX / SC, no patient frame of reference) gets a FRACTIONAL
  Segmentation of the map scaled to [0, 1] instead (highdicom cannot build a
  Parametric Map without plane geometry).
* **STOW** (:func:`stow`): every object stored over DICOMweb (dicomweb-client).

Privacy: the objects copy the patient / study modules from the query's own
DICOM (what highdicom takes from the evidence) and add nothing else of the
patient: neighbours appear by case id, label and UIDs only. Type-2 attributes
the query lacks (anonymised images often have no PatientSex, StudyID, ...) are
written empty, never invented. A query that is not DICOM cannot be answered as
DICOM, and what highdicom refuses is a one-line :class:`CasebaseError`.
"""

from __future__ import annotations

import os
import warnings
from functools import partial
from pathlib import Path

import numpy as np

from retrieval.errors import CasebaseError

__all__ = ["build_sr", "build_parametric_maps", "load_query_datasets", "stow", "write_objects"]

_SCHEME = "99CASEBASE"
_MANUFACTURER = "casebase"
# the equipment attributes every object casebase writes carries (highdicom keyword arguments)
_DEVICE = {
    "manufacturer": _MANUFACTURER,
    "manufacturer_model_name": "casebase",
    "software_versions": "casebase",
    "device_serial_number": "0",
}


def _code(value: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=_SCHEME, meaning=meaning)


def load_query_datasets(src: str | os.PathLike) -> list:
    """The query's DICOM datasets (one file, or a series folder in slice order)."""
    import pydicom

    p = Path(src)
    try:
        if p.is_dir():
            from retrieval.data.volume import VolumeError, read_volume

            try:
                vol = read_volume(p)
            except VolumeError as err:
                raise CasebaseError(f"--dicom-sr: {err}") from None
            order = {u: i for i, u in enumerate(vol.meta.get("sop_instance_uids", []))}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dss = [pydicom.dcmread(f, force=True) for f in sorted(p.iterdir()) if f.is_file()]
            dss = [d for d in dss if str(d.get("SOPInstanceUID", "")) in order]
            return sorted(dss, key=lambda d: order[str(d.SOPInstanceUID)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(p)
    except CasebaseError:
        raise
    except Exception:  # noqa: BLE001
        raise CasebaseError(
            f"--dicom-sr needs a DICOM query (a file, a series folder or a dicomweb:// URL); "
            f"{p} is not DICOM"
        ) from None
    if "PixelData" not in ds:
        raise CasebaseError(f"--dicom-sr: {p} holds no image")
    return [ds]


# Type-2 attributes (present, possibly empty) that highdicom 0.28 reads straight off the source
# image (sr/sop.py, pm/sop.py, seg/sop.py: ``evidence[0].PatientSex`` ...): an anonymised DICOM
# often lacks them, and highdicom then stops with an AttributeError.
_TYPE2_FROM_SOURCE = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
# Type-1 UIDs that reference the query: without them there is nothing to point the answer at.
_TYPE1_FROM_SOURCE = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")


def _as_source(datasets: list) -> list:
    """The query's datasets as highdicom needs them: each one lacking a type-2 attribute that
    highdicom reads is replaced by a copy with it present and empty (DICOM's "unknown"), so an
    anonymised image can be answered without inventing a name, a date or an id. The caller's
    datasets are not modified. A missing type-1 UID is a CasebaseError naming it."""
    from pydicom.dataset import Dataset

    out = []
    for ds in datasets:
        lacking = [k for k in _TYPE1_FROM_SOURCE if not str(ds.get(k, "") or "").strip()]
        if lacking:
            raise CasebaseError(
                f"--dicom-sr: the query DICOM lacks {', '.join(lacking)} "
                "(needed to reference it from the SR)"
            )
        empty = [k for k in _TYPE2_FROM_SOURCE if k not in ds]
        if not empty:
            out.append(ds)
            continue
        copy = Dataset()
        for elem in ds:  # shared elements, new container: the original gains nothing
            copy.add(elem)
        if hasattr(ds, "file_meta"):
            copy.file_meta = ds.file_meta
        for k in empty:
            setattr(copy, k, None)  # present with an empty value
        out.append(copy)
    return out


def _highdicom(what: str, build):
    """Run a highdicom constructor; its failures on the query's DICOM become one-line errors."""
    try:
        return build()
    except CasebaseError:
        raise
    except AttributeError as err:
        name = getattr(err, "name", None) or str(err).rsplit(" ", 1)[-1].strip("'\"")
        raise CasebaseError(
            f"--dicom-sr: cannot build the {what}: the query DICOM lacks {name}"
        ) from None
    except (ValueError, TypeError, KeyError) as err:
        msg = " ".join(str(err).split())[:300]
        raise CasebaseError(
            f"--dicom-sr: cannot build the {what} from the query DICOM: {msg}"
        ) from None


def _patient_mm(ds0, ijk: np.ndarray, dz: float) -> np.ndarray:
    """Voxel (x = column, y = row, z = slice) -> patient mm, from the first slice's geometry."""
    ori = np.array([float(v) for v in ds0.ImageOrientationPatient])
    row_dir, col_dir = ori[:3], ori[3:]
    normal = np.cross(row_dir, col_dir)
    origin = np.array([float(v) for v in ds0.ImagePositionPatient])
    dy, dx = (float(v) for v in ds0.PixelSpacing)
    return (
        origin
        + np.outer(ijk[:, 0] * dx, row_dir)
        + np.outer(ijk[:, 1] * dy, col_dir)
        + np.outer(ijk[:, 2] * dz, normal)
    )


def _region_items(box, datasets, volume_dz: float | None):
    """SCOORD / SCOORD3D content items for one query box."""
    from highdicom.sr import (
        ImageContentItem,
        Scoord3DContentItem,
        ScoordContentItem,
    )

    name = _code("CB-REGION", "Matched region of the query")
    box = [float(v) for v in box]
    if len(box) == 6:
        if volume_dz is None or "ImagePositionPatient" not in datasets[0]:
            raise CasebaseError("--dicom-sr: a 3-D matched region needs a volume query")
        x0, y0, z0, x1, y1, z1 = box
        corners = np.array(
            [[x, y, z] for z in (z0, z1) for y in (y0, y1) for x in (x0, x1)], dtype=np.float64
        )
        # voxel edges: box [x0, x1) covers voxel centres x0 .. x1 - 1
        corners = corners - 0.5
        mm = _patient_mm(datasets[0], corners, volume_dz)
        return Scoord3DContentItem(
            name=name,
            graphic_type="MULTIPOINT",
            graphic_data=mm,
            frame_of_reference_uid=str(datasets[0].FrameOfReferenceUID),
            relationship_type="CONTAINS",
        )
    if len(box) != 4:
        raise CasebaseError(f"--dicom-sr: a matched region box has 4 or 6 numbers (got {box})")
    x0, y0, x1, y1 = box
    pts = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)
    item = ScoordContentItem(
        name=name, graphic_type="POLYLINE", graphic_data=pts, relationship_type="CONTAINS"
    )
    ds = datasets[len(datasets) // 2]  # a 2-D answer on a series is about its middle slice
    item.ContentSequence = [
        ImageContentItem(
            name=_code("CB-SRC", "Source image"),
            referenced_sop_class_uid=str(ds.SOPClassUID),
            referenced_sop_instance_uid=str(ds.SOPInstanceUID),
            relationship_type="SELECTED FROM",
        )
    ]
    return item


def build_sr(result, datasets: list, *, series_number: int = 901):
    """A Comprehensive 3D SR of ``result`` (a QueryResult) with ``datasets`` as evidence."""
    from highdicom.sr import (
        CodedConcept,
        Comprehensive3DSR,
        ContainerContentItem,
        NumContentItem,
        TextContentItem,
        UIDRefContentItem,
    )
    from pydicom.uid import generate_uid

    datasets = _as_source(datasets)
    unit = CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")
    dz = _slice_step(datasets)
    items = [
        TextContentItem(
            name=_code("CB-PRED", "Predicted class"),
            value=str(result.prediction.label),
            relationship_type="CONTAINS",
        ),
        TextContentItem(
            name=_code("CB-OUTCOME", "Outcome"),
            value=str(result.outcome),
            relationship_type="CONTAINS",
        ),
        TextContentItem(
            name=_code("CB-OOD", "Out of distribution"),
            value="yes" if result.ood.flag else "no",
            relationship_type="CONTAINS",
        ),
    ]
    for label, p in result.prediction.probabilities.items():
        items.append(
            NumContentItem(
                name=_code("CB-PROB", f"Probability of {label}"[:64]),
                value=float(p),
                unit=unit,
                relationship_type="CONTAINS",
            )
        )
    for rank, n in enumerate(result.neighbors, 1):
        children = [
            TextContentItem(
                name=_code("CB-CASE", "Case id"), value=str(n.case_id), relationship_type="CONTAINS"
            ),
            TextContentItem(
                name=_code("CB-LABEL", "Case label"),
                value=str(n.label),
                relationship_type="CONTAINS",
            ),
            NumContentItem(
                name=_code("CB-COS", "Cosine similarity"),
                value=float(n.similarity),
                unit=unit,
                relationship_type="CONTAINS",
            ),
        ]
        for key, meaning in (
            ("study_instance_uid", "Study Instance UID"),
            ("series_instance_uid", "Series Instance UID"),
            ("sop_instance_uid", "SOP Instance UID"),
        ):
            uid = str((n.attributes or {}).get(key, "") or "")
            if uid:
                children.append(
                    UIDRefContentItem(
                        name=_code(f"CB-{key[:8].upper()}", meaning),
                        value=uid,
                        relationship_type="CONTAINS",
                    )
                )
        for reg in n.matched_regions:
            children.append(_region_items(reg.query_box, datasets, dz))
        items.append(
            ContainerContentItem(
                name=_code("CB-NEIGHBOUR", f"Similar case {rank}"),
                relationship_type="CONTAINS",
            )
        )
        items[-1].ContentSequence = children
    root = ContainerContentItem(name=_code("CB-RESULT", "casebase retrieval result"))
    root.ContentSequence = items
    return _highdicom(
        "SR",
        lambda: Comprehensive3DSR(
            evidence=datasets,
            content=root,
            series_instance_uid=generate_uid(),
            series_number=series_number,
            sop_instance_uid=generate_uid(),
            instance_number=1,
            manufacturer=_MANUFACTURER,
            is_complete=True,
        ),
    )


def _slice_step(datasets) -> float | None:
    if len(datasets) < 2 or "ImagePositionPatient" not in datasets[0]:
        return None
    a = np.array([float(v) for v in datasets[0].ImagePositionPatient])
    b = np.array([float(v) for v in datasets[1].ImagePositionPatient])
    return float(np.linalg.norm(b - a))


def build_parametric_maps(maps: dict, datasets: list, *, series_number: int = 902) -> list:
    """One Parametric Map per method: float32 maps of the query's geometry (H, W) or (D, H, W)."""
    from highdicom import VOILUTTransformation, pm
    from highdicom.sr import CodedConcept
    from pydicom.uid import generate_uid

    if not maps:
        return []
    datasets = _as_source(datasets)
    out = []
    n_frames = len(datasets)
    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    for k, (method, heat) in enumerate(sorted(maps.items())):
        arr = np.nan_to_num(np.asarray(heat, np.float32))
        src = datasets
        if arr.ndim == 2 and n_frames > 1:  # a 2-D map of a series: its middle slice
            src = [datasets[n_frames // 2]]
        arr = arr[None] if arr.ndim == 2 else arr
        if arr.shape != (len(src), rows, cols):
            raise CasebaseError(
                f"--dicom-sr: the {method} map's shape {tuple(arr.shape)} differs from the "
                f"query's ({len(src)}, {rows}, {cols})"
            )
        lo, hi = float(arr.min()), float(arr.max())
        if not _has_geometry(src):
            out.append(
                _highdicom(
                    f"{method} map",
                    partial(_fractional_segmentation, method, arr, lo, hi, src, series_number + k),
                )
            )
            continue
        mapping = pm.RealWorldValueMapping(
            lut_label=method[:16],
            lut_explanation=f"casebase {method} saliency"[:64],
            unit=CodedConcept(value="1", scheme_designator="UCUM", meaning="no units"),
            value_range=(lo, hi if hi > lo else lo + 1.0),
            slope=1.0,
            intercept=0.0,
        )
        build = partial(
            pm.ParametricMap,
            source_images=src,
            pixel_array=arr if len(src) > 1 else arr[0],
            series_instance_uid=generate_uid(),
            series_number=series_number + k,
            sop_instance_uid=generate_uid(),
            instance_number=1,
            **_DEVICE,
            contains_recognizable_visual_features=False,
            real_world_value_mappings=[mapping],
            voi_lut_transformations=[
                VOILUTTransformation(window_center=(lo + hi) / 2, window_width=max(hi - lo, 1e-6))
            ],
            content_label=method.upper().replace("-", "_")[:16] or "MAP",
            content_description=f"casebase {method} map"[:64],
        )
        out.append(_highdicom(f"{method} map", build))
    return out


def _has_geometry(datasets) -> bool:
    ds = datasets[0]
    return all(k in ds for k in ("FrameOfReferenceUID", "ImagePositionPatient", "PixelSpacing"))


def _fractional_segmentation(method: str, arr, lo: float, hi: float, src, series_number: int):
    """A projection image (CR / DX / SC: no patient frame of reference) gets its map as a
    FRACTIONAL Segmentation (the map min-max scaled to [0, 1]): highdicom 0.28 cannot build a
    Parametric Map without plane geometry, and viewers overlay segmentations as well."""
    from highdicom import AlgorithmIdentificationSequence, seg
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    scaled = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    desc = seg.SegmentDescription(
        segment_number=1,
        segment_label=f"{method} saliency"[:64],
        segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue,
        algorithm_type="AUTOMATIC",
        algorithm_identification=AlgorithmIdentificationSequence(
            name="casebase", version="1", family=codes.DCM.ArtificialIntelligence
        ),
    )
    return seg.Segmentation(
        source_images=src,
        pixel_array=scaled.astype(np.float32)[0] if len(src) == 1 else scaled.astype(np.float32),
        segmentation_type="FRACTIONAL",
        segment_descriptions=[desc],
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        **_DEVICE,
        series_description=f"casebase {method} map"[:64],
    )


def write_objects(sr, maps: list, out: str | os.PathLike) -> list[Path]:
    """The SR at ``out`` and each map beside it (``<stem>_<k>.dcm``), written atomically."""
    import io

    from retrieval import atomic

    out = Path(out)
    if out.is_dir():
        raise CasebaseError(
            f"--dicom-sr {out}: is a directory; give a file name such as result.dcm"
        )
    paths = []
    for i, ds in enumerate([sr, *maps]):
        p = out if i == 0 else out.with_name(f"{out.stem}_map{i}{out.suffix or '.dcm'}")
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        try:
            atomic.write_bytes(p, buf.getvalue())
        except OSError as err:
            raise CasebaseError(f"cannot write {p}: {err.strerror or err}") from None
        paths.append(p)
    return paths


def stow(url: str, datasets: list, auth=None) -> int:
    """Store ``datasets`` over DICOMweb (STOW-RS); returns how many the server accepted."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    from retrieval.data.dicomweb import auth_from_env, sanitize_url

    auth = auth if auth is not None else auth_from_env()
    session = requests.Session()
    if auth is not None and auth.token:
        session.headers["Authorization"] = f"Bearer {auth.token}"
    elif auth is not None and auth.username:
        session.auth = (auth.username, auth.password or "")
    client = DICOMwebClient(url=url.rstrip("/"), session=session)
    try:
        resp = client.store_instances(datasets=list(datasets))
    except Exception as err:  # noqa: BLE001 - HTTP / connection errors in one line
        msg = " ".join(str(err).split())[:300]
        for secret in auth.secrets if auth is not None else []:
            msg = msg.replace(secret, "***")
        raise CasebaseError(f"--stow {sanitize_url(url)}: {type(err).__name__}: {msg}") from None
    failed = resp.get("00081198") if resp is not None else None
    n_failed = len(failed.get("Value", [])) if isinstance(failed, dict) else 0
    if n_failed:
        raise CasebaseError(f"--stow {sanitize_url(url)}: the server refused {n_failed} object(s)")
    return len(datasets) - n_failed
