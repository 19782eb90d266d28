"""The app's query page says how the query image was read when only part of it was (a
multi-frame DICOM's middle frame), with st.info; a single-frame image gets no such note."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

APP = Path(__file__).resolve().parents[3] / "app.py"
CORPUS = Path(pydicom.__file__).parent / "data" / "test_files"
TIMEOUT = 180


def test_a_multi_frame_upload_shows_its_middle_frame_note(monkeypatch, tiny_index, phantom_dir):
    monkeypatch.setenv("CASEBASE_INDEX", str(tiny_index))
    monkeypatch.setenv("CASEBASE_MANIFEST", str(phantom_dir / "manifest.csv"))
    app = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert not app.exception, [e.value for e in app.exception]
    assert not any("middle frame" in str(e.value) for e in app.info)  # a picked test case
    app.radio(key="source").set_value("Upload an image").run()
    data = (CORPUS / "examples_ybr_color.dcm").read_bytes()  # 30 frames
    app.file_uploader(key="upload").upload("multi.dcm", data, "application/dicom")
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    infos = [str(e.value) for e in app.info]
    assert "Query image: multi-frame DICOM: middle frame 15 of 30 used" in infos, infos
