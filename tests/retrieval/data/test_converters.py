"""`casebase manifest from-<source>`: public data sets' own metadata -> a valid, PHI-free manifest.

Each source has a small hand-made sample in its exact published column format
under ``tests/data/<source>/``; the tiny images are generated here.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from retrieval.cli import main
from retrieval.data.converters import normalise_age, normalise_sex, patient_disjoint_splits

DATA = Path(__file__).resolve().parents[2] / "data"
PID_RE = r"p_[0-9a-f]{16}"


def _img(path: Path, mode: str = "RGB", size: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode).save(path)


def _dicom(path: Path, patient_id: str, sex: str, age: str, view: str, size: int = 128) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.PatientName = patient_id
    ds.PatientSex = sex
    ds.PatientAge = age
    ds.ViewPosition = view
    ds.Modality = "CR"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.random.default_rng(0).integers(0, 255, (size, size), dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _convert(source: str, metadata: Path, images: Path, out: Path, *extra: str, capsys=None):
    rc = main(
        [
            "manifest",
            f"from-{source}",
            str(metadata),
            "--images",
            str(images),
            "--out",
            str(out),
            *extra,
        ]
    )
    captured = capsys.readouterr() if capsys is not None else None
    assert rc == 0, captured.err if captured else rc
    return pd.read_csv(out, dtype=str, keep_default_na=False), captured


def _real(out: Path, rel: str) -> str:
    """The file a manifest row points at (through its pseudonymous link, if any)."""
    return Path(os.path.realpath(out.parent / rel)).as_posix()


def _check_common(out: Path, df: pd.DataFrame, raw_ids: list[str], *, linked: bool = False):
    assert df["case_id"].is_unique
    assert df["patient_id"].str.fullmatch(PID_RE).all()
    # patient-disjoint splits
    per_patient = df.groupby("patient_id")["split"].nunique()
    assert (per_patient == 1).all(), per_patient[per_patient > 1]
    assert set(df["split"]) <= {"train", "val", "test"}
    # raw ids never written, not even in image paths (those data sets' rows point at links)
    text = out.read_text()
    for raw in raw_ids:
        assert raw not in text, raw
    if linked:
        links = out.parent / f"{out.stem}.links"
        assert all(p.startswith(f"{links.name}/") for p in df["image"])
        names = sorted(p.name for p in links.iterdir())
        assert names == sorted(Path(p).name for p in df["image"])
        for raw in raw_ids:
            assert not any(raw in n for n in names), raw
    # images resolvable; and casebase itself accepts the manifest
    for rel in df["image"]:
        assert (out.parent / rel).is_file() or Path(rel).is_file()
    assert main(["validate", str(out)]) == 0


# --------------------------------------------------------------------------- shared helpers


def test_normalisers():
    assert [normalise_sex(v) for v in ("male", "Female", "M", "f", "unknown", "", None, "O")] == [
        "M",
        "F",
        "M",
        "F",
        "",
        "",
        "",
        "O",
    ]
    assert [
        normalise_age(v) for v in ("80.0", "58", "058Y", "6M", "", "411", "nan", "abc", 45)
    ] == ["80", "58", "58", "0", "", "", "", "", "45"]


def test_patient_disjoint_splits_properties():
    rng = random.Random(1)
    groups, labels = [], []
    for g in range(300):
        lab = rng.choice(["a", "b", "c"])
        for _ in range(rng.randint(1, 4)):
            groups.append(f"P{g}")
            labels.append(lab)
    s1 = patient_disjoint_splits(groups, labels, seed=3)
    assert s1 == patient_disjoint_splits(groups, labels, seed=3)  # deterministic
    assert s1 != patient_disjoint_splits(groups, labels, seed=4)  # the seed matters
    by_group = {}
    for g, s in zip(groups, s1, strict=True):
        assert by_group.setdefault(g, s) == s  # disjoint
    frac = {k: s1.count(k) / len(s1) for k in ("train", "val", "test")}
    assert abs(frac["test"] - 0.15) < 0.03 and abs(frac["val"] - 0.15) < 0.03
    # independent of row order
    order = list(range(len(groups)))
    rng.shuffle(order)
    s2 = patient_disjoint_splits([groups[i] for i in order], [labels[i] for i in order], seed=3)
    assert [s1[i] for i in order] == s2
    # official test rows pin their patient; trainval patients never land in test
    official = ["test" if g in ("P1", "P2") else "trainval" for g in groups]
    s3 = patient_disjoint_splits(groups, labels, seed=3, official=official)
    assert {s for g, s in zip(groups, s3, strict=True) if g in ("P1", "P2")} == {"test"}
    assert {s for g, s in zip(groups, s3, strict=True) if g not in ("P1", "P2")} == {"train", "val"}


# --------------------------------------------------------------------------- HAM10000


def test_ham10000(tmp_path, capsys):
    meta = DATA / "ham10000" / "HAM10000_metadata.csv"
    src = pd.read_csv(meta, dtype=str, keep_default_na=False)
    images = tmp_path / "ham"
    for i, image_id in enumerate(src["image_id"]):
        if image_id == "ISIC_0033333":
            continue  # missing on disk: skipped and counted
        part = "HAM10000_images_part_1" if i < 8 else "HAM10000_images_part_2"
        _img(images / part / f"{image_id}.jpg")
    out = tmp_path / "out" / "manifest.csv"
    df, cap = _convert("ham10000", meta, images, out, capsys=capsys)
    assert "1 of 15 images not found" in cap.err and "ISIC_0033333" in cap.err
    assert "skipped 1 (1 image not found)" in cap.out
    assert len(df) == 14
    assert list(df.columns) == [
        "case_id",
        "image",
        "label",
        "split",
        "patient_id",
        "sex",
        "age",
        "localization",
        "dx_type",
        "site",
    ]
    row = df.set_index("case_id")
    assert row.loc["ISIC_0027419", "label"] == "bkl"
    assert row.loc["ISIC_0027419", "sex"] == "M" and row.loc["ISIC_0027419", "age"] == "80"
    assert row.loc["ISIC_0029176", "sex"] == "" and row.loc["ISIC_0025837", "age"] == ""
    assert row.loc["ISIC_0024370", "localization"] == ""
    assert (
        row.loc["ISIC_0031633", "dx_type"] == "follow_up"
        and row.loc["ISIC_0031633", "site"] == "vidir_molemax"
    )
    assert sorted(set(df["label"])) == ["bcc", "bkl", "df", "mel", "nv"]
    # images of one lesion share a (hashed) group
    assert row.loc["ISIC_0027419", "patient_id"] == row.loc["ISIC_0025030", "patient_id"]
    assert row.loc["ISIC_0027419", "patient_id"] != row.loc["ISIC_0026769", "patient_id"]
    _check_common(out, df, list(src["lesion_id"]))
    # Harvard Dataverse serves the metadata as a quoted, tab-separated .tab file: same manifest
    tab = tmp_path / "HAM10000_metadata.tab"
    src.to_csv(tab, sep="\t", index=False, quoting=1)
    out_tab = tmp_path / "out" / "from_tab.csv"
    _convert("ham10000", tab, images, out_tab, capsys=capsys)
    assert out_tab.read_text() == out.read_text()
    # the same seed writes the same file; --strict refuses the missing image
    before = out.read_bytes()
    _convert("ham10000", meta, images, out, capsys=capsys)
    assert out.read_bytes() == before
    assert (
        main(
            [
                "manifest",
                "from-ham10000",
                str(meta),
                "--images",
                str(images),
                "--out",
                str(tmp_path / "x.csv"),
                "--strict",
            ]
        )
        == 2
    )
    assert "not found" in capsys.readouterr().err


# --------------------------------------------------------------------------- ISIC


def test_isic_2020(tmp_path, capsys):
    meta = DATA / "isic" / "2020" / "ISIC_2020_Training_GroundTruth_v2.csv"
    src = pd.read_csv(meta, dtype=str, keep_default_na=False)
    images = tmp_path / "isic2020" / "train"
    for name in src["image_name"]:
        if name != "ISIC_0076262":
            _img(images / f"{name}.jpg")
    out = tmp_path / "isic2020.csv"
    df, cap = _convert("isic", meta, images.parent, out, capsys=capsys)
    assert len(df) == 15 and "1 of 16 images not found" in cap.err
    row = df.set_index("case_id")
    assert (
        row.loc["ISIC_0149568", "label"] == "malignant"
        and row.loc["ISIC_2637011", "label"] == "benign"
    )
    assert row.loc["ISIC_2637011", "localization"] == "head/neck"
    assert row.loc["ISIC_2637011", "age"] == "45" and row.loc["ISIC_0015719", "sex"] == "F"
    # two images of patient IP_7279968 -> one hashed patient, one split
    assert row.loc["ISIC_2637011", "patient_id"] == row.loc["ISIC_0232101", "patient_id"]
    assert df["patient_id"].nunique() == 12
    _check_common(out, df, list(src["patient_id"]) + list(src["lesion_id"]))
    # finer labels on request
    out2 = tmp_path / "isic2020_dx.csv"
    df2, _ = _convert(
        "isic", meta, images.parent, out2, "--label-field", "diagnosis", capsys=capsys
    )
    assert set(df2["label"]) == {"nevus", "unknown", "melanoma"}


def test_isic_2019(tmp_path, capsys):
    gt = DATA / "isic" / "2019" / "ISIC_2019_Training_GroundTruth.csv"
    src = pd.read_csv(gt, dtype=str, keep_default_na=False)
    images = tmp_path / "ISIC_2019_Training_Input"
    for name in src["image"]:
        _img(images / f"{name}.jpg")
    out = tmp_path / "isic2019.csv"
    df, cap = _convert(
        "isic", gt, images, out, capsys=capsys
    )  # metadata found beside the ground truth
    assert "ISIC_2019_Training_Metadata.csv" in cap.err
    assert "skipped 1 (1 no label)" in cap.out
    assert len(df) == 15
    row = df.set_index("case_id")
    assert row.loc["ISIC_0000000", "label"] == "nv" and row.loc["ISIC_0000002", "label"] == "mel"
    assert row.loc["ISIC_0053453", "label"] == "ak" and row.loc["ISIC_0054000", "label"] == "scc"
    assert row.loc["ISIC_0000013", "label"] == "mel"  # "_downsampled" dropped from the case id
    assert row.loc["ISIC_0000013", "image"].endswith("ISIC_0000013_downsampled.jpg")
    assert row.loc["ISIC_0024331", "site"] == "BCN" and row.loc["ISIC_0024306", "site"] == "HAM"
    assert row.loc["ISIC_0000000", "site"] == "" and row.loc["ISIC_0000000", "sex"] == "F"
    assert (
        row.loc["ISIC_0024331", "localization"] == "head/neck"
        and row.loc["ISIC_0024331", "age"] == "70"
    )
    assert (
        row.loc["ISIC_0024331", "patient_id"] == row.loc["ISIC_0024332", "patient_id"]
    )  # same lesion
    meta = pd.read_csv(
        DATA / "isic" / "2019" / "ISIC_2019_Training_Metadata.csv", dtype=str, keep_default_na=False
    )
    _check_common(out, df, [x for x in meta["lesion_id"] if x])
    # the metadata file as METADATA finds the ground truth beside it: same manifest
    out2 = tmp_path / "isic2019b.csv"
    _convert(
        "isic",
        DATA / "isic" / "2019" / "ISIC_2019_Training_Metadata.csv",
        images,
        out2,
        capsys=capsys,
    )
    assert out2.read_text() == out.read_text()


# --------------------------------------------------------------------------- CheXpert


def _chexpert_images(root: Path, skip: str = "patient00011") -> None:
    for csv_name in ("train.csv", "valid.csv"):
        src = pd.read_csv(DATA / "chexpert" / csv_name, dtype=str, keep_default_na=False)
        for p in src["Path"]:
            if skip not in p:
                _img(root / p, mode="L")


def test_chexpert_default_policy(tmp_path, capsys):
    root = tmp_path / "chexpert"
    _chexpert_images(root)
    out = tmp_path / "chexpert.csv"
    df, cap = _convert("chexpert", DATA / "chexpert" / "train.csv", root, out, capsys=capsys)
    assert "official validation set" in cap.err
    assert "skipped 8 (6 several findings, 1 no confident finding, 1 image not found)" in cap.out
    by_img = {
        re.search(r"(patient\d+/study\d+/view\w+)\.jpg$", _real(out, p)).group(1): r
        for p, r in zip(df["image"], df.to_dict("records"), strict=True)
    }
    assert len(df) == 11
    assert by_img["patient00001/study1/view1_frontal"]["label"] == "No Finding"
    assert by_img["patient00001/study1/view1_frontal"]["support_devices"] == "yes"
    assert by_img["patient00003/study1/view1_frontal"]["label"] == "Edema"
    assert by_img["patient00005/study2/view2_frontal"]["label"] == "Pneumothorax"
    assert by_img["patient00009/study1/view1_frontal"]["label"] == "Pleural Effusion"
    assert by_img["patient00009/study1/view1_frontal"]["support_devices"] == "uncertain"
    assert by_img["patient00009/study1/view1_frontal"]["sex"] == ""
    lat = by_img["patient00004/study1/view2_lateral"]
    assert (lat["view"], lat["projection"], lat["sex"], lat["age"]) == ("lateral", "", "F", "20")
    assert by_img["patient00001/study1/view1_frontal"]["projection"] == "AP"
    # the official validation set is the test split; nothing else is
    assert by_img["patient64542/study1/view1_frontal"]["split"] == "test"
    assert by_img["patient64543/study1/view1_frontal"]["split"] == "test"
    assert all(r["split"] != "test" for k, r in by_img.items() if "patient645" not in k)
    assert sorted(set(df["label"])) == ["Edema", "No Finding", "Pleural Effusion", "Pneumothorax"]
    # case ids are built from the hashed patient, never from patientNNNNN
    assert all(re.fullmatch(PID_RE + r"_s\d+_view\d_(frontal|lateral)", c) for c in df["case_id"])
    raws = sorted({m for p in df["image"] for m in re.findall(r"patient\d+", _real(out, p))})
    assert len(raws) >= 8
    _check_common(out, df, raws, linked=True)


def test_chexpert_priority_and_uncertain_policies(tmp_path, capsys):
    root = tmp_path / "chexpert"
    _chexpert_images(root, skip="nothing-missing")
    out = tmp_path / "prio.csv"
    df, _ = _convert(
        "chexpert",
        DATA / "chexpert" / "train.csv",
        root,
        out,
        "--label-policy",
        "priority",
        capsys=capsys,
    )
    lab = {
        re.search(r"(patient\d+/study\d+/view\w+)\.jpg$", _real(out, p)).group(1): x
        for p, x in zip(df["image"], df["label"], strict=True)
    }
    assert lab["patient00002/study2/view1_frontal"] == "Fracture"  # Fracture before Lung Opacity
    assert lab["patient00008/study1/view1_frontal"] == "Pleural Effusion"  # before Cardiomegaly
    assert lab["patient64541/study1/view1_frontal"] == "Cardiomegaly"
    assert "patient00007/study1/view1_frontal" not in lab  # uncertain only: no confident label
    out2 = tmp_path / "uones.csv"
    df2, _ = _convert(
        "chexpert",
        DATA / "chexpert" / "train.csv",
        root,
        out2,
        "--label-policy",
        "priority",
        "--uncertain",
        "positive",
        capsys=capsys,
    )
    lab2 = {
        re.search(r"(patient\d+/study\d+/view\w+)\.jpg$", _real(out2, p)).group(1): x
        for p, x in zip(df2["image"], df2["label"], strict=True)
    }
    assert lab2["patient00007/study1/view1_frontal"] == "Atelectasis"  # U-Ones


# --------------------------------------------------------------------------- NIH ChestX-ray14


def test_nih_cxr14(tmp_path, capsys):
    meta = DATA / "nih-cxr14" / "Data_Entry_2017.csv"
    src = pd.read_csv(meta, dtype=str, keep_default_na=False)
    root = tmp_path / "nih"
    for i, name in enumerate(src["Image Index"]):
        if name != "00000011_000.png":
            _img(root / ("images_001" if i < 8 else "images_002") / "images" / name, mode="L")
    out = tmp_path / "nih.csv"
    df, cap = _convert("nih-cxr14", meta, root, out, capsys=capsys)
    assert "official split" in cap.err
    assert "skipped 4 (3 several findings, 1 image not found)" in cap.out
    assert len(df) == 12
    img = {
        Path(_real(out, p)).name: r for p, r in zip(df["image"], df.to_dict("records"), strict=True)
    }
    assert img["00000001_000.png"]["label"] == "Cardiomegaly"
    assert img["00000002_000.png"]["label"] == "No Finding"
    assert img["00000001_000.png"]["sex"] == "M" and img["00000001_000.png"]["age"] == "58"
    assert img["00000006_000.png"]["age"] == ""  # 411 is not an age
    assert img["00000003_001.png"]["follow_up"] == "1" and img["00000005_001.png"]["view"] == "AP"
    assert img["00000001_000.png"]["pixel_spacing"] == "0.143"
    # the official test list is the test split; the train/val list never lands in test
    for name, r in img.items():
        assert (r["split"] == "test") == (name.split("_")[0] in ("00000007", "00000008")), name
    assert img["00000008_000.png"]["patient_id"] == img["00000008_001.png"]["patient_id"]
    assert all(re.fullmatch(PID_RE + r"_\d{3}", c) for c in df["case_id"])
    raw = [f"{int(p):08d}" for p in src["Patient ID"]]
    assert not any(r in c for c in df["case_id"] for r in raw)
    assert not set(df["patient_id"]) & set(src["Patient ID"])
    _check_common(out, df, sorted(set(raw)), linked=True)
    # priority policy keeps multi-finding images
    out2 = tmp_path / "nih_prio.csv"
    df2, _ = _convert(
        "nih-cxr14",
        meta,
        root,
        out2,
        "--label-policy",
        "priority",
        "--ignore-official-split",
        capsys=capsys,
    )
    img2 = {Path(_real(out2, p)).name: x for p, x in zip(df2["image"], df2["label"], strict=True)}
    assert img2["00000004_000.png"] == "Mass" and img2["00000001_002.png"] == "Effusion"
    assert len(df2) == 15


# --------------------------------------------------------------------------- RSNA Pneumonia


@pytest.mark.filterwarnings("ignore:Invalid value for VR AS")  # RSNA ages are bare numbers
def test_rsna_pneumonia_with_box_masks(tmp_path, capsys):
    meta = DATA / "rsna-pneumonia" / "stage_2_train_labels.csv"
    src = pd.read_csv(meta, dtype=str, keep_default_na=False)
    pids = list(dict.fromkeys(src["patientId"]))
    images = tmp_path / "rsna" / "stage_2_train_images"
    for i, pid in enumerate(pids):
        path = images / f"{pid}.dcm"
        if pid.startswith("010ccb9f"):
            continue  # missing
        if pid.startswith("01027bc3"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"not a dicom file at all")  # unreadable: skipped, reported
            continue
        _dicom(path, pid, "MF"[i % 2], "51" if i % 3 else "045Y", ("PA", "AP")[i % 2])
    out = tmp_path / "work" / "rsna.csv"
    df, cap = _convert("rsna-pneumonia", meta, images, out, capsys=capsys)
    assert "1 of 13 images not found" in cap.err
    assert "unreadable DICOM header" in cap.err
    assert len(df) == 11
    assert list(df.columns) == [
        "case_id",
        "image",
        "label",
        "split",
        "patient_id",
        "mask",
        "sex",
        "age",
        "view",
    ]
    assert sorted(set(df["label"])) == ["Lung Opacity", "No Lung Opacity / Not Normal", "Normal"]
    by_pid = {
        Path(_real(out, p)).stem: r for p, r in zip(df["image"], df.to_dict("records"), strict=True)
    }
    assert (
        by_pid[pids[0]]["sex"] == "M"
        and by_pid[pids[0]]["age"] == "45"
        and by_pid[pids[0]]["view"] == "PA"
    )
    assert by_pid[pids[1]]["age"] == "51"
    # masks: one PNG per opacity case, the union of its boxes, image geometry, clipped
    opac = [r for r in by_pid.values() if r["label"] == "Lung Opacity"]
    assert len(opac) == 4 and all(r["mask"] for r in opac)
    assert all(r["mask"] == "" for r in by_pid.values() if r["label"] != "Lung Opacity")
    m = np.array(Image.open(out.parent / by_pid["00436515-870c-4b36-a041-de91049b9ab4"]["mask"]))
    assert m.shape == (128, 128) and set(np.unique(m)) == {0, 255}
    assert (m[15:53, 26:47] == 255).all() and (m[15:60, 70:95] == 255).all()
    assert m.sum() // 255 == 38 * 21 + 45 * 25
    m2 = np.array(Image.open(out.parent / by_pid["00c0b293-48e7-4e16-ac76-9269ba535a62"]["mask"]))
    assert (
        m2[90:128, 100:128] == 255
    ).all() and m2.sum() // 255 == 38 * 28  # clipped at the border
    m3 = np.array(Image.open(out.parent / by_pid["00704310-78a8-4b38-8475-49f4573b2dbb"]["mask"]))
    assert (
        m3[57:88, 32:53].all() and not m3[56, 40] and not m3[88, 40]
    )  # fractional boxes rounded outward
    assert all(r["case_id"].startswith("c_") for r in by_pid.values())
    _check_common(out, df, pids, linked=True)
    # binary labels on request
    out2 = tmp_path / "work" / "rsna_t.csv"
    df2, _ = _convert(
        "rsna-pneumonia", meta, images, out2, "--label-field", "target", capsys=capsys
    )
    assert sorted(set(df2["label"])) == ["Lung Opacity", "No Lung Opacity"]


# --------------------------------------------------------------------------- errors


def test_wrong_file_and_missing_images_are_one_line_errors(tmp_path, capsys):
    out = str(tmp_path / "m.csv")
    nih = str(DATA / "nih-cxr14" / "Data_Entry_2017.csv")
    assert main(["manifest", "from-ham10000", nih, "--images", str(tmp_path), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "not a HAM10000 metadata file" in err and "lesion_id" in err and "Traceback" not in err
    assert (
        main(["manifest", "from-nih-cxr14", nih, "--images", str(tmp_path / "nope"), "--out", out])
        == 2
    )
    assert "--images" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["manifest", "from-nih-cxr14", nih, "--images", str(empty), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "no usable rows" in err and "image not found" in err and "Traceback" not in err
    shutil.rmtree(empty)
