"""retrieval.data.volume and the 3-D phantom: DICOM series / NIfTI / NPY read to one
(D, H, W) convention, window presets, resampling, clear errors for broken series, and the
manifest loader accepting volume paths."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from retrieval.cli import main
from retrieval.data.imageio import read_image
from retrieval.data.manifest import validate_manifest
from retrieval.data.phantom3d import CT_CLASSES, MR_CLASSES, NORMAL, make_phantom3d
from retrieval.data.volume import (
    CT_PRESETS,
    VolumeError,
    is_volume_path,
    read_volume,
    read_volume_mask,
    resample,
    window,
)
from retrieval.errors import CasebaseError


def write_series(
    folder: Path,
    values: np.ndarray,
    *,
    spacing=(2.0, 0.7, 0.8),
    positions=None,
    orientations=None,
    series_uids=None,
    modality="CT",
    names=None,
    window=(40, 400),
    patient_id="PHX0000001",
) -> list[Path]:
    """A small CT/MR series, one file per slice (file order = names, default shuffled-proof)."""
    folder.mkdir(parents=True, exist_ok=True)
    d, h, w = values.shape
    uid = generate_uid()
    study = generate_uid()
    paths = []
    for k in range(d):
        meta = FileMetaDataset()
        sop = generate_uid()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        name = names[k] if names else f"s{k:03d}.dcm"
        ds = FileDataset(name, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series_uids[k] if series_uids else uid
        ds.FrameOfReferenceUID = generate_uid()
        ds.PatientName = "PHANTOM^SERIES"
        ds.PatientID = patient_id
        ds.PatientSex = "F"
        ds.PatientAge = "050Y"
        ds.Modality = modality
        ds.Manufacturer = "Acme"
        ds.BodyPartExamined = "CHEST"
        ds.ImageOrientationPatient = orientations[k] if orientations else [1, 0, 0, 0, 1, 0]
        z = positions[k] if positions is not None else k * spacing[0]
        ds.ImagePositionPatient = [-10.0, -20.0, float(z)]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.InstanceNumber = k + 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = h, w
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = window
        ds.PixelData = np.clip(values[k] + 1024, 0, 4095).astype(np.uint16).tobytes()
        p = folder / name
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def _ramp(d=5, h=6, w=7) -> np.ndarray:
    z, y, x = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    return (100 * z + 10 * y + x - 500).astype(np.float32)


# --------------------------------------------------------------------------- DICOM series


def test_series_is_ordered_by_position_not_by_file_name(tmp_path):
    vals = _ramp()
    # file names sort in the reverse order of the positions
    names = [f"f{4 - k}.dcm" for k in range(5)]
    write_series(tmp_path / "s", vals, names=names)
    vol = read_volume(tmp_path / "s")
    assert vol.shape == (5, 6, 7)
    assert vol.spacing == pytest.approx((2.0, 0.7, 0.8))
    np.testing.assert_array_equal(vol.values, vals)  # rescale applied, slices in z order
    assert vol.modality == "CT"
    assert vol.window == (40.0, 400.0)
    assert vol.meta["window_source"] == "file"
    assert len(vol.meta["sop_instance_uids"]) == 5
    # LINEAR VOI: the window maps [-160, 240] HU onto [0, 1]
    assert vol.array.min() >= 0 and vol.array.max() <= 1
    inside = (vals > -150) & (vals < 230)
    assert np.all((vol.array[inside] > 0) & (vol.array[inside] < 1))
    assert is_volume_path(tmp_path / "s")
    # 2-D code reads the middle slice
    img = read_image(tmp_path / "s")
    assert img.meta["volume_shape"] == [5, 6, 7] and img.meta["slice_index"] == 2
    np.testing.assert_allclose(img.pixels[:, :, 0], vol.array[2])


def test_series_descending_positions_and_header_free_of_phi(tmp_path):
    vals = _ramp()
    write_series(tmp_path / "s", vals, positions=[8.0, 6.0, 4.0, 2.0, 0.0])
    vol = read_volume(tmp_path / "s")
    np.testing.assert_array_equal(vol.values, vals[::-1])  # ascending along the normal
    text = repr(vol.meta)
    assert "PHANTOM" not in text and "PHX" not in text


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"positions": [0, 2, 4, 8, 10]}, "1 missing slice"),
        ({"positions": [0, 2, 4, 5.2, 7]}, "uneven slice spacing"),
        ({"positions": [0, 2, 2, 4, 6]}, "share one position"),
        ({"series_uids": ["1.2.3", "1.2.3", "1.2.4", "1.2.4", "1.2.4"]}, "2 series in one folder"),
        (
            {"orientations": [[1, 0, 0, 0, 1, 0]] * 4 + [[1, 0, 0, 0, 0, -1]]},
            "2 slice orientations",
        ),
    ],
)
def test_broken_series_give_one_clear_line(tmp_path, kwargs, needle):
    write_series(tmp_path / "s", _ramp(), **kwargs)
    with pytest.raises(VolumeError) as exc:
        read_volume(tmp_path / "s")
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg and str(tmp_path / "s") in msg
    assert isinstance(exc.value, CasebaseError)


def test_single_slice_and_empty_folder(tmp_path):
    write_series(tmp_path / "one", _ramp(d=1))
    with pytest.raises(VolumeError, match="at least 2 slices"):
        read_volume(tmp_path / "one")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeError, match="no DICOM files"):
        read_volume(tmp_path / "empty")


# --------------------------------------------------------------------------- NIfTI, NPY


def test_nifti_is_reoriented_to_the_stated_convention(tmp_path):
    data = np.zeros((7, 6, 5), np.int16)  # (i, j, k) with an RAS+ identity affine
    data[6, 0, 4] = 1000  # i max = most Right, j 0 = most Posterior, k max = most Superior
    img = nib.Nifti1Image(data, np.diag([0.8, 0.7, 2.0, 1.0]))
    nib.save(img, tmp_path / "v.nii.gz")
    vol = read_volume(tmp_path / "v.nii.gz")
    assert vol.shape == (5, 6, 7)
    assert vol.spacing == pytest.approx((2.0, 0.7, 0.8))
    # D: inferior -> superior; H: anterior -> posterior; W: patient right -> left
    assert np.unravel_index(int(np.argmax(vol.values)), vol.shape) == (4, 5, 0)
    # the same content under an LPS-like affine (flipped i and j) reads to the same array
    lps = nib.Nifti1Image(data[::-1, ::-1].copy(), np.diag([-0.8, -0.7, 2.0, 1.0]))
    nib.save(lps, tmp_path / "w.nii")
    np.testing.assert_array_equal(read_volume(tmp_path / "w.nii").values, vol.values)
    assert is_volume_path(tmp_path / "w.nii") and vol.meta["window_source"] == "percentile"


def test_npy_volume_detection_and_values(tmp_path):
    a = np.random.default_rng(0).random((9, 10, 11)).astype(np.float32)
    np.save(tmp_path / "v.npy", a)
    np.save(tmp_path / "rgb.npy", a[0, :, :3])
    np.save(tmp_path / "chw.npy", a[:3])
    assert is_volume_path(tmp_path / "v.npy")
    assert not is_volume_path(tmp_path / "rgb.npy") and not is_volume_path(tmp_path / "chw.npy")
    vol = read_volume(tmp_path / "v.npy")
    np.testing.assert_array_equal(vol.array, a)  # [0, 1] floats kept as they are
    assert vol.meta["spacing_known"] is False
    u8 = (a * 255).astype(np.uint8)
    np.save(tmp_path / "u8.npy", u8)
    np.testing.assert_allclose(read_volume(tmp_path / "u8.npy").array, u8 / 255.0, atol=1e-7)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}] * 3 * 10 * 11).reshape(3, 10, 11))
    with pytest.raises(CasebaseError):
        read_volume(tmp_path / "obj.npy")


def test_window_presets_and_resample(tmp_path):
    hu = np.linspace(-1000, 1000, 2 * 4 * 50, dtype=np.float32).reshape(2, 4, 50)
    np.save(tmp_path / "hu.npy", hu)
    vol = read_volume(tmp_path / "hu.npy")
    for name, (c, w) in CT_PRESETS.items():
        wv = window(vol, name)
        assert wv.window == (c, w)
        below, above = hu < c - w / 2, hu > c + w / 2
        assert np.all(wv.array[below] == 0) and np.all(wv.array[above] == 1)
    assert window(vol, "soft-tissue").window == CT_PRESETS["soft_tissue"]
    with pytest.raises(VolumeError, match="unknown window preset"):
        window(vol, "liver-ish")
    assert read_volume(tmp_path / "hu.npy", window="lung").window == CT_PRESETS["lung"]

    ramp = _ramp(d=4, h=6, w=8)
    np.save(tmp_path / "r.npy", ramp)
    v = read_volume(tmp_path / "r.npy")
    r = resample(v, (0.5, 2.0, 1.0))
    assert r.shape == (8, 3, 8) and r.spacing == pytest.approx((0.5, 2.0, 1.0))
    # the extent is kept and a linear ramp stays a ramp: mean preserved
    assert r.values.mean() == pytest.approx(ramp.mean(), abs=1.0)
    assert resample(v, 1.0) is v
    with pytest.raises(VolumeError):
        resample(v, (0, 1, 1))


# --------------------------------------------------------------------------- 3-D phantom


@pytest.mark.parametrize("modality, classes", [("ct", CT_CLASSES), ("mr", MR_CLASSES)])
def test_phantom3d_formats_agree_and_manifests_validate(tmp_path, modality, classes):
    man = make_phantom3d(tmp_path, n=12, size=32, depth=8, seed=3, modality=modality, formats="all")
    assert man == tmp_path / "manifest.csv"
    frames = {
        f: pd.read_csv(tmp_path / name, dtype=str, keep_default_na=False)
        for f, name in (("npy", "manifest.csv"), ("nifti", "manifest_nifti.csv"),
                        ("dicom", "manifest_dicom.csv"))
    }  # fmt: skip
    for f, df in frames.items():
        assert validate_manifest(tmp_path / ("manifest.csv" if f == "npy" else f"manifest_{f}.csv"),
                                 progress=False) == []  # fmt: skip
        assert set(df["label"]) == set(classes)
        assert {"lesion_size", "lesion_z", "patient_id", "mask", "split"} <= set(df.columns)
    row = frames["npy"].iloc[0]
    a = read_volume(tmp_path / row["image"])
    b = read_volume(tmp_path / frames["nifti"].iloc[0]["image"])
    c = read_volume(tmp_path / frames["dicom"].iloc[0]["image"])
    assert a.shape == b.shape == c.shape == (8, 32, 32)
    np.testing.assert_allclose(a.array, b.array, atol=1e-6)
    np.testing.assert_allclose(a.array, c.array, atol=1e-6)
    assert b.spacing == pytest.approx(c.spacing) and c.modality == modality.upper()
    # the lesion mask lies where the lesion is, in the same orientation
    m = read_volume_mask(tmp_path / row["mask"], a.shape)
    assert 0 < m.sum() < m.size // 4
    assert float(a.array[m].mean()) > float(a.array[~m].mean())
    # no PHI in the manifests; PHI only in the DICOM headers
    text = "".join((tmp_path / n).read_text() for n in ("manifest.csv", "manifest_dicom.csv"))
    assert "PHANTOM" not in text and "PHX" not in text
    ds = pydicom.dcmread(next((tmp_path / frames["dicom"].iloc[0]["image"]).glob("*.dcm")))
    assert str(ds.PatientID).startswith("PHX")


def test_phantom3d_is_deterministic_and_the_cli_works(tmp_path):
    def digest(root: Path) -> dict[str, str]:
        return {
            p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    assert main(["phantom", str(tmp_path / "a"), "--dim", "3", "--n", "12", "--size", "32",
                 "--depth", "8", "--format", "npy,nifti"]) == 0  # fmt: skip
    make_phantom3d(tmp_path / "b", n=12, size=32, depth=8, seed=0, formats=("npy", "nifti"))
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert main(["phantom", str(tmp_path / "c"), "--modality", "ct", "--n", "12"]) != 0
    assert main(["phantom", str(tmp_path / "c"), "--dim", "3", "--format", "png"]) != 0


def test_phantom3d_normals_are_lesion_free_and_cli_only_in_3d(tmp_path):
    assert main(["phantom", str(tmp_path / "n"), "--dim", "3", "--normals", "--n", "16",
                 "--size", "32", "--depth", "8"]) == 0  # fmt: skip
    df = pd.read_csv(tmp_path / "n" / "manifest.csv", dtype=str, keep_default_na=False)
    assert set(df["label"]) == set(CT_CLASSES) | {NORMAL}
    counts = df["label"].value_counts()  # classes dealt in turn within each of the 3 splits
    assert counts.max() - counts.min() <= 3
    for _, row in df.iterrows():
        m = read_volume_mask(tmp_path / "n" / row["mask"], (8, 32, 32))
        if row["label"] == NORMAL:
            assert not m.any() and row["lesion_size"] == "" and row["lesion_z"] == ""
        else:
            assert m.any() and float(row["lesion_size"]) > 0
    # without --normals the same seed gives three lesion classes; --normals is 3-D only
    make_phantom3d(tmp_path / "plain", n=16, size=32, depth=8, seed=0)
    plain = pd.read_csv(tmp_path / "plain" / "manifest.csv", dtype=str, keep_default_na=False)
    assert set(plain["label"]) == set(CT_CLASSES)
    assert main(["phantom", str(tmp_path / "x"), "--normals", "--n", "12"]) != 0
    assert not (tmp_path / "x" / "manifest.csv").exists()


def test_manifest_reports_a_mask_of_the_wrong_shape(tmp_path):
    make_phantom3d(tmp_path, n=12, size=32, depth=8, seed=1)
    df = pd.read_csv(tmp_path / "manifest.csv", dtype=str, keep_default_na=False)
    np.save(tmp_path / df["mask"].iloc[0], np.zeros((8, 32, 31), np.uint8))
    problems = validate_manifest(tmp_path / "manifest.csv", progress=False)
    assert [(p.row, p.column) for p in problems] == [(1, "mask")]
    assert "differs from the volume's (8, 32, 32)" in problems[0].message
