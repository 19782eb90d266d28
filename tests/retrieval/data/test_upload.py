"""An uploaded DICOM's patient, pseudonymised as the manifest's patient_id."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pydicom

from retrieval.data.upload import upload_patient


def test_upload_patient_matches_the_manifest_pseudonym(phantom_dir):
    m = pd.read_csv(phantom_dir / "manifest.csv")
    for _, row in m.head(3).iterrows():
        data = (phantom_dir / row["image"]).read_bytes()
        assert upload_patient(data) == row["patient_id"]
        raw = str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).PatientID)
        assert raw and upload_patient(data) != raw  # a pseudonym, never the raw id


def test_no_patient_without_dicom_or_id(phantom_dir):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="PNG")
    assert upload_patient(buf.getvalue()) is None
    assert upload_patient(b"") is None
    m = pd.read_csv(phantom_dir / "manifest.csv")
    ds = pydicom.dcmread(phantom_dir / m["image"][0])
    ds.PatientID = ""
    ds.StudyInstanceUID = ""
    out = io.BytesIO()
    ds.save_as(out)
    assert upload_patient(out.getvalue()) is None
