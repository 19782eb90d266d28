"""Names, MRNs and dates in folder and file names never reach a manifest (ingest-dicom)."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pandas as pd
import pydicom
import pytest

from retrieval.cli import main
from retrieval.data.dicom_ingest import ingest_dicom
from retrieval.data.phi_paths import identifying_reason, path_reason

NEEDLES = ("QZXDOE", "QZXJOHN", "123456", "MRN", "QZXROE", "19230417")


@pytest.mark.parametrize(
    "name",
    [
        "DOE_JOHN_MRN123456",
        "MRN123456",
        "mrn-0042",
        "patient00001",
        "ID_4711",
        "00000001_000.png",
        "DOE^JOHN",
        "Doe, John",
        "scan_1923-04-17.dcm",
        "IMG_20190823_1234.jpg",
        "12345678",
    ],
)
def test_identifying_names(name):
    why = identifying_reason(name)
    assert why and name not in why


@pytest.mark.parametrize(
    "name",
    [
        "mass",
        "nodule",
        "Lung_Opacity",
        "No Finding",
        "case_0042.dcm",
        "CT_small.dcm",
        "MR2_J2KI.dcm",
        "1.2.840.113619.2.55.3.604688119.971.1384270536.1.dcm",  # a UID: identifies no one
        "3f2a" + "0123456789abcdef" * 3 + ".dcm",  # a hex digest (casebase's caches)
        "images",
        "train",
    ],
)
def test_ordinary_names(name):
    assert identifying_reason(name) is None


def test_header_values_catch_plain_names():
    # SURNAME_GIVEN without digits is a label's shape too: only the headers can tell
    assert identifying_reason("QZXDOE_QZXJOHN") is None
    why = identifying_reason("QZXDOE_QZXJOHN", names=["QZXDOE", "QZXJOHN"])
    assert why and "name" in why
    assert identifying_reason("scan_abc777", ids=["ABC777"])  # the PatientID in a file name
    assert identifying_reason("mass", names=["QZXDOE", "Li"], ids=["7"]) is None
    assert path_reason("../data/mass/case_1.dcm") is None
    assert path_reason("mass/QZXDOE_QZXJOHN/case_1.dcm", names=["QZXDOE"])


def _tree(phantom_dir: Path, root: Path) -> Path:
    """Phantom DICOMs the way exports name them: by patient folder, MRN in the file name."""
    n = 0
    for k, src in enumerate(sorted(phantom_dir.glob("images/*/*.dcm"))[:12]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(src)
        ds.SeriesDescription = src.parent.name
        if k % 2:
            ds.PatientName, ds.PatientID = "QZXDOE^QZXJOHN", "MRN123456"
            out = root / "QZXDOE_QZXJOHN_MRN123456" / f"MRN123456_{src.name}"
        else:
            ds.PatientName, ds.PatientID = "QZXROE^QZXJANE", "X77"
            out = root / "QZXROE_QZXJANE" / f"born_19230417_{src.name}"
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out)
        n += 1
    return root


def _no_needles(text: str) -> None:
    low = text.lower()
    hits = [n for n in NEEDLES if n.lower() in low]
    assert not hits, hits


def test_folder_labels_refused_without_echoing_the_name(phantom_dir, tmp_path, capsys):
    tree = _tree(phantom_dir, tmp_path / "export")
    out = tmp_path / "m.csv"
    assert main(["ingest-dicom", str(tree), "--out", str(out), "--label-from", "folder"]) == 2
    err = capsys.readouterr().err
    assert "refusing folder names as labels" in err and "Traceback" not in err
    _no_needles(err)
    assert not out.exists()
    # a folder holding only the (plain-looking) name is caught through the files' PatientName
    only = tmp_path / "only"
    shutil.copytree(tree / "QZXROE_QZXJANE", only / "QZXROE_QZXJANE")
    for f in (only / "QZXROE_QZXJANE").iterdir():
        f.rename(f.with_name(f.name.replace("born_19230417_", "")))
    assert main(["ingest-dicom", str(only), "--out", str(out), "--label-from", "folder"]) == 2
    err = capsys.readouterr().err
    assert "patient's name" in err
    _no_needles(err)
    # and without --label-from there is no silent default
    assert main(["ingest-dicom", str(tree), "--out", str(out)]) == 2
    assert "needs --label-from" in capsys.readouterr().err


def test_identifying_paths_become_pseudonymous_links(phantom_dir, tmp_path, capsys):
    tree = _tree(phantom_dir, tmp_path / "export")
    out = tmp_path / "work" / "manifest.csv"
    rc = main(["ingest-dicom", str(tree), "--out", str(out), "--label-from", "SeriesDescription"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    _no_needles(cap.out + cap.err)
    _no_needles(out.read_text())
    df = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert len(df) == 12 and set(df["label"]) <= {"mass", "nodule", "cavity"}
    links = out.parent / "manifest.links"
    assert sorted(df["image"]) == sorted(f"manifest.links/{p.name}" for p in links.iterdir())
    for rel, cid in zip(df["image"], df["case_id"], strict=True):
        link = out.parent / rel
        assert link.name == f"{cid}.dcm" and link.is_symlink()
        assert Path(os.path.realpath(link)).is_relative_to(tree.resolve())
    _no_needles(" ".join(p.name for p in links.iterdir()))
    assert main(["validate", str(out)]) == 0
    # a rerun with the manifest inside the data tree does not ingest its own links
    inside = tree / "manifest.csv"
    assert main(["ingest-dicom", str(tree), "--out", str(inside), "--label-from", "Modality"]) == 0
    assert main(["ingest-dicom", str(tree), "--out", str(inside), "--label-from", "Modality"]) == 0
    again = pd.read_csv(inside, dtype=str, keep_default_na=False)
    assert len(again) == 12 and sorted(again["case_id"]) == sorted(df["case_id"])


def test_ordinary_paths_stay_as_they_are(phantom_dir, tmp_path):
    out = tmp_path / "m.csv"
    report = ingest_dicom(phantom_dir / "images", out, label_from="folder", progress=False)
    assert report.n_linked == 0 and not (tmp_path / "m.links").exists()
    df = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert all("/images/" in f"/{p}" for p in df["image"])
