"""`casebase ingest-dicom`: a PHI-free manifest from any DICOM tree; every skipped file named."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pydicom
import pytest

from retrieval.cli import main
from retrieval.data.dicom_ingest import ingest_dicom
from retrieval.data.manifest import load_manifest, validate_manifest
from retrieval.data.privacy import age_band

CORPUS = Path(pydicom.__file__).parent / "data" / "test_files"


def test_pydicom_corpus_acceptance(tmp_path, capsys):
    out = tmp_path / "corpus.csv"
    assert main(["ingest-dicom", str(CORPUS), "--out", str(out), "--label-from", "Modality"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    df = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert len(df) >= 56
    summary = captured.out.strip().splitlines()[-1]
    assert summary.startswith(f"ingested {len(df)}, skipped ")
    skipped = [ln for ln in captured.err.splitlines() if "skipped: " in ln]
    truncated = [ln for ln in skipped if "MR_truncated.dcm" in ln]
    assert truncated and "truncated" in truncated[0].split("MR_truncated.dcm: ")[1]
    # every skipped line names the file and a reason
    for ln in skipped:
        path, _, reason = ln.split("skipped: ", 1)[1].partition(": ")
        assert Path(path).name and reason.strip(), ln
    n_skipped = int(summary.split("skipped ")[1].split()[0])
    assert n_skipped == len(skipped) >= 20
    # schema, no PHI columns, images resolvable relative to the manifest
    assert list(df.columns) == [
        "case_id",
        "image",
        "label",
        "split",
        "patient_id",
        "modality",
        "manufacturer",
        "body_part",
        "view",
        "sex",
        "age_band",
        "rows",
        "columns",
        "photometric",
    ]
    # c_: one image; s_: one CT / MR series (retrieval.data.series_ingest), a folder of links
    assert df["case_id"].is_unique and df["case_id"].str.match(r"[cs]_[0-9a-f]{16}").all()
    assert df["patient_id"].str.fullmatch(r"p_[0-9a-f]{16}").all()
    assert set(df["split"]) <= {"train", "val", "test"}
    m = load_manifest(out)
    series = m.df["case_id"].str.startswith("s_")
    assert all(m.resolve(p).is_file() for p in m.df["image"][~series])
    assert all(m.resolve(p).is_dir() for p in m.df["image"][series])
    assert "MR_truncated" not in " ".join(df["image"])


def test_phantom_round_trip_without_phi(tmp_path, phantom_dir):
    out = tmp_path / "sub" / "ingested.csv"
    report = ingest_dicom(phantom_dir / "images", out, label_from="folder", progress=False)
    assert report.n_ingested == 60 and report.n_skipped == 0
    df = pd.read_csv(out, dtype=str, keep_default_na=False)
    src = pd.read_csv(phantom_dir / "manifest.csv", dtype=str, keep_default_na=False)
    src["key"] = [Path(p).name for p in src["image"]]
    df["key"] = [Path(p).name for p in df["image"]]
    joined = df.merge(src, on="key", suffixes=("", "_src"))
    assert len(joined) == 60
    assert (joined["label"] == joined["label_src"]).all()  # --label-from folder
    assert (joined["patient_id"] == joined["patient_id_src"]).all()  # same keyed hash
    assert (joined["manufacturer"] == joined["scanner"]).all()
    assert (joined["sex"] == joined["sex_src"]).all()
    assert (joined["age_band"] == joined["age"].astype(int).map(age_band)).all()
    assert set(joined["modality"]) <= {"CR", "DX", "OT"} and set(joined["rows"]) == {"64"}
    assert set(joined["photometric"]) == {"MONOCHROME1", "MONOCHROME2"}
    assert df.groupby("patient_id")["split"].nunique().max() == 1
    assert validate_manifest(out) == []

    # the same folder into Parquet, and again: identical rows (deterministic)
    report2 = ingest_dicom(
        phantom_dir / "images", tmp_path / "again.parquet", label_from="folder", progress=False
    )
    assert report2.n_ingested == 60
    again = load_manifest(tmp_path / "again.parquet").df
    assert sorted(again["case_id"]) == sorted(df["case_id"])
    assert dict(zip(again["case_id"], again["split"], strict=True)) == dict(
        zip(df["case_id"], df["split"], strict=True)
    )

    # grep every written file for the fake PHI in the headers: zero hits
    secrets: set[str] = set()
    for p in sorted((phantom_dir / "images").rglob("*.dcm")):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        secrets |= {
            str(ds.PatientName),
            str(ds.PatientID),
            str(ds.PatientBirthDate),
            str(ds.StudyDate),
            str(ds.PatientName).split("^")[1],
            str(ds.AccessionNumber),
        }
    written = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert len(written) == 2
    for f in written:
        blob = f.read_bytes()
        hits = [s for s in secrets if s.encode() in blob]
        assert not hits, (f.name, hits[:5])
        assert b"PHANTOM" not in blob and b"PHX" not in blob


def test_label_sources(tmp_path, phantom_dir, capsys):
    images = phantom_dir / "images"
    r = ingest_dicom(images, tmp_path / "kw.csv", label_from="BodyPartExamined", progress=False)
    assert r.labels == {"CHEST": 60}

    files = sorted(images.rglob("*.dcm"))
    mapping = tmp_path / "map.csv"
    lines = ["file,label"] + [
        f"{p.relative_to(images).as_posix()},grp{i % 2}" for i, p in enumerate(files[:40])
    ]
    mapping.write_text("\n".join(lines) + "\n")
    r = ingest_dicom(images, tmp_path / "map_out.csv", label_from=f"csv:{mapping}", progress=False)
    assert r.labels == {"grp0": 20, "grp1": 20, "unknown": 20}

    for bad in ("PatientName", "PatientBirthDate", "NotAKeyword"):
        assert (
            main(
                ["ingest-dicom", str(images), "--out", str(tmp_path / "x.csv"), "--label-from", bad]
            )
            == 2
        )
        err = capsys.readouterr().err
        assert "--label-from" in err and "Traceback" not in err
    assert not (tmp_path / "x.csv").exists()


def test_strict_and_errors(tmp_path, phantom_dir, capsys):
    tree = tmp_path / "tree"
    shutil.copytree(phantom_dir / "images" / "nodule", tree / "nodule")
    shutil.copy(CORPUS / "MR_truncated.dcm", tree / "nodule" / "bad.dcm")
    (tree / "notes.txt").write_text("not dicom")
    out = tmp_path / "m.csv"
    assert main(["ingest-dicom", str(tree), "--out", str(out), "--label-from", "folder"]) == 0
    captured = capsys.readouterr()
    assert "skipped: " in captured.err and "bad.dcm: truncated" in captured.err
    assert "ingested 20, skipped 1" in captured.out
    assert len(pd.read_csv(out)) == 20

    assert (
        main(
            [
                "ingest-dicom",
                str(tree),
                "--out",
                str(tmp_path / "s.csv"),
                "--strict",
                "--label-from",
                "folder",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "bad.dcm" in err and "truncated" in err and "Traceback" not in err
    assert not (tmp_path / "s.csv").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    assert (
        main(
            ["ingest-dicom", str(empty), "--out", str(tmp_path / "e.csv"), "--label-from", "folder"]
        )
        == 2
    )
    assert "no decodable DICOM" in capsys.readouterr().err
    assert main(["ingest-dicom", str(tmp_path / "nope"), "--out", str(tmp_path / "e.csv")]) == 2
    assert main(["ingest-dicom", str(tree), "--out", str(tmp_path / "e.txt")]) == 2


@pytest.mark.parametrize(
    "name", ["no_meta.dcm", "rtplan.dcm", "JPEG2000-embedded-sequence-delimiter.dcm"]
)
def test_corpus_oddities_are_skipped_with_reason(tmp_path, name):
    tree = tmp_path / "t"
    tree.mkdir()
    shutil.copy(CORPUS / "MR_small.dcm", tree / "good.dcm")
    shutil.copy(CORPUS / name, tree / name)
    report = ingest_dicom(
        tree, tmp_path / "m.csv", label_from="folder", progress=False, log=lambda _s: None
    )
    assert report.n_ingested == 1
    assert [Path(p).name for p, _ in report.skipped] == [name]
    assert report.skipped[0][1]


def test_multi_frame_files_are_noted_and_text_files_named_dcm_are_not_dicom(tmp_path, capsys):
    """A multi-frame file is ingested as its middle frame: ingest-dicom says so per file (it
    did silently); a text file named .dcm is skipped as "not a DICOM file"."""
    from retrieval.data.imageio import NOT_DICOM

    tree = tmp_path / "t"
    tree.mkdir()
    shutil.copy(CORPUS / "MR_small.dcm", tree / "single.dcm")
    shutil.copy(CORPUS / "examples_ybr_color.dcm", tree / "multi.dcm")
    (tree / "x.dcm").write_text("hello, this is a text file\n")
    out = tmp_path / "m.csv"
    report = ingest_dicom(tree, out, label_from="folder", progress=False, log=lambda _s: None)
    assert report.n_ingested == 2
    assert [(Path(p).name, n) for p, n in report.notes] == [
        ("multi.dcm", "multi-frame DICOM: middle frame 15 of 30 used")
    ]
    assert [(Path(p).name, r) for p, r in report.skipped] == [("x.dcm", NOT_DICOM)]
    assert "1 multi-frame file: a 2-D model reads only the middle frame" in report.summary()

    assert main(["ingest-dicom", str(tree), "--out", str(out), "--label-from", "folder"]) == 0
    cap = capsys.readouterr()
    assert f"note: {tree / 'multi.dcm'}: multi-frame DICOM: middle frame 15 of 30 used" in cap.err
    assert cap.err.count("note: ") == 1  # the single-frame file has none
    assert f"skipped: {tree / 'x.dcm'}: {NOT_DICOM}" in cap.err
    assert "ingested 2, skipped 1; 1 multi-frame file" in cap.out
    assert "Traceback" not in cap.out + cap.err
