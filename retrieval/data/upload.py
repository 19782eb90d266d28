"""What an uploaded file says about its patient, pseudonymised exactly as ingest does.

The app's "Exclude this patient's cases" needs the upload's patient in the
index's terms: ``hash_patient_id`` of the DICOM PatientID (of the
StudyInstanceUID when PatientID is empty), the rule of
``retrieval.data.dicom_ingest.record_for_file``. The raw id never leaves this
function.
"""

from __future__ import annotations

import io
import warnings

from retrieval.data.dicom_ingest import _get, _looks_like_headerless
from retrieval.data.privacy import hash_patient_id


def upload_patient(data: bytes) -> str | None:
    """The pseudonymised patient of DICOM bytes; None when not DICOM or without an id."""
    import pydicom

    head = data[:132]
    if not (len(head) >= 132 and head[128:132] == b"DICM") and not _looks_like_headerless(head):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    except Exception:  # noqa: BLE001 - not readable as DICOM: no patient to exclude
        return None
    basis = _get(ds, "PatientID") or _get(ds, "StudyInstanceUID")
    return hash_patient_id(basis) if basis else None
