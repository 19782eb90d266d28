"""DICOM out on anonymised queries: type-2 attributes that highdicom reads (PatientSex, StudyID,
...) may be absent; the SR and maps are still built, with those attributes empty (nothing
invented), and what cannot be built is a one-line CasebaseError, never an AttributeError."""

from __future__ import annotations

import io
import types

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from retrieval.data.dicom_out import build_parametric_maps, build_sr
from retrieval.errors import CasebaseError
from tests.retrieval.data.test_dicom_out import _roundtrip

_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber",
          "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")  # fmt: skip


def _anonymised(size: int = 16) -> Dataset:
    """A DX image with UIDs and pixels only: every patient / study type-2 attribute absent."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "DX"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.arange(size * size, dtype=np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def _result():
    n = types.SimpleNamespace(
        case_id="c1",
        label="nodule",
        similarity=0.9,
        attributes={},
        matched_regions=[types.SimpleNamespace(query_box=[1, 2, 8, 9])],
    )
    return types.SimpleNamespace(
        prediction=types.SimpleNamespace(
            label="nodule", probabilities={"nodule": 0.8, "clear": 0.2}
        ),
        outcome="answer",
        ood=types.SimpleNamespace(flag=False),
        neighbors=[n],
    )


def test_sr_and_map_of_a_query_lacking_type2_attributes():
    ds = _anonymised()
    assert not any(k in ds for k in _TYPE2)
    sr = _roundtrip(build_sr(_result(), [ds]))
    (seg,) = build_parametric_maps({"gradcam": np.random.default_rng(0).random((16, 16))}, [ds])
    seg = _roundtrip(seg)
    for obj in (sr, seg):
        assert obj.StudyInstanceUID == ds.StudyInstanceUID
        for k in _TYPE2:  # present (type 2) and empty: no value invented
            assert k in obj and str(obj[k].value or "") == "", k
    # the caller's dataset is left as it was
    assert not any(k in ds for k in _TYPE2)


def test_present_attributes_are_copied_not_blanked():
    ds = _anonymised()
    ds.PatientID, ds.PatientSex = "ANON01", "O"
    sr = _roundtrip(build_sr(_result(), [ds]))
    assert sr.PatientID == "ANON01" and sr.PatientSex == "O"
    assert str(sr.StudyID) == "" and "StudyID" not in ds


def test_missing_uid_is_a_one_line_error():
    ds = _anonymised()
    del ds.SOPInstanceUID
    with pytest.raises(CasebaseError, match="lacks SOPInstanceUID"):
        build_sr(_result(), [ds])


def test_other_highdicom_failures_are_one_line_errors():
    ds = _anonymised()
    ds.PatientSex = "MALE"  # not one of M / F / O: highdicom raises ValueError
    with pytest.raises(CasebaseError, match=r"--dicom-sr: cannot build the SR .*MALE") as err:
        build_sr(_result(), [ds])
    assert "\n" not in str(err.value)
