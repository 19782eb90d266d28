"""retrieval.data.phantom: deterministic, balanced, patient-disjoint synthetic data with a
controllable shortcut, and fake PHI that stays in the DICOM headers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from retrieval.cli import main
from retrieval.data.imageio import read_image, read_mask
from retrieval.data.phantom import (
    FACTOR_COLUMNS,
    PHOTO_CLASSES,
    SITES,
    XRAY_CLASSES,
    make_phantom,
    render_marker,
    render_variant,
)
from retrieval.data.privacy import hash_patient_id
from retrieval.errors import CasebaseError

CLASS_SITE = {c: SITES[i] for i, c in enumerate(XRAY_CLASSES)}


def _files_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _manifest(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "manifest.csv", dtype=str, keep_default_na=False)


def test_same_seed_gives_identical_bytes(tmp_path):
    a = make_phantom(tmp_path / "a", n=30, size=64, seed=7, confounder="site-marker")
    b = make_phantom(tmp_path / "b", n=30, size=64, seed=7, confounder="site-marker")
    assert a.read_bytes() == b.read_bytes()
    da, db = _files_digest(tmp_path / "a"), _files_digest(tmp_path / "b")
    assert da == db and len(da) == 61  # 30 images + 30 masks + manifest
    c = make_phantom(tmp_path / "c", n=30, size=64, seed=8, confounder="site-marker")
    assert c.read_bytes() != a.read_bytes()


def test_schema_balance_and_patient_disjoint_splits(phantom_dir):
    df = _manifest(phantom_dir)
    assert list(df.columns) == [
        "case_id",
        "image",
        "label",
        "split",
        "patient_id",
        "mask",
        "site",
        "sex",
        "age",
        "scanner",
        *FACTOR_COLUMNS,
    ]
    assert len(df) == 60 and df["case_id"].is_unique
    assert df["label"].value_counts().to_dict() == {c: 20 for c in XRAY_CLASSES}
    sizes = df["split"].value_counts().to_dict()
    assert sizes == {"train": 42, "val": 9, "test": 9}
    for split, part in df.groupby("split"):
        assert part["label"].value_counts().min() >= 2, split
    per_patient = df.groupby("patient_id")["split"].nunique()
    assert per_patient.max() == 1  # no patient in two splits
    cases_per_patient = df.groupby("patient_id").size()
    assert cases_per_patient.max() <= 4 and cases_per_patient.median() >= 2
    assert df["patient_id"].str.fullmatch(r"p_[0-9a-f]{16}").all()
    assert set(df["sex"]) == {"F", "M"} and set(df["site"]) <= set(SITES)
    ages = df["age"].astype(int)
    assert ages.between(20, 90).all()
    assert df["scanner"].nunique() >= 2
    # a patient's sex is constant across their cases
    assert (df.groupby("patient_id")["sex"].nunique() == 1).all()


def test_masks_match_image_geometry_and_lesion_size(phantom_dir):
    df = _manifest(phantom_dir)
    areas = {c: [] for c in XRAY_CLASSES}
    for _, row in df.iterrows():
        img = read_image(phantom_dir / row["image"])
        mask = read_mask(phantom_dir / row["mask"], expected_size=img.original_size)
        areas[row["label"]].append(mask.sum() / mask.size)
    lo, hi = np.pi * 0.07**2, np.pi * 0.13**2
    medians = {c: float(np.median(v)) for c, v in areas.items()}
    for c, v in areas.items():
        assert 0.6 * lo < min(v) and max(v) < 1.8 * hi, (c, min(v), max(v))
    # no class can be told apart by lesion size alone
    assert max(medians.values()) / min(medians.values()) < 1.6, medians


def test_fake_phi_in_headers_never_in_manifest(phantom_dir):
    df = _manifest(phantom_dir)
    text = (phantom_dir / "manifest.csv").read_text()
    for _, row in df.head(12).iterrows():
        ds = pydicom.dcmread(phantom_dir / row["image"], stop_before_pixels=True)
        name, pid = str(ds.PatientName), str(ds.PatientID)
        assert name.startswith("PHANTOM^") and pid.startswith("PHX")
        assert ds.PatientBirthDate and ds.StudyDate
        assert row["patient_id"] == hash_patient_id(pid)
        for secret in (name, pid, name.split("^")[1], ds.PatientBirthDate, ds.StudyDate):
            assert secret not in text, secret
        assert ds.SOPInstanceUID and ds.StudyInstanceUID and ds.SeriesInstanceUID
        assert ds.BitsStored in (12, 16) and ds.Modality in ("CR", "DX", "OT")
    assert "PHANTOM" not in text and "PHX" not in text


def _site_match(df: pd.DataFrame, split: str) -> float:
    part = df[df["split"] == split]
    return float((part["site"] == part["label"].map(CLASS_SITE)).mean())


def _corner_letter(img: np.ndarray, size: int) -> str | None:
    """Which site letter is burned in the top-right corner (None when none is)."""
    best, best_score = None, 0.0
    for letter in SITES:
        glyph = render_marker(letter, size)
        margin = max(2, int(round(0.03 * size)))
        r0, c0 = margin, size - margin - glyph.shape[1]
        patch = img[r0 : r0 + glyph.shape[0], c0 : c0 + glyph.shape[1]]
        if patch[glyph].min() < 0.8:
            continue
        score = patch[glyph].mean() - patch[~glyph].mean()
        if score > max(best_score, 0.3):
            best, best_score = letter, score
    return best


def test_site_marker_ties_site_to_label_in_train_only(tmp_path):
    strength = 0.9
    m = make_phantom(
        tmp_path / "sm", n=300, size=64, seed=1, confounder="site-marker", strength=strength
    )
    df = _manifest(m.parent)
    assert _site_match(df, "train") >= strength - 0.08
    assert _site_match(df, "val") >= strength - 0.25
    assert _site_match(df, "test") <= 0.6  # chance is 1/3
    # the letter in the pixels is the site of the row
    for _, row in df.sample(25, random_state=0).iterrows():
        px = read_image(m.parent / row["image"]).pixels[:, :, 0]
        assert _corner_letter(px, 64) == row["site"], row["case_id"]


def test_no_confounder_means_no_marker_and_independent_site(tmp_path, phantom_dir):
    df = _manifest(phantom_dir)
    for _, row in df.head(15).iterrows():
        px = read_image(phantom_dir / row["image"]).pixels[:, :, 0]
        assert _corner_letter(px, 64) is None
    m = make_phantom(tmp_path / "none", n=300, size=64, seed=1)
    big = _manifest(m.parent)
    assert 0.15 < _site_match(big, "train") < 0.5


def test_small_n_and_sizes(tmp_path):
    m = make_phantom(tmp_path / "n30", n=30, size=64, seed=0)
    df = _manifest(m.parent)
    assert len(df) == 30
    for split in ("train", "val", "test"):
        counts = df[df["split"] == split]["label"].value_counts()
        assert set(counts.index) == set(XRAY_CLASSES) and counts.min() >= 2, split
    m = make_phantom(tmp_path / "big", n=12, size=512, seed=0)
    row = _manifest(m.parent).iloc[0]
    img = read_image(m.parent / row["image"])
    assert img.original_size == (512, 512)
    assert read_mask(m.parent / row["mask"], img.original_size).any()


def test_photo_phantom_and_ruler_confounder(tmp_path, photo_phantom_dir):
    df = _manifest(photo_phantom_dir)
    assert "device" in df.columns and "scanner" not in df.columns
    assert df["label"].value_counts().to_dict() == {c: 20 for c in PHOTO_CLASSES}
    assert set(df["ruler"]) == {"no"}
    for _, row in df.head(6).iterrows():
        img = read_image(photo_phantom_dir / row["image"])
        assert img.pixels.shape == (64, 64, 3) and img.meta["format"] == "png"
        read_mask(photo_phantom_dir / row["mask"], img.original_size)

    m = make_phantom(
        tmp_path / "ruler",
        n=300,
        size=64,
        seed=2,
        modality="photo",
        confounder="ruler",
        strength=0.9,
    )
    df = _manifest(m.parent)
    train = df[df["split"] == "train"]
    rate = train.groupby("label")["ruler"].apply(lambda s: (s == "yes").mean())
    assert rate["melanoma"] > 0.75 and rate.drop("melanoma").max() < 0.25
    test = df[df["split"] == "test"]
    test_rate = test.groupby("label")["ruler"].apply(lambda s: (s == "yes").mean())
    assert test_rate.max() - test_rate.min() < 0.45
    # the ruler is in the pixels: a pale strip along the bottom edge
    with_ruler = df[df["ruler"] == "yes"].iloc[0]
    without = df[df["ruler"] == "no"].iloc[0]
    bottom = lambda r: read_image(m.parent / r["image"]).pixels[-4:-1, :, :].mean()  # noqa: E731
    assert bottom(with_ruler) > bottom(without) + 0.1

    m = make_phantom(
        tmp_path / "psm", n=30, size=64, seed=2, modality="photo", confounder="site-marker"
    )
    row = _manifest(m.parent).iloc[0]
    px = read_image(m.parent / row["image"]).pixels.min(axis=2)
    assert _corner_letter(px, 64) == row["site"]


@pytest.mark.parametrize("modality", ["xray", "photo"])
def test_scanner_confounder_ties_the_vendor_to_the_label_in_train_only(tmp_path, modality):
    m = make_phantom(
        tmp_path / modality, n=300, size=32, seed=4, modality=modality, confounder="scanner"
    )
    df = _manifest(m.parent)
    col = "scanner" if modality == "xray" else "device"
    classes = XRAY_CLASSES if modality == "xray" else PHOTO_CLASSES

    def tied(split):
        part = df[df["split"] == split]
        # the class's own vendor is the one most of its train cases have; one vendor per class
        own = df[df["split"] == "train"].groupby("label")[col].agg(lambda s: s.mode()[0])
        assert own.nunique() == len(classes)
        return (part[col] == part["label"].map(own)).mean()

    assert tied("train") > 0.85 and tied("test") < 0.6  # 0.9 + 0.1/3 vs chance 1/3


def test_render_variant_changes_the_confounder_and_nothing_else(tmp_path):
    args = dict(n=30, size=64, seed=5, modality="photo", confounder="ruler", strength=0.9)
    m = make_phantom(tmp_path / "p", **args)
    df = _manifest(m.parent)
    row = df[df["ruler"] == "no"].iloc[0]
    same = render_variant(tmp_path / "same.png", row["case_id"], **args)
    assert same.read_bytes() == (m.parent / row["image"]).read_bytes()
    flipped = read_image(render_variant(tmp_path / "r.png", row["case_id"], ruler=True, **args))
    orig = read_image(m.parent / row["image"]).pixels
    changed = np.abs(flipped.pixels - orig).max(axis=2) > 0
    h = max(4, round(0.08 * 64))
    assert changed[-h:].any() and not changed[:-h].any()  # the ruler strip alone
    dev = read_image(render_variant(tmp_path / "d.png", row["case_id"], scanner="Heine", **args))
    if row["device"] != "Heine":
        assert np.abs(dev.pixels - orig).mean() > 0.005  # colour cast, vignette, blur
    xargs = dict(n=30, size=64, seed=5, modality="xray", confounder="site-marker")
    xm = make_phantom(tmp_path / "x", **xargs)
    xrow = _manifest(xm.parent).iloc[0]
    other = next(s for s in SITES if s != xrow["site"])
    px = read_image(render_variant(tmp_path / "x.dcm", xrow["case_id"], site=other, **xargs))
    assert _corner_letter(px.pixels[:, :, 0], 64) == other
    with pytest.raises(CasebaseError, match="cannot change"):
        render_variant(tmp_path / "z.png", row["case_id"], label="melanoma", **args)
    with pytest.raises(CasebaseError, match="no case"):
        render_variant(tmp_path / "z.png", "case_9999", **args)
    with pytest.raises(CasebaseError, match="unknown vendor"):
        render_variant(tmp_path / "z.png", row["case_id"], scanner="Acme", **args)


def test_cli_and_bad_arguments(tmp_path, capsys):
    assert main(["phantom", str(tmp_path / "cli"), "--n", "30", "--size", "64", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith("manifest.csv") and (tmp_path / "cli" / "manifest.csv").exists()
    assert main(["phantom", str(tmp_path / "x"), "--n", "5"]) == 2
    assert "at least" in capsys.readouterr().err
    assert main(["phantom", str(tmp_path / "x"), "--confounder", "ruler"]) == 2
    assert main(["phantom", str(tmp_path / "x"), "--strength", "1.5"]) == 2
    with pytest.raises(CasebaseError):
        make_phantom(tmp_path / "y", n=30, modality="ct")


def test_cli_writes_concept_images_for_casebase_concepts(tmp_path, capsys):
    """`casebase phantom --concept-images KIND`: a folder `casebase concepts` reads, from the
    generator that made the data; bad combinations are one-line errors."""
    out = tmp_path / "ruler"
    args = ["phantom", str(out), "--modality", "photo", "--n", "4", "--size", "64"]
    assert main([*args, "--concept-images", "ruler"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 4 and read_image(pngs[0]).pixels.shape == (64, 64, 3)
    plain = tmp_path / "plain"
    plain_args = ["phantom", str(plain), "--modality", "photo", "--n", "4", "--size", "64"]
    assert main([*plain_args, "--concept-images", "plain"]) == 0
    # the same cases without the ruler: the pair differs only where the ruler is burned in
    a, b = read_image(pngs[0]).pixels, read_image(sorted(plain.glob("*.png"))[0]).pixels
    differ = np.abs(a - b).max(-1) > 0
    assert 0 < differ.mean() < 0.5
    marker = tmp_path / "marker"
    assert main(["phantom", str(marker), "--n", "3", "--size", "64", "--concept-images", "marker",
                 "--site", "B"]) == 0  # fmt: skip
    assert len(list(marker.glob("*.dcm"))) == 3
    capsys.readouterr()
    for bad, msg in (
        (["--concept-images", "device"], "the device concept needs a photo vendor"),
        (["--concept-images", "marker", "--site", "Z"], "unknown site 'Z'"),
        (["--concept-images", "ruler", "--dim", "3"], "leave out --dim 3"),
    ):
        assert main(["phantom", str(tmp_path / "bad"), "--modality", "photo", *bad]) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err


@pytest.mark.parametrize("which", ["phantom_dir", "photo_phantom_dir"])
def test_generative_factors_describe_the_drawn_lesion(which, request):
    """lesion_size / lesion_x / lesion_y are what the mask shows; every factor lies in its
    documented range and varies within each class (what the depth benchmark measures)."""
    root = request.getfixturevalue(which)
    df = _manifest(root)
    f = df[list(FACTOR_COLUMNS)].astype(float)
    assert (
        f[["lesion_x", "lesion_y", "lesion_shape", "lesion_contrast"]].stack().between(0, 1).all()
    )
    lo, hi = (0.07, 0.13) if which == "phantom_dir" else (0.1, 0.16)
    assert f["lesion_size"].between(lo, hi).all()
    for _, part in f.groupby(df["label"]):
        assert (part.std() > 0.01).all(), part.std()
    radius_px, area = [], []
    for i, row in df.head(20).iterrows():
        img = read_image(root / row["image"])
        mask = read_mask(root / row["mask"], expected_size=img.original_size)
        side = img.original_size[0]
        ys, xs = np.nonzero(mask)
        # the recorded centre lies in the lesion's core
        assert (
            abs(xs.mean() + 0.5 - f.at[i, "lesion_x"] * side) < 0.5 * f.at[i, "lesion_size"] * side
        )
        assert (
            abs(ys.mean() + 0.5 - f.at[i, "lesion_y"] * side) < 0.5 * f.at[i, "lesion_size"] * side
        )
        radius_px.append(f.at[i, "lesion_size"] * side)
        area.append(mask.sum())
    assert np.corrcoef(np.square(radius_px), area)[0, 1] > 0.8
