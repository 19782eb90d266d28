"""retrieval.data.manifest + `casebase validate`: every problem with its row and column,
never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from retrieval.cli import main
from retrieval.data.manifest import Problem, load_manifest, validate_manifest
from retrieval.data.phantom import FACTOR_COLUMNS
from retrieval.errors import ManifestError


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst / "manifest.csv"


def _csv(df: pd.DataFrame, path: Path) -> Path:
    df.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("fixture", ["phantom_dir", "photo_phantom_dir"])
def test_phantoms_validate_clean(fixture, request, capsys):
    root = request.getfixturevalue(fixture)
    assert validate_manifest(root / "manifest.csv") == []
    assert main(["validate", str(root / "manifest.csv")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("OK: 60 cases, labels {") and "splits {" in out[-1]
    assert main(["validate", str(root / "manifest.csv"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["problems"] == [] and report["n_cases"] == 60


def test_load_manifest_api(phantom_dir):
    m = load_manifest(phantom_dir / "manifest.csv")
    assert m.root == phantom_dir.resolve() and len(m.df) == 60
    assert m.attribute_columns == ["site", "sex", "age", "scanner", *FACTOR_COLUMNS]
    assert all(isinstance(v, str) for v in m.df.iloc[0])
    assert m.resolve(m.df["image"].iat[0]).is_file()
    assert m.resolve("/abs/x.png") == Path("/abs/x.png")
    assert set(m.select(["train"])["split"]) == {"train"}
    assert len(m.select(["val", "test"])) == 18 and len(m.select(None)) == 60


def test_optional_columns_default(tmp_path, phantom_dir):
    df = pd.read_csv(phantom_dir / "manifest.csv", dtype=str)
    df = df[["case_id", "image", "label"]].copy()
    df["image"] = [str(phantom_dir / p) for p in df["image"]]  # absolute paths work too
    df["age"] = ["" if i % 3 == 0 else "50" for i in range(len(df))]
    path = _csv(df, tmp_path / "m.csv")
    m = load_manifest(path)
    assert set(m.df["split"]) == {"train"} and len(m.select(["train"])) == 60
    assert (m.df["patient_id"] == "").all() and (m.df["mask"] == "").all()
    assert "" in set(m.df["age"])  # NaN -> ""
    assert validate_manifest(path) == []


def test_every_bad_row_is_named(tmp_path, phantom_dir, capsys):
    path = _copy(phantom_dir, tmp_path / "bad")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df.loc[2, "case_id"] = df.loc[0, "case_id"]  # row 3 duplicates row 1
    df.loc[4, "image"] = "images/missing.dcm"  # row 5: file does not exist
    (path.parent / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00" * 10)
    df.loc[5, "image"] = "broken.dcm"  # row 6: unreadable DICOM
    other = df[df["split"] != df.loc[7, "split"]].index[0]
    df.loc[7, "patient_id"] = df.loc[other, "patient_id"]  # row 8 straddles splits
    df.loc[9, "split"] = "holdout"  # row 10
    df.loc[10, "label"] = ""  # row 11
    df.loc[11, "mask"] = "masks/nope.png"  # row 12
    big = tmp_path / "big_mask.png"
    from PIL import Image

    Image.new("L", (32, 48)).save(big)
    df.loc[12, "mask"] = str(big)  # row 13: wrong geometry
    df.loc[13, "case_id"] = ""  # row 14
    df.to_csv(path, index=False)

    problems = validate_manifest(path)
    where = {(p.row, p.column) for p in problems}
    expected = {
        (3, "case_id"),
        (5, "image"),
        (6, "image"),
        (8, "patient_id"),
        (10, "split"),
        (11, "label"),
        (12, "mask"),
        (13, "mask"),
        (14, "case_id"),
    }
    assert expected <= where, sorted(where)
    text = {(p.row, p.column): p.message for p in problems}
    assert "first in row 1" in text[(3, "case_id")]
    assert "file not found" in text[(5, "image")]
    assert df.loc[other, "patient_id"] in text[(8, "patient_id")]
    assert (
        f"rows {other + 1}" in text[(8, "patient_id")] or f"{other + 1}" in text[(8, "patient_id")]
    )
    assert "32x48" in text[(13, "mask")] and "64x64" in text[(13, "mask")]

    assert main(["validate", str(path)]) == 1
    captured = capsys.readouterr()
    assert "row 3, column case_id: duplicate case_id" in captured.out
    assert "row 5, column image: images/missing.dcm: file not found" in captured.out
    assert "Traceback" not in captured.out + captured.err
    assert main(["validate", str(path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["n_problems"] == len(problems)


def test_missing_columns_and_singleton_labels(tmp_path, capsys):
    path = tmp_path / "m.csv"
    path.write_text("case_id,path,diagnosis\n1,a.png,x\n")
    problems = validate_manifest(path)
    assert {(p.row, p.column) for p in problems} >= {(None, "image"), (None, "label")}
    with pytest.raises(ManifestError, match="missing required column"):
        load_manifest(path)
    assert main(["validate", str(path)]) == 1
    assert "column image: required column is missing" in capsys.readouterr().out

    path.write_text("case_id,image,label\na,x.png,rare\nb,y.png,common\nc,z.png,common\n")
    problems = validate_manifest(path, check_images=False)
    assert any(p.row == 1 and p.column == "label" and "only 1 case" in p.message for p in problems)


def test_parquet_input(tmp_path, phantom_dir):
    df = pd.read_csv(phantom_dir / "manifest.csv", dtype=str)
    df["image"] = [str(phantom_dir / p) for p in df["image"]]
    df["mask"] = [str(phantom_dir / p) for p in df["mask"]]
    df["age"] = df["age"].astype(int)  # typed columns come back as strings
    df.loc[0, "site"] = None
    path = tmp_path / "m.parquet"
    df.to_parquet(path, index=False)
    m = load_manifest(path)
    assert m.df["age"].iat[1] == str(df["age"].iat[1]) and m.df["site"].iat[0] == ""
    assert validate_manifest(path) == []
    df.loc[3, "case_id"] = df.loc[1, "case_id"]
    df.to_parquet(path, index=False)
    assert [(p.row, p.column) for p in validate_manifest(path)] == [(4, "case_id")]


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x00\x01\x02binary garbage\xff\xfe" * 50,
        b"PAR1 not really parquet",
        "case_id,image,label\n\u00e9,\u00fc.png,\u00df\n".encode("latin-1"),
        b'case_id,image,label\n"unterminated,x.png,a\n',
        b"case_id,image,label\n1,2,3,4,5\n2,3\n",
        b"case_id,image,label,label\n1,2,3,4\n",
        b"case_id,image,label\n",
        b"case_id,image,label\n1," + b"x" * 2_000_000 + b",a\n",
        "case_id,image,label\n\u2603,\U0001f600.png,\u00e9t\u00e9\n".encode(),
        b"\n\n\n",
        b"just one line without commas",
    ],
)
def test_malformed_files_never_traceback(tmp_path, capsys, content):
    path = tmp_path / ("m.parquet" if content.startswith(b"PAR1") else "m.csv")
    path.write_bytes(content)
    problems = validate_manifest(path)
    assert problems and all(isinstance(p, Problem) for p in problems)
    assert main(["validate", str(path)]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert len(captured.out) < 5000  # huge fields are clipped in messages
    try:
        load_manifest(path)
    except ManifestError:
        pass


def test_missing_manifest_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.csv")]) == 1
    assert "manifest not found" in capsys.readouterr().out
    with pytest.raises(ManifestError):
        load_manifest(tmp_path / "nope.csv")
