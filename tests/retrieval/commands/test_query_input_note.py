"""`casebase query`: how the query image was read when only part of it was (a multi-frame
DICOM's middle frame) is said, in text (stderr) and JSON (``input_note``); a text file named
.dcm is refused as "not a DICOM file", not as a DICOM file without pixel data."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom

from retrieval.cli import main
from retrieval.data.imageio import NOT_DICOM

CORPUS = Path(pydicom.__file__).parent / "data" / "test_files"
MULTI = CORPUS / "examples_ybr_color.dcm"  # 30 frames: the middle one (15) is used
NOTE = "multi-frame DICOM: middle frame 15 of 30 used"


def test_query_says_which_frame_of_a_multi_frame_dicom_it_used(tiny_index, capsys):
    argv = ["query", str(tiny_index), str(MULTI), "-k", "2", "--device", "cpu"]
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert f"note: {NOTE}" in cap.err and "Traceback" not in cap.err
    assert main([*argv, "--json"]) == 0
    cap = capsys.readouterr()
    out = json.loads(cap.out)
    assert out["input_note"] == NOTE
    assert "neighbors" in out and len(out["neighbors"]) == 2  # the usual keys stay


def test_query_of_a_single_frame_image_has_no_note(tiny_index, phantom_dir, capsys):
    image = next((phantom_dir / "images").rglob("*.dcm"))
    argv = ["query", str(tiny_index), str(image), "-k", "2", "--device", "cpu"]
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["input_note"] is None
    assert main(argv) == 0
    assert "note: multi-frame" not in capsys.readouterr().err


def test_query_refuses_a_text_file_named_dcm_as_not_dicom(tiny_index, tmp_path, capsys):
    bad = tmp_path / "x.dcm"
    bad.write_text("hello, this is a text file\n")
    assert main(["query", str(tiny_index), str(bad), "--device", "cpu"]) == 2
    cap = capsys.readouterr()
    assert cap.err == f"casebase query: error: {bad}: {NOT_DICOM}\n"
    assert "no pixel data" not in cap.err and "Traceback" not in cap.out + cap.err
