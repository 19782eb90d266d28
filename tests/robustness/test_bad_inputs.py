"""Bad inputs never give a traceback or an internal error: every one gets a specific message.

This module *counts* what it tries. It builds a corpus of bad files from the
phantoms (truncated and byte-flipped DICOM / PNG / JPEG / TIFF, empty files,
non-images with image extensions, decompression bombs, NaN/inf and pickled
NPYs, wrong-size masks), generates bad manifests with hypothesis (missing and
duplicate columns, latin-1 / UTF-16 / NUL bytes, duplicate ids, paths with
spaces and unicode, relative and absolute paths, huge fields), and runs the
CLI in-process (``retrieval.cli.main``) on them:

* ``validate``: every problem named by row and column (and file), exactly the
  planted ones;
* ``ingest-dicom``: one run over a tree of bad DICOM files plus a few good
  ones; each bad file is skipped with a message naming it;
* ``index build``: batches of many bad files plus a few good ones; the build
  goes on, names each skipped file, and the bundle holds exactly the good ones;
* ``query``: each bad file on its own against ``tiny_index``.

A byte-flipped file is not always broken (a flipped pixel is still an image):
the oracle for those is :func:`retrieval.data.imageio.read_image` itself, and the
CLI must agree with it (refuse with the file named, or accept).

The totals go to ``artifacts/robustness_counts.json`` (and are printed).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import os
import random
import re
import shutil
import struct
import traceback
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retrieval import cli
from retrieval.data.imageio import read_image
from retrieval.errors import ImageReadError

REPO = Path(__file__).resolve().parents[2]
COUNTS_FILE = REPO / "artifacts" / "robustness_counts.json"
UNICODE_DIR = "dir with space/ünï 漢字"


# --------------------------------------------------------------------------- running the CLI


@dataclass
class Run:
    argv: list[str]
    rc: int | None
    out: str
    err: str
    exc: str | None = None  # a traceback that escaped main()

    @property
    def text(self) -> str:
        return self.out + self.err


@dataclass
class Tally:
    """What was tried, per command, and what came back."""

    tried: Counter = field(default_factory=Counter)
    refused: Counter = field(default_factory=Counter)
    accepted: Counter = field(default_factory=Counter)
    skipped_in_batch: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    tracebacks: int = 0
    internal_errors: int = 0
    failures: list[str] = field(default_factory=list)
    cli_runs: int = 0

    def check_run(self, run: Run) -> None:
        """Count a CLI run; a traceback or an internal error is a failure."""
        self.cli_runs += 1
        if run.exc is not None or "Traceback" in run.text:
            self.tracebacks += 1
            self.failures.append(f"traceback from {run.argv}:\n{run.exc or run.text}"[:3000])
        if "internal error" in run.text:
            self.internal_errors += 1
            self.failures.append(f"internal error from {run.argv}: {run.text.strip()[-1500:]}")

    def fail(self, message: str) -> None:
        self.failures.append(message[:3000])

    def to_json(self) -> dict:
        total = sum(self.tried.values())
        return {
            "bad_inputs_tried": total,
            "refused_or_skipped_total": sum(self.refused.values())
            + sum(self.skipped_in_batch.values()),
            "accepted_as_valid_total": sum(self.accepted.values()),
            "by_command": dict(sorted(self.tried.items())),
            "refused_with_message": dict(sorted(self.refused.items())),
            "skipped_with_message_in_batch": dict(sorted(self.skipped_in_batch.items())),
            "accepted_as_valid": dict(sorted(self.accepted.items())),
            "by_kind": dict(sorted(self.kinds.items())),
            "cli_runs": self.cli_runs,
            "tracebacks": self.tracebacks,
            "internal_errors": self.internal_errors,
            "failures": len(self.failures),
        }


TALLY = Tally()


def run_cli(argv: list[str]) -> Run:
    out, err = io.StringIO(), io.StringIO()
    rc: int | None = None
    exc = None
    argv = [str(a) for a in argv]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(argv)
        except SystemExit as e:  # argparse
            rc = e.code if isinstance(e.code, int) else 2
        except BaseException:  # noqa: BLE001 - exactly what this module hunts
            exc = traceback.format_exc()
    run = Run(argv, rc, out.getvalue(), err.getvalue(), exc)
    TALLY.check_run(run)
    return run


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One intra-op thread: on 2 shared cores, torch's default oversubscribes them badly."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    data = TALLY.to_json()
    previous = {}
    if COUNTS_FILE.is_file():
        with contextlib.suppress(ValueError, OSError):
            previous = json.loads(COUNTS_FILE.read_text())
    previous["bad_inputs"] = data
    COUNTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    COUNTS_FILE.write_text(json.dumps(previous, indent=2, sort_keys=True) + "\n")
    print("\nrobustness counts:", json.dumps(data, indent=2, sort_keys=True))


def _assert_no_failures(before: int) -> None:
    new = TALLY.failures[before:]
    assert not new, f"{len(new)} failure(s):\n\n" + "\n\n".join(new[:20])


# --------------------------------------------------------------------------- the bad-file corpus


@dataclass
class BadFile:
    path: Path
    kind: str
    must_refuse: bool  # False: "maybe fine" (a flip in pixel data), read_image decides
    dicom: bool = False  # claims to be DICOM (extension or magic): ingest-dicom material

    @functools.cached_property
    def refused(self) -> bool:
        """What read_image says: the oracle the CLI must agree with."""
        try:
            read_image(self.path)
        except ImageReadError:
            return True
        return False


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _png_bomb(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _tiff_bomb(w: int, h: int) -> bytes:
    entries = [
        (256, 4, 1, w),  # ImageWidth LONG
        (257, 4, 1, h),  # ImageLength
        (258, 3, 1, 8),  # BitsPerSample
        (259, 3, 1, 1),  # Compression none
        (262, 3, 1, 1),  # BlackIsZero
        (273, 4, 1, 8 + 2 + 12 * 9 + 4),  # StripOffsets
        (277, 3, 1, 1),  # SamplesPerPixel
        (278, 4, 1, h),  # RowsPerStrip
        (279, 4, 1, 16),  # StripByteCounts
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        packed = struct.pack("<HHI", tag, typ, count)
        packed += struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value)
        ifd += packed
    ifd += struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * 16


def _patch_jpeg_size(data: bytes, w: int, h: int) -> bytes:
    b = bytearray(data)
    for marker in (b"\xff\xc0", b"\xff\xc2", b"\xff\xc1"):
        i = b.find(marker)
        if i >= 0:
            b[i + 5 : i + 9] = struct.pack(">HH", h, w)
            return bytes(b)
    raise AssertionError("no SOF marker in the JPEG")


def _npy_bytes(arr: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def _npy_header_only(shape: tuple[int, ...], dtype: str, payload: bytes) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": dtype, "fortran_order": False, "shape": shape}
    )
    return np.lib.format.magic(1, 0) + buf.getvalue() + payload


_NON_IMAGES: dict[str, bytes] = {
    "text": b"this is not an image, just some text\n" * 5,
    "html": b"<!DOCTYPE html><html><body><img src='x.png'></body></html>\n",
    "csv": b"case_id,image,label\nc1,a.png,x\n",
    "json": b'{"image": "not really", "pixels": [1, 2, 3]}',
    "zip": b"PK\x03\x04" + b"\x00" * 60,
    "pdf": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n",
    "elf": b"\x7fELF\x02\x01\x01" + b"\x00" * 120,
    "gzip": b"\x1f\x8b\x08\x00" + b"\x00" * 40,
    "random": bytes(random.Random(7).randrange(256) for _ in range(2048)),
    "nul": b"\x00" * 1024,
    "dicm_junk": b"\x00" * 128
    + b"DICM"
    + bytes(random.Random(8).randrange(256) for _ in range(300)),
    "png_sig_only": b"\x89PNG\r\n\x1a\n",
    "jpeg_soi_only": b"\xff\xd8\xff\xe0",
    "bmp_junk": b"BM" + b"\xff" * 60,
    "gif_junk": b"GIF89a" + b"\x01" * 20,
    "webp_junk": b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x00" * 8,
    "tiff_junk": b"II*\x00" + b"\xff\xff\xff\x7f" + b"\x00" * 32,
    "npy_junk": b"\x93NUMPY\x01\x00" + b"\x00\x10{garbage" + b" " * 20,
    "utf16_text": "not an image at all".encode("utf-16"),
}


def _build_corpus(root: Path, phantom: Path, photo: Path) -> list[BadFile]:
    import pydicom
    from PIL import Image

    rng = random.Random(20240601)
    root.mkdir(parents=True, exist_ok=True)
    files: list[BadFile] = []
    counter = iter(range(10**6))

    def add(name: str, data: bytes, kind: str, must_refuse: bool, dicom: bool = False) -> Path:
        p = root / f"{next(counter):04d}_{name}"
        p.write_bytes(data)
        files.append(BadFile(p, kind, must_refuse, dicom))
        return p

    # one DICOM per transfer syntax the phantom writes
    by_ts: dict[str, Path] = {}
    for p in sorted(phantom.glob("images/*/*.dcm")):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        by_ts.setdefault(str(ds.file_meta.TransferSyntaxUID), p)
    assert len(by_ts) >= 3, by_ts
    for ts, p in sorted(by_ts.items()):
        data = p.read_bytes()
        tag = ts.split(".")[-1]
        for length in (1, 64, 131, 132, 200, 400, 800, len(data) // 2, len(data) - 100):
            add(f"trunc_{tag}_{length}.dcm", data[:length], "dicom-truncated", True, True)
        for k in range(16):
            b = bytearray(data)
            span = min(len(b), 1000) if k % 2 == 0 else len(b)  # header-heavy flips
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(span)] = rng.randrange(256)
            add(f"flip_{tag}_{k}.dcm", bytes(b), "dicom-byte-flipped", False, True)

    # PNG (8-bit gray from a mask, 8-bit RGB photo, 16-bit gray made here), JPEG, TIFF
    photo_png = sorted(photo.glob("images/*/*.png"))[0].read_bytes()
    gray_png = sorted(phantom.glob("masks/*.png"))[0].read_bytes()
    buf = io.BytesIO()
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(buf, "PNG")
    png16 = buf.getvalue()
    rgb = Image.open(io.BytesIO(photo_png)).convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    buf = io.BytesIO()
    rgb.save(buf, "TIFF")
    tiff = buf.getvalue()
    for name, data, ext in (
        ("photo", photo_png, ".png"),
        ("gray", gray_png, ".png"),
        ("gray16", png16, ".png"),
        ("jpeg", jpeg, ".jpg"),
        ("tiff", tiff, ".tif"),
    ):
        fmt = ext.lstrip(".")
        for length in (1, 8, 16, 33, 60, len(data) // 2, len(data) - 20):
            add(
                f"trunc_{name}_{length}{ext}",
                data[:length],
                f"{fmt}-truncated",
                length < len(data) // 2 + 1,
            )
        for k in range(8):
            b = bytearray(data)
            for _ in range(rng.randint(1, 3)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            add(f"flip_{name}_{k}{ext}", bytes(b), f"{fmt}-byte-flipped", False)

    # empty files
    for ext in (
        ".dcm",
        ".png",
        ".jpg",
        ".jpeg",
        ".tif",
        ".tiff",
        ".npy",
        ".bmp",
        ".gif",
        ".webp",
        "",
    ):
        add(f"empty{ext or '_noext'}", b"", "empty-file", True, ext == ".dcm")

    # non-images wearing image extensions
    for name, data in _NON_IMAGES.items():
        for ext in (".dcm", ".png", ".jpg", ".npy", ".tif"):
            add(
                f"notimage_{name}{ext}", data, "non-image-with-image-extension", True, ext == ".dcm"
            )

    # decompression bombs: tiny files declaring 50k x 50k pixels
    add("bomb_50k.png", _png_bomb(50_000, 50_000), "decompression-bomb", True)
    add("bomb_wide.png", _png_bomb(2_000_000, 60), "decompression-bomb", True)
    add("bomb_50k.jpg", _patch_jpeg_size(jpeg, 50_000, 50_000), "decompression-bomb", True)
    add("bomb_50k.tif", _tiff_bomb(50_000, 50_000), "decompression-bomb", True)
    gif = bytearray(b"GIF89a" + struct.pack("<HH", 50_000, 50_000) + b"\x00\x00\x00")
    gif += b"\x2c" + struct.pack("<HHHH", 0, 0, 50_000, 50_000) + b"\x00\x02\x02\x44\x01\x00\x3b"
    add("bomb_50k.gif", bytes(gif), "decompression-bomb", True)
    bmp = bytearray(b"BM" + struct.pack("<IHHI", 0, 0, 0, 54))
    bmp += struct.pack("<IiiHHIIiiII", 40, 50_000, 50_000, 1, 24, 0, 0, 2835, 2835, 0, 0)
    add("bomb_50k.bmp", bytes(bmp) + b"\x00" * 64, "decompression-bomb", True)
    ds = pydicom.dcmread(by_ts[min(by_ts)])
    ds.Rows, ds.Columns = 50_000, 50_000
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    add("bomb_50k.dcm", buf.getvalue(), "decompression-bomb", True, True)
    add(
        "bomb_50k.npy",
        _npy_header_only((50_000, 50_000), "<f4", b"\x00" * 16),
        "decompression-bomb",
        True,
    )

    # NPY: NaN / inf, pickled objects, bad shapes and dtypes
    base = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    for name, arr, refuse in (
        ("nan", np.where(base > 0.5, np.nan, base).astype(np.float32), True),
        ("posinf", np.where(base > 0.5, np.inf, base).astype(np.float32), True),
        ("neginf", np.where(base > 0.5, -np.inf, base).astype(np.float64), True),
        ("allnan", np.full((64, 64), np.nan, np.float32), True),
        ("one_nan_rgb", np.dstack([base, base, np.where(base == 0, np.nan, base)]), True),
        ("1d", base.ravel(), True),
        ("4d", base.reshape(1, 1, 64, 64), True),
        ("7chan", np.zeros((16, 16, 7), np.float32), True),
        ("zero_size", np.zeros((0, 0), np.float32), True),
        ("strings", np.array([["a", "b"], ["c", "d"]]), True),
        ("complex", base.astype(np.complex64), True),
        ("structured", np.zeros((8, 8), dtype=[("a", "<f4"), ("b", "<i4")]), True),
        ("big_endian_ok", base.astype(">f4"), False),
        ("fortran_ok", np.asfortranarray(base), False),
    ):
        add(f"npy_{name}.npy", _npy_bytes(arr), "npy-bad-values-or-shape", refuse)
    obj = np.empty((2, 2), dtype=object)
    obj[0, 0] = {"payload": "would run on unpickling"}
    add("npy_pickled_object.npy", _npy_bytes(obj, allow_pickle=True), "npy-pickled", True)
    good = _npy_bytes(base)
    add("npy_truncated.npy", good[: len(good) // 2], "npy-truncated", True)
    add(
        "npy_bad_header.npy",
        good[:10] + b"{'descr': <f4, shape: ((" + good[40:200],
        "npy-truncated",
        True,
    )

    # valid images under the wrong extension (content sniffing reads them; not an error)
    add("dicom_named.png", by_ts[min(by_ts)].read_bytes(), "misnamed-but-valid", False)
    add("png_named.dcm", photo_png, "misnamed-but-valid", False, True)
    add("jpeg_named.npy", jpeg, "misnamed-but-valid", False)

    # the same trouble under names with spaces and unicode
    udir = root / UNICODE_DIR
    udir.mkdir(parents=True)
    for bf in [f for f in files if f.must_refuse][::9]:
        q = udir / f"bad file #{bf.path.name[:4]} é ü 漢{bf.path.suffix}"
        shutil.copyfile(bf.path, q)
        files.append(BadFile(q, bf.kind + " (unicode name)", True, bf.dicom))
    return files


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, phantom_dir, photo_phantom_dir) -> list[BadFile]:
    root = tmp_path_factory.mktemp("bad_corpus")
    files = _build_corpus(root / "corpus", phantom_dir, photo_phantom_dir)
    # the corpus itself must be what it claims: every "must refuse" file is refused
    wrong = [f"{f.kind}: {f.path.name}" for f in files if f.must_refuse and not f.refused]
    assert not wrong, f"read_image accepted files the corpus calls broken: {wrong}"
    return files


@pytest.fixture(scope="module")
def good_images(phantom_dir) -> list[Path]:
    """Readable phantom DICOMs with their labels (one of each transfer syntax first)."""
    return sorted(phantom_dir.glob("images/*/*.dcm"))


def _mask_corpus(root: Path, phantom: Path) -> list[tuple[Path, str]]:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    out = []

    def png(name, arr):
        p = root / name
        Image.fromarray(arr).save(p)
        out.append((p, "mask-wrong-size"))

    png("mask_32x32.png", np.zeros((32, 32), np.uint8))
    png("mask_64x32.png", np.zeros((32, 64), np.uint8))
    png("mask_1x1.png", np.zeros((1, 1), np.uint8))
    png("mask_65x64.png", np.zeros((64, 65), np.uint8))
    p = root / "mask_wrong_size.npy"
    p.write_bytes(_npy_bytes(np.zeros((63, 64), np.float32)))
    out.append((p, "mask-wrong-size"))
    p = root / "mask_nan.npy"
    p.write_bytes(_npy_bytes(np.full((64, 64), np.nan, np.float32)))
    out.append((p, "mask-nan"))
    good = sorted(phantom.glob("masks/*.png"))[0].read_bytes()
    for name, data in (
        ("mask_truncated.png", good[: len(good) // 2]),
        ("mask_empty.png", b""),
        ("mask_text.png", b"not a mask\n"),
        ("mask_bomb.png", _png_bomb(50_000, 50_000)),
        ("mask_pickled.npy", _npy_bytes(np.empty((2, 2), object), allow_pickle=True)),
    ):
        p = root / name
        p.write_bytes(data)
        out.append((p, "mask-unreadable"))
    out.append((root / "mask_missing.png", "mask-missing"))
    return out


# --------------------------------------------------------------------------- validate: batch


_PROBLEM = re.compile(r"^row (\d+)(?:, column (\w+))?: (.*)$")


def _problems(text: str) -> dict[tuple[int, str | None], list[str]]:
    found: dict[tuple[int, str | None], list[str]] = defaultdict(list)
    for line in text.splitlines():
        m = _PROBLEM.match(line)
        if m:
            found[(int(m.group(1)), m.group(2))].append(m.group(3))
    return found


def test_validate_names_every_bad_file_and_mask(corpus, good_images, tmp_path):
    before = len(TALLY.failures)
    masks = _mask_corpus(tmp_path / "masks", good_images[0].parents[2])
    rows, expect = [], {}
    for i, bf in enumerate(corpus):
        rel = os.path.relpath(bf.path, tmp_path) if i % 2 else str(bf.path)  # relative and absolute
        rows.append({"case_id": f"c{i}", "image": rel, "label": "ab"[i % 2], "mask": ""})
        expect[len(rows)] = ("image", rel, bf)
    for j, (mp, kind) in enumerate(masks):
        img = good_images[j % len(good_images)]
        rows.append({"case_id": f"m{j}", "image": str(img), "label": "ab"[j % 2], "mask": str(mp)})
        expect[len(rows)] = ("mask", str(mp), kind)
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    run = run_cli(["validate", manifest])
    found = _problems(run.out)
    if run.rc != 1:
        TALLY.fail(f"validate: exit {run.rc} (expected 1) for a manifest of bad files")
    for r, (col, rel, what) in expect.items():
        cmd = "validate"
        TALLY.tried[cmd] += 1
        if col == "image":
            TALLY.kinds[what.kind] += 1
            refused = what.refused
            msgs = found.get((r, "image"), [])
            if refused:
                if not msgs or not msgs[0].startswith(f"{rel}: "):
                    TALLY.fail(
                        f"validate: row {r} ({what.kind} {rel}) not reported with its file: {msgs}"
                    )
                else:
                    TALLY.refused[cmd] += 1
            else:
                if msgs:
                    TALLY.fail(f"validate: row {r} {rel} is readable but reported: {msgs}")
                TALLY.accepted[cmd] += 1
        else:
            TALLY.kinds[what] += 1
            msgs = found.get((r, "mask"), [])
            if not msgs or not msgs[0].startswith(f"{rel}: "):
                TALLY.fail(f"validate: row {r} bad mask {rel} ({what}) not reported: {msgs}")
            else:
                TALLY.refused[cmd] += 1
                if what == "mask-wrong-size" and "but the image is 64x64" not in msgs[0]:
                    TALLY.fail(f"validate: wrong-size mask message lacks both sizes: {msgs[0]}")
    _assert_no_failures(before)


# --------------------------------------------------------------------------- validate: hypothesis


@dataclass
class _Pool:
    root: Path  # where manifests are written (one sub-folder each)
    good: list[Path]
    good_unicode: Path
    bad: list[Path]
    mask_good: Path
    mask_wrong: Path
    mask_corrupt: Path
    folder: Path
    n: int = 0


@pytest.fixture(scope="module")
def pool(tmp_path_factory, corpus, good_images, phantom_dir) -> _Pool:
    root = tmp_path_factory.mktemp("fuzz_manifests")
    files = tmp_path_factory.mktemp("fuzz_files")
    udir = files / UNICODE_DIR
    udir.mkdir(parents=True)
    uni = udir / "scan é 漢字 #1.dcm"
    shutil.copyfile(good_images[0], uni)
    masks = _mask_corpus(files / "masks", phantom_dir)
    good_mask = sorted(phantom_dir.glob("masks/*.png"))[0]
    bad = [f.path for f in corpus if f.must_refuse][::3]
    return _Pool(
        root,
        good_images[:12],
        uni,
        bad,
        good_mask,
        next(p for p, k in masks if k == "mask-wrong-size"),
        next(p for p, k in masks if k == "mask-unreadable"),
        files,
    )


_IMAGE_CHOICES = (
    "good_abs",
    "good_rel",
    "good_dot",
    "good_unicode",
    "bad",
    "missing",
    "empty",
    "directory",
    "huge",
)
_MASK_CHOICES = ("none", "none", "good", "wrong_size", "corrupt", "missing")
_SPLIT_CHOICES = ("train", "val", "test", "", "TRAIN", "validation", "bogus", "Test ")
_ENCODINGS = ("utf-8", "utf-8-sig", "utf-16", "latin-1", "cp1252", "parquet", "tsv")
_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\x00"),
    min_size=0,
    max_size=12,
)


@st.composite
def _manifest_specs(draw):
    # one in eight is a clean manifest: validate must then say OK (no false alarms)
    clean = draw(st.integers(0, 7)) == 0
    n = draw(st.integers(4, 7) if clean else st.integers(1, 7))
    rows = []
    for i in range(n):
        if clean:
            rows.append(
                {
                    "cid": "unique",
                    "image": draw(st.sampled_from(_IMAGE_CHOICES[:4])),
                    "label": "nodule" if i < n // 2 else "mass",
                    "split": draw(st.sampled_from(_SPLIT_CHOICES[:6] + ("Test ",))),
                    "same_patient_as_prev": False,
                    "mask": draw(st.sampled_from(("none", "good"))),
                    "site": draw(_TEXT),
                    "ragged": 0,
                }
            )
            continue
        cid_kind = draw(st.sampled_from(("unique", "unique", "unique", "dup", "empty")))
        rows.append(
            {
                "cid": cid_kind,
                "image": draw(st.sampled_from(_IMAGE_CHOICES)),
                "label": draw(
                    st.sampled_from(("nodule", "mass", "nodule", "mass", "", "huge", "ünï 漢"))
                ),
                "split": draw(st.sampled_from(_SPLIT_CHOICES)),
                "same_patient_as_prev": i > 0 and draw(st.booleans()) and draw(st.booleans()),
                "mask": draw(st.sampled_from(_MASK_CHOICES)),
                "site": draw(_TEXT),
                "ragged": draw(st.sampled_from((0,) * 12 + (1, -1))),
            }
        )
    drop = draw(
        st.sets(
            st.sampled_from(("case_id", "image", "label", "split", "patient_id", "mask")),
            max_size=2,
        )
    )
    if clean or draw(st.integers(0, 3)) > 0:
        drop = {c for c in drop if c not in ("case_id", "image", "label")}
    encodings = ("utf-8", "utf-8-sig", "utf-16", "parquet", "tsv") if clean else _ENCODINGS
    return {
        "rows": rows,
        "drop": sorted(drop),
        "dup_column": not clean and draw(st.integers(0, 15)) == 0,
        "encoding": draw(st.sampled_from(encodings)),
        "nul": "none" if clean else draw(st.sampled_from(("none",) * 8 + ("head", "tail"))),
        "crlf": draw(st.booleans()),
        "quote_all": draw(st.booleans()),
        "huge_field": draw(st.integers(0, 6)) == 0,
        "shuffle": draw(st.randoms(use_true_random=False)),
    }


def _norm_split(s: str) -> str:
    v = s.strip().lower()
    return {
        "training": "train",
        "valid": "val",
        "validation": "val",
        "dev": "val",
        "testing": "test",
    }.get(v, v) or "train"


def _materialise(spec: dict, pool: _Pool) -> tuple[Path, dict]:
    """Write the manifest a spec describes; return it and the problems validate must report."""
    pool.n += 1
    d = pool.root / f"m{pool.n:04d}"
    d.mkdir()
    rng = spec["shuffle"]
    rows, expected = [], set()
    whole: str | None = None  # expected whole-file problem
    cols = ["case_id", "image", "label", "split", "patient_id", "mask", "site"]
    cols = [c for c in cols if c not in spec["drop"]]
    rng.shuffle(cols)
    used_ids: list[str] = []
    patient = 0
    for i, r in enumerate(spec["rows"], start=1):
        if r["cid"] == "empty":
            cid = ""
        elif r["cid"] == "dup" and used_ids:
            cid = used_ids[0]
        else:
            cid = f"case {i} ü" if i % 2 else f"c{i}"
        used_ids.append(cid)
        good_image = False
        kind = r["image"]
        if kind.startswith("good"):
            src = pool.good_unicode if kind == "good_unicode" else pool.good[i % len(pool.good)]
            if kind == "good_abs":
                image = str(src)
            elif kind == "good_dot":
                image = "./" + os.path.relpath(src, d)
            else:
                image = os.path.relpath(src, d)
            good_image = True
        elif kind == "bad":
            image = os.path.relpath(pool.bad[rng.randrange(len(pool.bad))], d)
        elif kind == "missing":
            image = f"no such dir/missing {i} é.dcm"
        elif kind == "empty":
            image = ""
        elif kind == "directory":
            image = os.path.relpath(pool.folder, d)
        else:  # huge
            image = "x" * 5000 + ".dcm"
        label = {"huge": "L" * 70_000}.get(r["label"], r["label"])
        if not r["same_patient_as_prev"]:
            patient += 1
        mask = {
            "none": "",
            "good": str(pool.mask_good),
            "wrong_size": os.path.relpath(pool.mask_wrong, d),
            "corrupt": str(pool.mask_corrupt),
            "missing": "masks/nope.png",
        }[r["mask"]]
        rows.append(
            {
                "case_id": cid,
                "image": image,
                "label": label,
                "split": r["split"],
                "patient_id": f"p{patient}",
                "mask": mask,
                "site": r["site"],
                "_good_image": good_image,
                "_ragged": r["ragged"],
            }
        )
    has = set(cols)
    for row, r in zip(rows, spec["rows"], strict=True):
        row["_mask_kind"] = r["mask"]
        if row["_ragged"] == -1 and len(cols) > 1:
            # the row comes up one field short: its last column reads as empty
            row[cols[-1]] = ""
            row["_good_image"] = row["_good_image"] and cols[-1] != "image"
            if cols[-1] == "mask":
                row["_mask_kind"] = "none"
        elif row["_ragged"] == -1:
            row["_ragged"] = 0
    # expected row problems, mirroring the schema (DESIGN.md)
    if "case_id" in has:
        first: dict[str, int] = {}
        for i, row in enumerate(rows, start=1):
            if not row["case_id"]:
                expected.add((i, "case_id"))
            elif row["case_id"] in first:
                expected.add((i, "case_id"))
            else:
                first[row["case_id"]] = i
    if "label" in has:
        counts = Counter(row["label"] for row in rows if row["label"])
        for lab, n in counts.items():
            if n < 2:
                expected.add(
                    (next(i for i, row in enumerate(rows, 1) if row["label"] == lab), "label")
                )
        for i, row in enumerate(rows, start=1):
            if not row["label"]:
                expected.add((i, "label"))
    splits = [_norm_split(row["split"]) if "split" in has else "train" for row in rows]
    if "split" in has:
        for i, s in enumerate(splits, start=1):
            if s not in ("train", "val", "test"):
                expected.add((i, "split"))
    if "patient_id" in has:
        by_p: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        for i, (row, s) in enumerate(zip(rows, splits, strict=True), start=1):
            if row["patient_id"] and s in ("train", "val", "test"):
                by_p[row["patient_id"]][s].append(i)
        for per in by_p.values():
            if len(per) > 1:
                ordered = sorted(per.items(), key=lambda kv: (-len(kv[1]), kv[1][0]))
                for _s, rs in ordered[1:]:
                    expected.update((r, "patient_id") for r in rs)
    if "image" in has:
        for i, row in enumerate(rows, start=1):
            if not row["_good_image"]:
                expected.add((i, "image"))
            if "mask" in has and row["mask"]:
                m = row["_mask_kind"]
                if m in ("corrupt", "missing") or (m == "wrong_size" and row["_good_image"]):
                    expected.add((i, "mask"))
    elif "mask" in has:
        pass  # masks are checked alongside images only
    # serialise
    header = list(cols)
    if spec["dup_column"] and cols:
        header.append(cols[0])
        whole = "duplicate column"
    records = []
    for row in rows:
        rec = [row[c] for c in cols] + ([row[cols[0]]] if spec["dup_column"] and cols else [])
        records.append(rec)
    if spec["huge_field"] and records:
        records[-1] = [*records[-1]]
        if "site" in cols:
            records[-1][cols.index("site")] = "S" * 200_000
    enc = spec["encoding"]
    if enc == "parquet":
        path = d / "manifest.parquet"
        _write_parquet(path, header, records)
        ragged = []
    else:
        sep = "\t" if enc == "tsv" else ","
        path = d / ("manifest.tsv" if enc == "tsv" else "manifest.csv")
        buf = io.StringIO()
        w = csv.writer(
            buf,
            delimiter=sep,
            lineterminator="\r\n" if spec["crlf"] else "\n",
            quoting=csv.QUOTE_ALL if spec["quote_all"] else csv.QUOTE_MINIMAL,
        )
        w.writerow(header)
        ragged = []
        for i, (rec, row) in enumerate(zip(records, rows, strict=True), start=1):
            if row["_ragged"] == 1:
                rec = [*rec, "extra field"]
                ragged.append(i)
            elif row["_ragged"] == -1:
                rec = rec[: len(cols) - 1]  # one field short
                ragged.append(i)
            w.writerow(rec)
        text = buf.getvalue()
        if enc in ("utf-8", "tsv"):
            data = text.encode("utf-8")
        elif enc == "utf-8-sig":
            data = text.encode("utf-8-sig")
        elif enc == "utf-16":
            data = text.encode("utf-16")  # with a byte-order mark
        else:
            data = text.encode(enc, errors="replace")
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                whole = whole or "not UTF-8"
        if enc == "utf-16":
            pass  # NUL bytes are part of UTF-16 text
        elif spec["nul"] == "head":
            data = data[:5] + b"\x00" + data[5:]
            whole = "binary"
        elif spec["nul"] == "tail":
            data = data + b"x\x00\n" if len(data) <= 8192 else data
            if len(data) <= 8192 + 3:
                whole = "binary"
        path.write_bytes(data)
    meta = {"expected": expected, "whole": whole, "ragged": ragged, "rows": len(rows), "has": has}
    return path, meta


def _write_parquet(path: Path, header: list[str], records: list[list[str]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = [pa.array([r[j] for r in records], pa.string()) for j in range(len(header))]
    pq.write_table(pa.Table.from_arrays(arrays, names=header), path)


@settings(
    max_examples=int(os.environ.get("CASEBASE_FUZZ_EXAMPLES", "300")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(spec=_manifest_specs())
def test_validate_fuzzed_manifests(pool, spec):
    before = len(TALLY.failures)
    path, meta = _materialise(spec, pool)
    run = run_cli(["validate", path])
    TALLY.tried["validate (hypothesis manifests)"] += 1
    if meta["whole"]:
        TALLY.kinds[f"manifest-unusable-file ({meta['whole']})"] += 1
    else:
        TALLY.kinds[f"manifest-row-problems ({spec['encoding']})"] += 1
    text = run.out
    found = _problems(text)
    where = f"manifest {path} (spec {spec['encoding']}, drop {spec['drop']}, nul {spec['nul']})"
    if meta["whole"]:
        # the file as a whole is unusable: one line naming the manifest and why
        if run.rc != 1 or f"manifest: {path}" not in text:
            TALLY.fail(
                f"validate: {where}: expected a whole-file problem ({meta['whole']}), "
                f"got exit {run.rc}: {text[-800:]}"
            )
        else:
            TALLY.refused["validate (hypothesis manifests)"] += 1
        _assert_no_failures(before)
        return
    expected = set(meta["expected"])
    for col in ("case_id", "image", "label"):
        if col not in meta["has"]:
            if f"column {col}: required column is missing" not in text:
                TALLY.fail(f"validate: {where}: missing column {col} not reported: {text[-800:]}")
    for r in meta["ragged"]:
        if (r, None) not in found:
            TALLY.fail(f"validate: {where}: ragged row {r} not reported: {text[-800:]}")
    got = {k for k in found if k[1] is not None}
    if got != expected:
        TALLY.fail(
            f"validate: {where}: reported {sorted(got, key=str)} but the planted problems are "
            f"{sorted(expected, key=str)}:\n{text[-1500:]}"
        )
    bad = bool(expected or meta["ragged"] or not {"case_id", "image", "label"} <= meta["has"])
    if run.rc != (1 if bad else 0):
        TALLY.fail(f"validate: {where}: exit {run.rc}, expected {1 if bad else 0}:\n{text[-800:]}")
    if bad:
        TALLY.refused["validate (hypothesis manifests)"] += 1
    else:
        TALLY.accepted["validate (hypothesis manifests)"] += 1
    _assert_no_failures(before)


# --------------------------------------------------------------------------- ingest-dicom


def test_ingest_dicom_skips_each_bad_file_by_name(corpus, good_images, tmp_path):
    before = len(TALLY.failures)
    tree = tmp_path / "tree"
    bad = [f for f in corpus if f.dicom]
    corpus_root = corpus[0].path.parent
    copies: dict[Path, BadFile] = {}
    for f in bad:
        dst = tree / "broken" / f.path.relative_to(corpus_root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f.path, dst)
        copies[dst] = f
    goods = []
    for i, g in enumerate(good_images[:6]):
        dst = tree / ("nodule" if i % 2 else "mass") / f"good {i}.dcm"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(g, dst)
        goods.append(dst)
    out = tmp_path / "out" / "manifest.csv"
    run = run_cli(["ingest-dicom", tree, "--out", out, "--label-from", "folder"])
    if run.rc != 0:
        TALLY.fail(f"ingest-dicom: exit {run.rc} with good files present: {run.text[-1500:]}")
    df = pd.read_csv(out, dtype=str, keep_default_na=False) if out.is_file() else pd.DataFrame()
    listed = {str((out.parent / p).resolve()) for p in df.get("image", [])}
    skipped_lines = [ln for ln in run.err.splitlines() if ln.startswith("skipped: ")]
    for copy, f in copies.items():
        TALLY.tried["ingest-dicom"] += 1
        TALLY.kinds[f.kind] += 1
        if f.refused:
            named = [ln for ln in skipped_lines if ln.startswith(f"skipped: {copy}: ")]
            if not named:
                TALLY.fail(f"ingest-dicom: bad file {copy} ({f.kind}) not skipped by name")
            else:
                TALLY.skipped_in_batch["ingest-dicom"] += 1
            if str(copy.resolve()) in listed:
                TALLY.fail(f"ingest-dicom: unreadable {copy} was written to the manifest")
        else:
            TALLY.accepted["ingest-dicom"] += 1
            if str(copy.resolve()) not in listed:
                TALLY.fail(f"ingest-dicom: readable {copy} ({f.kind}) missing from the manifest")
    for g in goods:
        if str(g.resolve()) not in listed:
            TALLY.fail(f"ingest-dicom: good file {g} missing from the manifest")
    if f"skipped {sum(f.refused for f in bad)}" not in run.out:
        TALLY.fail(f"ingest-dicom: summary does not count the skipped files: {run.out[-500:]}")

    # only bad files: the run fails with one line that says so
    only_bad = tmp_path / "only_bad"
    shutil.copytree(tree / "broken", only_bad)
    for copy, f in copies.items():
        if not f.refused:
            (only_bad / copy.relative_to(tree / "broken")).unlink()
    run = run_cli(
        ["ingest-dicom", only_bad, "--out", tmp_path / "none.csv", "--label-from", "folder"]
    )
    TALLY.tried["ingest-dicom"] += 1
    if run.rc != 2 or "no decodable DICOM image found" not in run.err:
        TALLY.fail(f"ingest-dicom: a tree of only bad files gave exit {run.rc}: {run.err[-500:]}")
    else:
        TALLY.refused["ingest-dicom"] += 1
    for argv, needle in (
        (["ingest-dicom", tmp_path / "nowhere", "--out", tmp_path / "x.csv"], "folder not found"),
        (["ingest-dicom", goods[0], "--out", tmp_path / "x.csv"], "not a folder"),
        (["ingest-dicom", tree, "--out", tmp_path / "x.txt"], "must end in .csv or .parquet"),
        (
            ["ingest-dicom", tree, "--out", tmp_path / "x.csv", "--label-from", "PatientName"],
            "refusing to use an identifying",
        ),
        (
            ["ingest-dicom", tree, "--out", tmp_path / "x.csv", "--label-from", "NoSuchKeyword"],
            "not 'folder', 'csv:PATH' or a DICOM keyword",
        ),
        (
            [
                "ingest-dicom",
                tree,
                "--out",
                tmp_path / "x.csv",
                "--label-from",
                "csv:" + str(tmp_path / "no.csv"),
            ],
            "not found",
        ),
        (
            [
                "ingest-dicom",
                tree,
                "--out",
                tmp_path / "x.csv",
                "--strict",
                "--label-from",
                "folder",
            ],
            "--strict",
        ),
        (["ingest-dicom", tree, "--out", tmp_path / "x.csv"], "needs --label-from"),
    ):
        run = run_cli(argv)
        TALLY.tried["ingest-dicom"] += 1
        if run.rc != 2 or needle not in run.err:
            TALLY.fail(
                f"ingest-dicom {argv[1:]}: exit {run.rc}, expected 2 with {needle!r}: {run.err[-500:]}"
            )
        else:
            TALLY.refused["ingest-dicom"] += 1
    _assert_no_failures(before)


# --------------------------------------------------------------------------- index build


def test_index_build_skips_each_bad_file_and_keeps_exactly_the_good(
    corpus, good_images, tiny_index, tmp_path
):
    before = len(TALLY.failures)
    model_dir = tiny_index / "model"
    batches = [corpus[0::2], corpus[1::2]]
    for b, batch in enumerate(batches):
        rows = []
        for i, f in enumerate(batch):
            rows.append(
                {
                    "case_id": f"bad{b}_{i}",
                    "image": str(f.path),
                    "label": "ab"[i % 2],
                    "split": "train",
                }
            )
        for i, g in enumerate(good_images[:4]):
            rows.append(
                {"case_id": f"good{b}_{i}", "image": str(g), "label": "ab"[i % 2], "split": "val"}
            )
        manifest = tmp_path / f"batch{b}.csv"
        pd.DataFrame(rows).to_csv(manifest, index=False)
        out = tmp_path / f"index{b}"
        run = run_cli(
            [
                "index",
                "build",
                model_dir,
                manifest,
                "--out",
                out,
                "--device",
                "cpu",
                "--batch-size",
                "32",
            ]
        )
        if run.rc != 0:
            TALLY.fail(f"index build: batch {b} exit {run.rc}: {run.text[-1500:]}")
            continue
        skipped = [ln for ln in run.text.splitlines() if ln.startswith("skipped: ")]
        from index.case_store import read_cases

        held = set(read_cases(out / "cases.parquet")["case_id"])
        want = {r["case_id"] for r in rows[len(batch) :]}
        for i, f in enumerate(batch):
            TALLY.tried["index build"] += 1
            TALLY.kinds[f.kind] += 1
            cid = f"bad{b}_{i}"
            if f.refused:
                if not any(ln.startswith(f"skipped: {f.path}: ") for ln in skipped):
                    TALLY.fail(f"index build: {f.path} ({f.kind}) not skipped by name")
                else:
                    TALLY.skipped_in_batch["index build"] += 1
            else:
                TALLY.accepted["index build"] += 1
                want.add(cid)
        if held != want:
            TALLY.fail(
                f"index build: batch {b} bundle holds {len(held)} cases; extra "
                f"{sorted(held - want)[:10]}, missing {sorted(want - held)[:10]}"
            )
        n_refused = sum(f.refused for f in batch)
        if f"skipped {n_refused} " not in run.out:
            TALLY.fail(f"index build: summary does not say 'skipped {n_refused}': {run.out[-300:]}")
    _assert_no_failures(before)


def _bad_manifests(root: Path, good: list[Path]) -> list[tuple[Path, str]]:
    """Whole-manifest problems (for index build / train): path and what the message must say."""
    root.mkdir(parents=True, exist_ok=True)
    out = []
    ok_rows = "".join(f"c{i},{g},{'ab'[i % 2]},train\n" for i, g in enumerate(good[:4]))

    def w(name: str, data: bytes, needle: str):
        p = root / name
        p.write_bytes(data)
        out.append((p, needle))

    w("empty.csv", b"", "manifest is empty")
    w("blank.csv", b"\n\n  \n", "manifest is empty")
    w(
        "no_image_col.csv",
        ("case_id,label,split\n" + "c1,a,train\n").encode(),
        "missing required column(s): image",
    )
    w("no_cols.csv", b"a,b,c\n1,2,3\n", "missing required column(s): case_id, image, label")
    w(
        "latin1.csv",
        ("case_id,image,label,split\n" + ok_rows + "cé,x.dcm,ü,train\n").encode("latin-1"),
        "not UTF-8",
    )
    w("nul.csv", b"case_id,image\x00,label\n", "binary content")
    w("ragged.csv", ("case_id,image,label,split\n" + ok_rows + "c9,x\n").encode(), "malformed CSV")
    w("dup_col.csv", ("case_id,image,label,label\n" + "c1,x,a,b\n").encode(), "duplicate column")
    w("quote.csv", (b'case_id,image,label\nc1,"unterminated,a\n'), "malformed CSV")
    w("header_only.csv", b"case_id,image,label,split\n", "no cases in split")
    w("garbage.parquet", b"PAR1" + b"\x00" * 64, "cannot read as Parquet")
    w(
        "only_test.csv",
        ("case_id,image,label,split\n" + ok_rows.replace("train", "test")).encode(),
        "no cases in split",
    )
    out.append((root / "missing.csv", "manifest not found"))
    (root / "a_folder.csv").mkdir()
    out.append((root / "a_folder.csv", "is a directory"))
    return out


def test_index_build_and_train_refuse_bad_manifests_by_name(good_images, tiny_index, tmp_path):
    before = len(TALLY.failures)
    for path, needle in _bad_manifests(tmp_path / "manifests", good_images):
        for cmd, argv in (
            (
                "index build",
                ["index", "build", tiny_index / "model", path, "--out", tmp_path / "ix"],
            ),
            (
                "train",
                ["train", path, "--out", tmp_path / "model", "--epochs", "1", "--device", "cpu"],
            ),
        ):
            if cmd == "train" and needle == "no cases in split":
                needle = "no train or val cases"
            run = run_cli(argv)
            TALLY.tried[cmd] += 1
            TALLY.kinds["manifest-unusable"] += 1
            if run.rc != 2 or needle not in run.err or str(path) not in run.err:
                TALLY.fail(
                    f"{cmd} {path.name}: exit {run.rc}, expected 2 naming the file and "
                    f"{needle!r}: {run.err[-600:]}"
                )
            else:
                TALLY.refused[cmd] += 1
            assert not (tmp_path / "ix").exists() and not (tmp_path / "model").exists()
    # a model folder that is not one
    for model_dir, needle in ((tmp_path / "nomodel", "missing"), (tiny_index, "missing")):
        run = run_cli(
            [
                "index",
                "build",
                model_dir,
                tmp_path / "manifests" / "header_only.csv",
                "--out",
                tmp_path / "ix",
            ]
        )
        TALLY.tried["index build"] += 1
        if run.rc != 2 or needle not in run.err:
            TALLY.fail(f"index build with model {model_dir}: exit {run.rc}: {run.err[-400:]}")
        else:
            TALLY.refused["index build"] += 1
    _assert_no_failures(before)


# --------------------------------------------------------------------------- query


def test_query_refuses_each_bad_file_by_name(corpus, tiny_index, tmp_path, monkeypatch):
    before = len(TALLY.failures)
    # Load (and verify) the bundle once, not once per bad file: what is under test here is
    # the image path; loading is tested in tests/index/test_integrity.py.
    from retrieval.service.retriever import CaseRetriever

    real_load = CaseRetriever.load
    loaded: dict = {}

    def load_once(index_dir, device="auto", verify=True):
        if Path(index_dir) != tiny_index:
            return real_load(index_dir, device=device, verify=verify)
        if "r" not in loaded:
            loaded["r"] = real_load(index_dir, device=device, verify=verify)
        return loaded["r"]

    monkeypatch.setattr(CaseRetriever, "load", staticmethod(load_once))
    for f in corpus:
        run = run_cli(["query", tiny_index, f.path, "-k", "2", "--device", "cpu"])
        TALLY.tried["query"] += 1
        TALLY.kinds[f.kind] += 1
        if f.refused:
            if run.rc != 2 or not run.err.startswith(f"casebase query: error: {f.path}: "):
                TALLY.fail(f"query {f.path.name} ({f.kind}): exit {run.rc}: {run.text[-600:]}")
            elif run.err.count("\n") != 1:
                TALLY.fail(f"query {f.path.name}: more than one line: {run.err!r}")
            else:
                TALLY.refused["query"] += 1
        else:
            if run.rc != 0:
                TALLY.fail(
                    f"query {f.path.name} ({f.kind}) is readable, exit {run.rc}: {run.text[-600:]}"
                )
            TALLY.accepted["query"] += 1
    good = next(f.path for f in corpus if f.kind == "misnamed-but-valid")
    for argv, needle in (
        (["query", tiny_index, tmp_path / "nope.dcm"], "file not found"),
        (["query", tiny_index, tmp_path], "is a directory"),
        (["query", tmp_path / "noindex", good], "no such index folder"),
        (["query", good, good], "no such index folder"),
        (["query", tiny_index, good, "-k", "0"], "-k must be at least 1"),
        (["query", tiny_index, good, "--explain", "gradcam,bogus"], "bogus"),
        (["query", tiny_index, good, "--filter", "nonsense"], "ATTR=VALUE"),
        (["query", tiny_index, good, "--filter", "nosuchattr=1"], "nosuchattr"),
    ):
        run = run_cli([*argv, "--device", "cpu"])
        TALLY.tried["query"] += 1
        TALLY.kinds["query-bad-argument"] += 1
        if run.rc != 2 or needle not in run.err:
            TALLY.fail(
                f"query {argv[1:]}: exit {run.rc}, expected 2 with {needle!r}: {run.err[-500:]}"
            )
        else:
            TALLY.refused["query"] += 1
    _assert_no_failures(before)


def test_totals():
    """At least 1,000 bad inputs across the commands; zero tracebacks and internal errors."""
    data = TALLY.to_json()
    if set(data["by_command"]) < {"validate", "ingest-dicom", "index build", "query"}:
        pytest.skip("the totals need the whole module to run")
    assert data["tracebacks"] == 0 and data["internal_errors"] == 0, TALLY.failures[:10]
    if os.environ.get("CASEBASE_FUZZ_EXAMPLES") is None:
        assert data["bad_inputs_tried"] >= 1000, data
        # and at least 1,000 of them really were bad: refused, or skipped in a batch, by name
        assert data["refused_or_skipped_total"] >= 1000, data
