"""ingest-dicom makes one row per CT / MR series (retrieval.data.series_ingest), reports and
skips broken series, and keeps every other file one case per image."""

from __future__ import annotations

import pandas as pd
import pydicom
import pytest

from retrieval.data.dicom_ingest import ingest_dicom
from retrieval.data.manifest import validate_manifest
from retrieval.data.volume import read_volume
from tests.retrieval.data.test_dicomweb_orthanc import (  # noqa: F401 - pytest fixtures
    PASSWORD,
    USER,
    env,
    orthanc,
    phantom,
)
from tests.retrieval.data.test_volume import _ramp, write_series


def test_one_row_per_series_broken_series_skipped(tmp_path):
    data = tmp_path / "data"
    vals = _ramp(d=4)
    # a good CT series whose file names run against the slice order, in a folder named
    # after the patient (the manifest must not point into it)
    write_series(data / "DOE^JANE" / "ct", vals, names=[f"z{3 - k}.dcm" for k in range(4)])
    write_series(data / "b" / "mr", _ramp(d=4), modality="MR", patient_id="PHX0000002")
    # a broken MR series: a missing slice
    write_series(data / "c" / "broken", _ramp(d=4), modality="MR", positions=[0, 2, 4, 8],
                 patient_id="PHX0000003")  # fmt: skip
    # two CT slices of one series: too few for a volume, kept per image
    write_series(data / "d" / "pair", _ramp(d=2), patient_id="PHX0000004")
    out = tmp_path / "m.csv"
    lines: list[str] = []
    report = ingest_dicom(data, out, label_from="Modality", progress=False, log=lines.append)
    df = pd.read_csv(out, dtype=str, keep_default_na=False)
    series = df[df["case_id"].str.startswith("s_")]
    assert len(series) == 2 and set(series["label"]) == {"CT", "MR"}
    assert len(df) == 4  # 2 series + the 2 single slices
    assert report.n_ingested == 4
    # the broken series: one skipped entry naming the reason, none of its files ingested
    assert any("missing slice" in reason for _, reason in report.skipped)
    assert any("broken" in where and "series of 4 files" in where for where, _ in report.skipped)
    assert any("missing slice" in line for line in lines)
    # the series row points at a link folder beside the manifest, not at the patient's name
    ct = series[series["label"] == "CT"].iloc[0]
    assert ct["image"].startswith("m.series/") and "DOE" not in out.read_text()
    vol = read_volume(tmp_path / ct["image"])
    assert vol.shape == (4, 6, 7) and (vol.values == vals).all()
    assert ct["rows"] == "6" and ct["columns"] == "7" and ct["modality"] == "CT"
    # every image (series folders included) opens; only the one-MR-case label is flagged
    problems = validate_manifest(out, progress=False)
    assert [(p.column, "only 1 case" in p.message) for p in problems] == [("label", True)]
    # a rerun replaces the link folder and gives the same rows
    ingest_dicom(data, out, label_from="Modality", progress=False, log=lines.append)
    assert pd.read_csv(out, dtype=str, keep_default_na=False).equals(df)


def test_a_three_plane_localizer_stays_per_image(tmp_path):
    planes = [[1, 0, 0, 0, 1, 0], [1, 0, 0, 0, 0, -1], [0, 1, 0, 0, 0, -1]]
    write_series(tmp_path / "d" / "loc", _ramp(d=3), orientations=planes)
    write_series(tmp_path / "d" / "ax", _ramp(d=3), patient_id="PHX0000009")
    out = tmp_path / "m.csv"
    report = ingest_dicom(tmp_path / "d", out, label_from="Modality", progress=False)
    df = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert sorted(df["case_id"].str[:2]) == ["c_", "c_", "c_", "s_"] and report.skipped == []


@pytest.mark.orthanc
def test_ingest_dicomweb_makes_one_row_per_series(orthanc, tmp_path):  # noqa: F811
    import requests

    from retrieval.data.dicomweb import DicomWebAuth, ingest_dicomweb

    good = write_series(tmp_path / "good", _ramp(d=4), patient_id="PHX0000010")
    bad = write_series(tmp_path / "bad", _ramp(d=4), positions=[0, 2, 4, 8],
                       patient_id="PHX0000011")  # fmt: skip
    for f in good + bad:
        r = requests.post(f"{orthanc.rest}/instances", data=f.read_bytes(),
                          auth=(USER, PASSWORD), timeout=30)  # fmt: skip
        assert r.status_code == 200
    studies = [str(pydicom.dcmread(p[0]).StudyInstanceUID) for p in (good, bad)]
    out = tmp_path / "web.csv"
    report = ingest_dicomweb(
        orthanc.dicomweb,
        out,
        studies=studies,
        label_from="Modality",
        auth=DicomWebAuth(username=USER, password=PASSWORD),
        progress=False,
        log=lambda _line: None,
    )
    df = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(df["case_id"].str[:2]) == ["s_"] and df["label"].iloc[0] == "CT"
    assert read_volume(tmp_path / df["image"].iloc[0]).shape == (4, 6, 7)
    assert any("missing slice" in reason for _, reason in report.skipped)
