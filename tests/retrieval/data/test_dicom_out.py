"""DICOM out (retrieval.data.dicom_out): the answer as a Comprehensive 3D SR with matched
regions as spatial coordinates, maps as Parametric Maps, stored to a real Orthanc over STOW-RS
and read back; no PHI beyond the query's own."""

from __future__ import annotations

import io
import json
import types

import numpy as np
import pandas as pd
import pydicom
import pytest

from retrieval.cli import main
from retrieval.data.dicom_out import build_parametric_maps, build_sr, load_query_datasets
from retrieval.data.phantom3d import make_phantom3d
from retrieval.data.volume import read_volume
from retrieval.errors import CasebaseError
from tests.retrieval.data.test_dicomweb_orthanc import (  # noqa: F401 - pytest fixtures
    PASSWORD,
    USER,
    env,
    orthanc,
    phantom,
)

_PHI = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
        "ReferringPhysicianName", "StudyDate", "StudyID")  # fmt: skip


def _walk(items):
    for it in items:
        yield it
        yield from _walk(it.get("ContentSequence", []))


def _fake_result(box, case_attrs=None):
    reg = types.SimpleNamespace(query_box=box)
    n = types.SimpleNamespace(
        case_id="case_0003",
        label="mass",
        similarity=0.91,
        attributes=case_attrs or {},
        matched_regions=[reg],
    )
    return types.SimpleNamespace(
        prediction=types.SimpleNamespace(label="mass", probabilities={"mass": 0.7, "cavity": 0.3}),
        outcome="answer",
        ood=types.SimpleNamespace(flag=False),
        neighbors=[n],
    )


def _roundtrip(ds):
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def test_sr_and_maps_of_a_volume_query(tmp_path):
    make_phantom3d(tmp_path, n=12, size=32, depth=8, formats="dicom")
    folder = tmp_path / pd.read_csv(tmp_path / "manifest.csv")["image"].iloc[0]
    dss = load_query_datasets(folder)
    assert len(dss) == 8
    box = [3, 4, 1, 10, 12, 5]  # [x0, y0, z0, x1, y1, z1] voxels
    sr = _roundtrip(build_sr(_fake_result(box, {"series_instance_uid": "1.2.826.0.1.3"}), dss))
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    items = list(_walk(sr.ContentSequence))
    texts = {it.ConceptNameCodeSequence[0].CodeMeaning: it.get("TextValue") for it in items}
    assert texts["Predicted class"] == "mass" and texts["Case id"] == "case_0003"
    assert any(it.get("UID") == "1.2.826.0.1.3" for it in items)
    sc3 = [it for it in items if it.ValueType == "SCOORD3D"]
    assert len(sc3) == 1 and sc3[0].GraphicType == "MULTIPOINT"
    assert sc3[0].ReferencedFrameOfReferenceUID == dss[0].FrameOfReferenceUID
    pts = np.array(sc3[0].GraphicData, float).reshape(-1, 3)
    # the corners lie on the box's voxel edges, inside the volume's patient-space extent
    vol = read_volume(folder)
    o = np.array(vol.meta["origin"])
    sz, sy, sx = vol.spacing
    lo = o - 0.5 * np.array([sx, sy, sz])
    hi = lo + np.array([32 * sx, 32 * sy, 8 * sz])
    assert np.all(pts >= lo - 1e-3) and np.all(pts <= hi + 1e-3)
    assert pts[:, 2].min() == pytest.approx(o[2] + (1 - 0.5) * sz)
    assert pts[:, 0].max() == pytest.approx(o[0] + (10 - 0.5) * sx)
    # the patient module is the query's own, nothing added
    for kw in _PHI:
        assert str(sr.get(kw, "")) in ("", str(dss[0].get(kw, ""))), kw
    heat = np.random.default_rng(0).random((8, 32, 32)).astype(np.float32)
    (pmap,) = build_parametric_maps({"gradcam": heat}, dss)
    pmap = _roundtrip(pmap)
    assert pmap.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30" and int(pmap.NumberOfFrames) == 8
    # frames may come in another order; each carries its position: map back by position
    z = [float(f.PlanePositionSequence[0].ImagePositionPatient[2])
         for f in pmap.PerFrameFunctionalGroupsSequence]  # fmt: skip
    src_z = [float(d.ImagePositionPatient[2]) for d in dss]
    by_z = np.stack([pmap.pixel_array[z.index(v)] for v in src_z])
    np.testing.assert_allclose(by_z, heat)
    with pytest.raises(CasebaseError, match="shape"):
        build_parametric_maps({"gradcam": heat[:4]}, dss)
    # a 2-D answer on a series (today's 2-D model reads its middle slice) maps onto that slice
    (flat,) = build_parametric_maps({"gradcam": heat[4]}, dss)
    assert [r.ReferencedSOPInstanceUID for r in flat.SourceImageSequence] == [dss[4].SOPInstanceUID]
    sr2 = build_sr(_fake_result([1, 2, 5, 6]), dss)
    img = [it for it in _walk(sr2.ContentSequence) if it.ValueType == "IMAGE"]
    assert img[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == dss[4].SOPInstanceUID


def test_non_dicom_query_is_refused(tmp_path):
    np.save(tmp_path / "v.npy", np.zeros((8, 16, 16), np.float32))
    with pytest.raises(CasebaseError, match="needs a DICOM query"):
        load_query_datasets(tmp_path / "v.npy")


@pytest.mark.orthanc
@pytest.mark.slow
def test_query_dicom_sr_stowed_to_orthanc_and_read_back(
    orthanc,  # noqa: F811 - the imported fixture
    phantom,  # noqa: F811
    tiny_index,
    tmp_path,
    monkeypatch,
    capsys,
):
    import requests
    from dicomweb_client.api import DICOMwebClient

    monkeypatch.setenv("CASEBASE_DICOMWEB_USERNAME", USER)
    monkeypatch.setenv("CASEBASE_DICOMWEB_PASSWORD", PASSWORD)
    query = sorted((phantom / "images").rglob("*.dcm"))[0]
    out = tmp_path / "answer.dcm"
    capsys.readouterr()
    rc = main(["query", str(tiny_index), str(query), "-k", "3", "--explain", "gradcam",
               "--json", "--device", "cpu", "--dicom-sr", str(out), "--stow", orthanc.dicomweb])  # fmt: skip
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["dicom_sr"]["stored"] == 2 and len(res["dicom_sr"]["maps"]) == 1
    src = pydicom.dcmread(query)
    session = requests.Session()
    session.auth = (USER, PASSWORD)
    client = DICOMwebClient(url=orthanc.dicomweb, session=session)
    found = client.search_for_instances(
        study_instance_uid=str(src.StudyInstanceUID),
        search_filters={"SOPInstanceUID": res["dicom_sr"]["sr_sop_instance_uid"]},
    )
    assert len(found) == 1
    series = found[0]["0020000E"]["Value"][0]
    sr = client.retrieve_instance(
        str(src.StudyInstanceUID), series, res["dicom_sr"]["sr_sop_instance_uid"]
    )
    items = list(_walk(sr.ContentSequence))
    texts = {it.ConceptNameCodeSequence[0].CodeMeaning: it.get("TextValue") for it in items}
    assert texts["Predicted class"] == res["prediction"]["label"]
    cases = [it.TextValue for it in items if it.ConceptNameCodeSequence[0].CodeMeaning == "Case id"]
    assert cases == [n["case_id"] for n in res["neighbors"]]
    n_regions = sum(len(n.get("matched_regions", [])) for n in res["neighbors"])
    assert sum(it.ValueType == "SCOORD" for it in items) == n_regions
    for kw in _PHI:
        assert str(sr.get(kw, "")) in ("", str(src.get(kw, ""))), kw
    # the parametric map is in the same study, with the query's geometry
    # a projection image's map comes as a FRACTIONAL segmentation (no frame of reference)
    maps = client.search_for_instances(
        study_instance_uid=str(src.StudyInstanceUID), search_filters={"Modality": "SEG"}
    )
    assert maps, "the map was not stored"
    m = maps[-1]
    pm = client.retrieve_instance(
        str(src.StudyInstanceUID), m["0020000E"]["Value"][0], m["00080018"]["Value"][0]
    )
    assert (int(pm.Rows), int(pm.Columns)) == (int(src.Rows), int(src.Columns))
    assert np.isfinite(pm.pixel_array).all() and pm.pixel_array.max() > 0
