"""Manifest loading: labels and attributes in Unicode NFC (one label, one class), raw patient
ids pseudonymised; validate warns about images that decode to a constant array."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from retrieval.cli import main
from retrieval.data.manifest import load_manifest, validate_manifest
from retrieval.data.privacy import hash_patient_id, is_pseudonym, pseudonymise_patient_ids

NFC = unicodedata.normalize("NFC", "névus bénin")
NFD = unicodedata.normalize("NFD", "névus bénin")


def _png(path: Path, seed: int, constant: bool = False) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = np.full((16, 16), 77, np.uint8) if constant else rng.integers(0, 255, (16, 16), np.uint8)
    Image.fromarray(arr).save(path)
    return path.name


def test_nfd_and_nfc_labels_are_one_class(tmp_path):
    assert NFC != NFD
    img = tmp_path / "img"
    nfd_file = unicodedata.normalize("NFD", "é.png")  # paths are never normalised
    rows = [
        ("a", _png(img / "a.png", 0), NFC, "Hôpital"),
        ("b", _png(img / "b.png", 1), NFD, unicodedata.normalize("NFD", "Hôpital")),
        ("c", _png(img / nfd_file, 2), "benign", "X"),
        ("d", _png(img / "d.png", 3), "benign", "X"),
    ]
    df = pd.DataFrame(rows, columns=["case_id", "image", "label", "site"])
    df["image"] = "img/" + df["image"]
    df.to_csv(tmp_path / "m.csv", index=False)
    df.to_parquet(tmp_path / "m.parquet", index=False)
    for name in ("m.csv", "m.parquet"):
        assert validate_manifest(tmp_path / name, progress=False) == []  # no "only 1 case"
        m = load_manifest(tmp_path / name)
        assert m.labels == ["benign", NFC]
        assert set(m.df["site"]) == {"Hôpital", "X"} and m.df["site"].iat[1] == "Hôpital"
        assert (
            m.df["image"].iat[2] == f"img/{nfd_file}" and m.resolve(m.df["image"].iat[2]).is_file()
        )


def test_raw_patient_ids_are_pseudonymised_on_load(tmp_path):
    done = hash_patient_id("already")
    df = pd.DataFrame(
        {
            "case_id": list("abcde"),
            "image": ["x.png"] * 5,
            "label": ["l"] * 5,
            "patient_id": ["MRN900000", " MRN900000 ", "MRN900001", done, ""],
        }
    )
    df.to_csv(tmp_path / "m.csv", index=False)
    pids = load_manifest(tmp_path / "m.csv").df["patient_id"].tolist()
    assert pids[0] == pids[1] == hash_patient_id("MRN900000")  # one patient, one pseudonym
    assert pids[2] == hash_patient_id("MRN900001") != pids[0]
    assert pids[3] == done and pids[4] == ""  # never hashed twice; missing stays missing
    assert all(is_pseudonym(p) for p in pids[:4])
    assert "MRN" not in "".join(pids)
    # idempotent: a manifest of pseudonyms loads unchanged
    assert pseudonymise_patient_ids(pids) == pids


def test_raw_patient_ids_never_reach_the_bundle_and_own_patient_is_excluded(
    tmp_path, phantom_dir, tiny_index, monkeypatch, capsys
):
    from index.builder import build_index
    from retrieval import CaseRetriever

    df = pd.read_csv(phantom_dir / "manifest.csv", dtype=str, keep_default_na=False)
    raw = {p: f"MRN{900000 + i}" for i, p in enumerate(sorted(set(df["patient_id"])))}
    df["patient_id"] = df["patient_id"].map(raw)
    df["image"] = [str(phantom_dir / p) for p in df["image"]]
    df["mask"] = [str(phantom_dir / p) if p else "" for p in df["mask"]]
    df.to_csv(tmp_path / "raw.csv", index=False)
    out = tmp_path / "index"
    build_index(tiny_index / "model", tmp_path / "raw.csv", out, progress=False)
    for f in out.rglob("*"):
        if f.is_file():
            assert b"MRN9" not in f.read_bytes(), f
    cases = pd.read_parquet(out / "cases.parquet")
    assert cases["patient_id"].map(is_pseudonym).all()
    assert set(cases["patient_id"]) <= {hash_patient_id(v) for v in raw.values()}

    # the own patient (found by its pseudonym) is excluded: the indexed case itself, its
    # nearest neighbour without exclusion, no longer comes back
    r = CaseRetriever.load(out)
    row = cases.iloc[0]
    pid = hash_patient_id(raw[df_hashed_id(phantom_dir, row["case_id"])])
    assert pid == row["patient_id"]
    image = (tmp_path / row["image"]).resolve()  # the bundle stores manifest-relative paths
    assert any(n.patient_id == pid for n in r.query(image, k=10).neighbors)
    res = r.query(image, k=10, exclude_patient=pid)
    assert res.neighbors and all(n.patient_id != pid for n in res.neighbors)

    # the bundle records which key hashed its ids; eval / audit under another key say so
    from retrieval.data.manifest import load_manifest
    from retrieval.data.privacy import key_check
    from retrieval.service.evaluate import warn_key_mismatch

    assert r.meta["patient_key_check"] == key_check()
    man = load_manifest(tmp_path / "raw.csv")
    assert man.ids_hashed_on_read and not warn_key_mismatch(r, man)
    monkeypatch.setenv("CASEBASE_PHI_KEY", "00" * 32)
    assert warn_key_mismatch(r, load_manifest(tmp_path / "raw.csv"))
    assert "another PHI key" in capsys.readouterr().err
    assert not load_manifest(phantom_dir / "manifest.csv").ids_hashed_on_read  # pseudonyms


def df_hashed_id(phantom_dir: Path, case_id: str) -> str:
    """The phantom manifest's own (already hashed) patient id of a case."""
    df = pd.read_csv(phantom_dir / "manifest.csv", dtype=str, keep_default_na=False)
    return df.loc[df["case_id"] == case_id, "patient_id"].iat[0]


# --------------------------------------------------------------------------- constant images


def _manifest(tmp_path: Path, constant: list[bool]) -> Path:
    rows = []
    for i, flat in enumerate(constant):
        name = _png(tmp_path / "img" / f"c{i}.png", i, constant=flat)
        rows.append({"case_id": f"c{i}", "image": f"img/{name}", "label": "ab"[i % 2]})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    return tmp_path / "m.csv"


def test_a_constant_image_is_a_warning(tmp_path, capsys):
    path = _manifest(tmp_path, [False, False, True, False])
    warnings: list = []
    assert validate_manifest(path, progress=False, warnings=warnings) == []
    assert [(w.row, w.column) for w in warnings] == [(3, "image")]
    assert "img/c2.png" in warnings[0].message and "constant" in warnings[0].message
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("warning: row 3, column image: img/c2.png: decodes to a constant")
    assert "1 image decodes to a constant image" in out[1]
    assert out[-1].startswith("OK: 4 cases") and out[-1].endswith("1 warning")
    assert main(["validate", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["n_warnings"] == 1
    assert report["warnings"][0]["row"] == 3


def test_every_image_constant_is_an_error(tmp_path, capsys):
    path = _manifest(tmp_path, [True, True, True, True])
    problems = validate_manifest(path, progress=False)
    assert [(p.row, p.column) for p in problems] == [(None, "image")]
    assert "every image (4) decodes to a constant image" in problems[0].message
    assert main(["validate", str(path)]) == 1
    cap = capsys.readouterr()
    assert "nothing can be learned" in cap.out and "Traceback" not in cap.out + cap.err


def test_dicom_window_outside_the_data_is_named(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    rows = []
    for i in range(2):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
        ds.Modality, ds.Rows, ds.Columns = "DX", 16, 16
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = 2, -1024
        ds.WindowCenter, ds.WindowWidth = -500, 1500  # values after rescale: 2000..3000
        px = np.random.default_rng(i).integers(1500, 2000, (16, 16)).astype(np.uint16)
        ds.PixelData = px.tobytes()
        ds.save_as(tmp_path / f"d{i}.dcm", enforce_file_format=True)
        rows.append({"case_id": f"d{i}", "image": f"d{i}.dcm", "label": "x"})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    assert pydicom is not None
    problems = validate_manifest(tmp_path / "m.csv", progress=False)
    assert len(problems) == 1 and "window C-500/W1500" in problems[0].message


# --------------------------------------------------------------------------- volumes and 2-D mixed


def _mixed_manifest(tmp_path: Path, n_images: int = 4, n_volumes: int = 2) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_images):
        name = _png(tmp_path / "img" / f"p{i}.png", i)
        rows.append({"case_id": f"p{i}", "image": f"img/{name}", "label": "ab"[i % 2]})
    rng = np.random.default_rng(7)
    for i in range(n_volumes):
        np.save(tmp_path / f"v{i}.npy", rng.random((12, 16, 16)).astype(np.float32))
        rows.append({"case_id": f"v{i}", "image": f"v{i}.npy", "label": "ab"[i % 2]})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    return tmp_path / "m.csv"


def test_a_mix_of_volumes_and_2d_images_is_a_warning(tmp_path, capsys):
    path = _mixed_manifest(tmp_path)
    warnings: list = []
    assert validate_manifest(path, progress=False, warnings=warnings) == []
    assert [(w.row, w.column) for w in warnings] == [(None, "image")]
    msg = warnings[0].message
    assert "2 volumes and 4 2-D images" in msg
    assert "middle axial slice" in msg and "cnn3d" in msg and "every image to be a volume" in msg
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"warning: {msg}"
    assert not any("constant image" in line for line in out)
    assert out[-1].startswith("OK: 6 cases") and out[-1].endswith("1 warning")
    assert main(["validate", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["n_warnings"] == 1
    assert report["warnings"][0]["row"] is None and "2 volumes" in report["warnings"][0]["message"]


def test_volumes_only_or_images_only_are_not_mixed(tmp_path):
    for n_images, n_volumes in ((4, 0), (0, 4)):
        d = tmp_path / f"{n_images}_{n_volumes}"
        warnings: list = []
        validate_manifest(
            _mixed_manifest(d, n_images, n_volumes), progress=False, warnings=warnings
        )
        assert warnings == []


def test_constant_and_mixed_warnings_are_counted_apart(tmp_path, capsys):
    path = _mixed_manifest(tmp_path)
    _png(tmp_path / "img" / "p0.png", 0, constant=True)
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("warning: row 1, column image: img/p0.png: decodes to a constant")
    assert "1 image decodes to a constant image" in out[1]
    assert "the manifest mixes 2 volumes and 4 2-D images" in out[2]
    assert out[-1].endswith("2 warnings")


def test_validate_names_a_text_file_named_dcm_as_not_dicom(tmp_path, capsys):
    from retrieval.data.imageio import NOT_DICOM

    path = _manifest(tmp_path, [False, False, False, False])
    (tmp_path / "img" / "x.dcm").write_text("hello, this is a text file\n")
    df = pd.read_csv(path)
    df.loc[0, "image"] = "img/x.dcm"
    df.to_csv(path, index=False)
    assert main(["validate", str(path)]) == 1
    cap = capsys.readouterr()
    assert f"row 1, column image: img/x.dcm: {NOT_DICOM}" in cap.out
    assert "no pixel data" not in cap.out and "Traceback" not in cap.out + cap.err
