"""Manifests: the table of labelled cases every casebase command starts from.

Schema (DESIGN.md): ``case_id``, ``image``, ``label`` are required; ``split``
(train / val / test, default train), ``patient_id`` and ``mask`` are optional;
every other column is a case *attribute* (site, sex, age, scanner, ...).

:func:`load_manifest` reads a CSV or Parquet file with every value as a string
(missing values become ``""``) and raises :class:`ManifestError` when the file
cannot be used at all; text values (not paths) come back in Unicode NFC and raw
patient ids as keyed-hash pseudonyms (:mod:`retrieval.data.privacy`).
:func:`validate_manifest` reports *every* problem, each
with its 1-based data row (the first case is row 1) and column, and opens
every image and mask to prove it can be read.
"""

from __future__ import annotations

import csv
import io
import math
import os
import unicodedata
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from retrieval.errors import ImageReadError, ManifestError

__all__ = [
    "CORE_COLUMNS",
    "REQUIRED_COLUMNS",
    "SPLITS",
    "Manifest",
    "Problem",
    "count_dimensions",
    "load_manifest",
    "mixed_dimensions_note",
    "read_table",
    "summarize",
    "validate_manifest",
    "write_manifest",
]

REQUIRED_COLUMNS = ("case_id", "image", "label")
CORE_COLUMNS = ("case_id", "image", "label", "split", "patient_id", "mask")
SPLITS = ("train", "val", "test")
_SPLIT_SYNONYMS = {
    "training": "train",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "testing": "test",
}
_MAX_BYTES_SNIFF = 8192


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest. ``row`` is the 1-based data row (None: whole file)."""

    row: int | None
    column: str | None
    message: str

    def __str__(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.column is not None:
            where.append(f"column {self.column}")
        return f"{', '.join(where) or 'manifest'}: {self.message}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Manifest:
    """A loaded manifest. ``df`` holds strings only; its index is the 0-based data row."""

    df: pd.DataFrame
    path: Path
    root: Path
    ids_hashed_on_read: bool = False  # raw patient ids were pseudonymised by load_manifest

    def resolve(self, rel: str | os.PathLike) -> Path:
        """The path of an ``image`` / ``mask`` entry: absolute as is, else under ``root``."""
        text = os.fspath(rel).strip()
        p = Path(text).expanduser()
        if not p.is_absolute() and "\\" in text and os.sep != "\\":
            alt = self.root / text.replace("\\", "/")
            if not (self.root / p).exists() and alt.exists():
                return alt
        return p if p.is_absolute() else self.root / p

    @property
    def attribute_columns(self) -> list[str]:
        return [c for c in self.df.columns if c not in CORE_COLUMNS]

    @property
    def labels(self) -> list[str]:
        return sorted(set(self.df["label"]) - {""})

    def select(self, splits: list[str] | tuple[str, ...] | str | None = None) -> pd.DataFrame:
        """The rows whose split is in ``splits`` (all rows when None), index kept."""
        if splits is None:
            return self.df
        if isinstance(splits, str):
            splits = [s for s in splits.split(",") if s.strip()]
        wanted = {_norm_split(s) for s in splits}
        return self.df[self.df["split"].isin(wanted)]

    def __len__(self) -> int:
        return len(self.df)


def _norm_split(value: str) -> str:
    v = str(value).strip().lower()
    return _SPLIT_SYNONYMS.get(v, v) or "train"


def _to_str(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return repr(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    try:
        if pd.isna(value):
            return ""
    except (TypeError, ValueError):
        pass
    return str(value)


def read_table(path: str | os.PathLike, *, keep_ragged: bool = False) -> pd.DataFrame:
    """Read a CSV / Parquet manifest as strings; ManifestError with the reason on failure.

    Rows whose field count differs from the header's are an error, unless
    ``keep_ragged`` (then they are padded / cut and listed in ``df.attrs["ragged_rows"]``).
    Values are stripped and, except the ``image`` / ``mask`` paths, in Unicode NFC.
    """
    p = Path(path)
    if not p.exists():
        raise ManifestError(f"{p}: manifest not found")
    if p.is_dir():
        raise ManifestError(f"{p}: is a directory, not a manifest file")
    try:
        with open(p, "rb") as fh:
            head = fh.read(_MAX_BYTES_SNIFF)
    except OSError as err:
        raise ManifestError(f"{p}: cannot read ({err.strerror or err})") from None
    if not head:
        raise ManifestError(f"{p}: manifest is empty")
    if head[:4] == b"PAR1" or p.suffix.lower() in (".parquet", ".pq"):
        return _read_parquet(p)
    # a byte-order mark proves the encoding (Excel's "Unicode text" is UTF-16 with one)
    if head[:4] in (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff"):
        encoding = "utf-32"
    elif head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        encoding = "utf-16"
    elif b"\x00" in head:
        raise ManifestError(f"{p}: not a CSV or Parquet file (binary content)")
    else:
        encoding = "utf-8-sig"
    try:
        text = p.read_text(encoding=encoding)
    except UnicodeDecodeError as err:
        raise ManifestError(
            f"{p}: not {'UTF-8' if encoding == 'utf-8-sig' else encoding.upper()} text "
            f"(byte 0x{err.object[err.start]:02x} at offset {err.start}); "
            "save the manifest as UTF-8"
        ) from None
    except OSError as err:
        raise ManifestError(f"{p}: cannot read ({err.strerror or err})") from None
    if not text.strip():
        raise ManifestError(f"{p}: manifest is empty")
    sep = "\t" if p.suffix.lower() in (".tsv", ".tab") else ","
    header, records, ragged, df_width = _parse_csv(text, sep, p)
    if ragged and not keep_ragged:
        first = ragged[0]
        raise ManifestError(
            f"{p}: malformed CSV: data row {first[0]} has {first[1]} fields but the header has "
            f"{df_width}" + (f" ({len(ragged)} such rows)" if len(ragged) > 1 else "")
        )
    df = _nfc_values(pd.DataFrame(records, columns=header, dtype=object))
    if ragged:
        df.attrs["ragged_rows"] = [(r, n, df_width) for r, n in ragged]
    return df


# paths name files as the file system spells them (macOS keeps NFD names): never normalised
_PATH_COLUMNS = ("image", "mask")


def _nfc_values(df: pd.DataFrame) -> pd.DataFrame:
    """Every value but the paths in Unicode NFC.

    Why: "névus" typed on one keyboard (NFC, one code point for é) and pasted from another
    source (NFD, e + combining accent) look identical but compare unequal, so one label
    became two classes (and one site two groups) in validate, train, index, eval and audit.
    """
    for col in df.columns:
        if col in _PATH_COLUMNS:
            continue
        values = df[col].tolist()
        if all(v.isascii() or unicodedata.is_normalized("NFC", v) for v in values):
            continue
        df[col] = [unicodedata.normalize("NFC", v) for v in values]
    return df


def _parse_csv(
    text: str, sep: str, p: Path
) -> tuple[list[str], list[list[str]], list[tuple[int, int]], int]:
    """Parse CSV text with the csv module: header, records padded to the header, ragged rows."""
    csv.field_size_limit(2**31 - 1)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, strict=True)
    rows: list[list[str]] = []
    try:
        for r in reader:
            if r and any(f.strip() for f in r):
                rows.append(r)
    except csv.Error as err:
        msg = " ".join(str(err).split())
        where = f"data row {len(rows)}" if rows else "the header"
        raise ManifestError(
            f"{p}: malformed CSV near {where} (line {reader.line_num}): {msg[:300]}"
        ) from None
    except MemoryError:
        raise ManifestError(f"{p}: manifest too large to load") from None
    if not rows:
        raise ManifestError(f"{p}: manifest is empty")
    header = [h.strip() for h in rows[0]]
    # columns without a name (a pandas index, a trailing comma) are dropped
    keep = [i for i, h in enumerate(header) if h]
    if not keep:
        raise ManifestError(f"{p}: the header line has no column names")
    n_raw = len(header)
    header = [header[i] for i in keep]
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise ManifestError(f"{p}: duplicate column name(s): {', '.join(dupes)}")
    records: list[list[str]] = []
    ragged: list[tuple[int, int]] = []
    for i, r in enumerate(rows[1:], start=1):
        if len(r) != n_raw:
            ragged.append((i, len(r)))
            r = (r + [""] * n_raw)[:n_raw]
        records.append([r[j].strip() for j in keep])
    return header, records, ragged, n_raw


def _read_parquet(p: Path) -> pd.DataFrame:
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(p)
    except Exception as err:  # noqa: BLE001 - pyarrow raises many kinds
        raise ManifestError(f"{p}: cannot read as Parquet ({type(err).__name__}: {err})") from None
    names = [str(c).strip() for c in table.column_names]
    dupes = sorted({h for h in names if names.count(h) > 1})
    if dupes:
        raise ManifestError(f"{p}: duplicate column name(s): {', '.join(dupes)}")
    cols = {}
    for name, col in zip(names, table.columns, strict=True):
        cols[name] = [_to_str(v).strip() for v in col.to_pylist()]
    return _nfc_values(pd.DataFrame(cols, dtype=object))


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Load a manifest (CSV or Parquet) with every value a string.

    Adds the optional core columns when absent (``split`` = "train",
    ``patient_id`` = "", ``mask`` = ""), normalises split names (lower case;
    ``validation`` -> ``val``; empty -> ``train``), text to Unicode NFC (see
    :func:`read_table`) and pseudonymises raw patient ids with the keyed hash
    ingest uses (:func:`retrieval.data.privacy.pseudonymise_patient_ids`), so a
    hand-written manifest's MRNs never reach a bundle or a report. Raises
    ManifestError when the file cannot be parsed or lacks a required column;
    row-level problems are :func:`validate_manifest`'s job.
    """
    p = Path(path).expanduser()
    df = read_table(p)
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"{p}: missing required column(s): {', '.join(missing)}")
    df = df.copy()
    if "split" not in df.columns:
        df["split"] = "train"
    df["split"] = [_norm_split(s) for s in df["split"]]
    for col in ("patient_id", "mask"):
        if col not in df.columns:
            df[col] = ""
    hashed = False
    if any(df["patient_id"]):
        from retrieval.data.privacy import pseudonymise_patient_ids

        before = df["patient_id"].tolist()
        df["patient_id"] = pseudonymise_patient_ids(before)
        hashed = df["patient_id"].tolist() != before
    df = df.reset_index(drop=True)
    return Manifest(df=df, path=p.resolve(), root=p.resolve().parent, ids_hashed_on_read=hashed)


def write_manifest(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``df`` as CSV or Parquet (by extension) atomically (temp file + rename)."""
    import tempfile

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        if p.suffix.lower() in (".parquet", ".pq"):
            df.astype(str).to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False, lineterminator="\n")
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


def _clip(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 40] + "..." + text[-37:]


def _rows_text(rows: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(r) for r in rows[:limit])
    return shown + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


def validate_manifest(
    path: str | os.PathLike,
    check_images: bool = True,
    progress: bool = True,
    warnings: list[Problem] | None = None,
) -> list[Problem]:
    """Every problem in a manifest, each with its row (1-based) and column.

    Checks: the file parses; required columns exist; case_id non-empty and
    unique; label non-empty; image present and (with ``check_images``)
    readable; mask readable and of the image's geometry (a volume: a DICOM series folder, NIfTI
    or 3-D NPY, see retrieval.data.volume, with a (D, H, W) mask); split known; no
    patient in two splits; every label has at least two cases; not every image decodes to
    a constant array (nothing could be learned: typically a DICOM window outside the rescaled
    values). Labels and attributes are compared in Unicode NFC, as every command reads them.

    ``warnings``: a list to receive what is suspicious but usable, each a row's image that
    decodes to a constant array (every pixel equal), and one whole-manifest warning (row None)
    when the manifest mixes volumes and 2-D images (:func:`mixed_dimensions_note`); not
    returned, so that callers that treat any returned problem as a failure keep doing so.
    """
    p = Path(path).expanduser()
    try:
        df = read_table(p, keep_ragged=True)
    except ManifestError as err:
        return [Problem(None, None, str(err))]
    problems: list[Problem] = []
    for r, n_fields, width in df.attrs.get("ragged_rows", []):
        problems.append(Problem(r, None, f"has {n_fields} fields but the header has {width}"))
    for col in REQUIRED_COLUMNS:
        if col not in df.columns:
            problems.append(Problem(None, col, "required column is missing"))
    if len(df) == 0:
        problems.append(Problem(None, None, "the manifest has no cases (header only)"))
        return problems
    root = p.resolve().parent
    man = Manifest(df=df, path=p.resolve(), root=root)
    has = set(df.columns)

    # case_id: empty / duplicate
    if "case_id" in has:
        seen: dict[str, list[int]] = defaultdict(list)
        for i, cid in enumerate(df["case_id"], start=1):
            if not cid:
                problems.append(Problem(i, "case_id", "empty case_id"))
            else:
                seen[cid].append(i)
        for cid, rows in seen.items():
            if len(rows) > 1:
                for r in rows[1:]:
                    problems.append(
                        Problem(
                            r,
                            "case_id",
                            f"duplicate case_id {cid!r} (first in row {rows[0]})",
                        )
                    )
    # label: empty, and fewer than two cases
    if "label" in has:
        counts = Counter(v for v in df["label"] if v)
        label_rows: dict[str, list[int]] = defaultdict(list)
        for i, lab in enumerate(df["label"], start=1):
            if not lab:
                problems.append(Problem(i, "label", "empty label"))
            else:
                label_rows[lab].append(i)
        for lab, n in sorted(counts.items()):
            if n < 2:
                problems.append(
                    Problem(
                        label_rows[lab][0],
                        "label",
                        f"label {lab!r} has only {n} case (need at least 2: retrieval needs "
                        "another case of the class to find)",
                    )
                )
    # split: known values
    splits = [_norm_split(s) for s in df["split"]] if "split" in has else ["train"] * len(df)
    if "split" in has:
        for i, (raw, s) in enumerate(zip(df["split"], splits, strict=True), start=1):
            if s not in SPLITS:
                problems.append(
                    Problem(i, "split", f"unknown split {raw!r} (use train, val or test)")
                )
    # patient straddling splits
    if "patient_id" in has:
        by_patient: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        for i, (pid, s) in enumerate(zip(df["patient_id"], splits, strict=True), start=1):
            if pid and s in SPLITS:
                by_patient[pid][s].append(i)
        for pid, per_split in by_patient.items():
            if len(per_split) > 1:
                ordered = sorted(per_split.items(), key=lambda kv: (-len(kv[1]), kv[1][0]))
                desc = "; ".join(f"{s} (rows {_rows_text(rows)})" for s, rows in ordered)
                for _s, rows in ordered[1:]:
                    for r in rows:
                        problems.append(
                            Problem(
                                r,
                                "patient_id",
                                f"patient {pid} appears in {len(per_split)} splits: {desc}; "
                                "cases of one patient must stay in one split",
                            )
                        )
    # files
    if "image" in has:
        problems.extend(_check_files(man, check_images, progress, warnings))

    problems.sort(key=lambda pr: (pr.row if pr.row is not None else -1, pr.column or ""))
    return problems


def _constant_note(pixels, meta: dict) -> str | None:
    """Why an image that decodes to one value is suspicious, or None when it varies."""
    import numpy as np

    lo, hi = float(np.min(pixels)), float(np.max(pixels))
    if hi > lo:
        return None
    window = str(meta.get("window") or "")
    cause = (
        f"its window {window} lies outside the (rescaled) pixel values, or the image is blank"
        if window and not window.startswith("robust")  # a header window / VOI LUT
        else "a blank image"
    )
    return f"decodes to a constant image (every pixel {lo:.3g}): likely {cause}"


def mixed_dimensions_note(n_volumes: int, n_images: int) -> str | None:
    """The warning for a manifest that mixes volumes and 2-D images, or None when it does not.

    Shared by ``validate`` and ``train`` (one line each, not one per file)."""
    if not n_volumes or not n_images:
        return None
    vols = f"{n_volumes} volume{'s' if n_volumes != 1 else ''}"
    imgs = f"{n_images} 2-D image{'s' if n_images != 1 else ''}"
    return (
        f"the manifest mixes {vols} and {imgs}: a 2-D model sees only each volume's middle "
        "axial slice, and a volume backbone (cnn3d) needs every image to be a volume (it "
        "skips the 2-D images); keep volumes and 2-D images in separate manifests"
    )


def count_dimensions(paths) -> tuple[int, int]:
    """(volumes, 2-D images) among distinct ``paths``, told cheaply (the name, a folder, an NPY
    header: retrieval.data.volume.is_volume_path), without decoding; a missing path is neither."""
    from retrieval.data.volume import is_volume_path

    n_vol = n_img = 0
    for path in dict.fromkeys(str(p) for p in paths):
        try:
            if is_volume_path(path):
                n_vol += 1
            elif Path(path).is_file():
                n_img += 1
        except (OSError, ValueError):
            continue
    return n_vol, n_img


def _check_files(
    man: Manifest, check_images: bool, progress: bool, warnings: list[Problem] | None = None
) -> list[Problem]:
    from retrieval.data.imageio import read_image, read_mask
    from retrieval.data.volume import VolumeError, is_volume_path, read_volume, read_volume_mask

    df = man.df
    problems: list[Problem] = []
    has_mask = "mask" in df.columns
    cache: dict[str, tuple[tuple[int, ...] | None, str | None, str | None]] = {}
    constant: list[Problem] = []  # rows whose image decodes to one value (a warning each)
    flat_files: set[str] = set()
    n_decoded = 0  # distinct image files decoded
    kinds: dict[str, bool] = {}  # distinct readable file -> is a volume
    rows = range(len(df))
    bar = None
    if check_images and progress:
        from tqdm import tqdm

        bar = tqdm(total=len(df), desc="validating images", unit="case", leave=False)
    try:
        for i in rows:
            r = i + 1
            rel = df["image"].iat[i]
            path = None
            size: tuple[int, ...] | None = None
            if not rel:
                problems.append(Problem(r, "image", "empty image path"))
            else:
                try:
                    path = man.resolve(rel)
                except (ValueError, OSError) as err:
                    problems.append(Problem(r, "image", f"invalid path {_clip(rel)!r} ({err})"))
                    path = None
                if path is not None:
                    key = str(path)
                    if key in cache:
                        size, reason, flat = cache[key]
                    else:
                        size, reason, flat = None, None, None
                        try:
                            if is_volume_path(path):  # a volume: a series folder, NIfTI, 3-D NPY
                                if check_images:
                                    vol = read_volume(path)
                                    size = vol.shape
                                    c, w = vol.window
                                    flat = _constant_note(vol.array, {"window": f"C{c:g}/W{w:g}"})
                                    n_decoded += 1
                            elif not path.is_file():
                                reason = "file not found" if not path.exists() else "not a file"
                            elif check_images:
                                img = read_image(path)
                                size = img.original_size
                                flat = _constant_note(img.pixels, img.meta)
                                n_decoded += 1
                        except VolumeError as err:
                            reason = str(err).removeprefix(f"{path}: ")
                        except ImageReadError as err:
                            reason = err.reason
                        except OSError as err:
                            reason = f"cannot access ({err.strerror or err})"
                        cache[key] = (size, reason, flat)
                        if not reason and size is not None:  # decoded: (D, H, W) or (H, W)
                            kinds[key] = len(size) == 3
                        elif not reason and not check_images and path.exists():
                            kinds[key] = is_volume_path(path)
                    if reason:
                        problems.append(Problem(r, "image", f"{_clip(rel)}: {reason}"))
                    elif flat:
                        constant.append(Problem(r, "image", f"{_clip(rel)}: {flat}"))
                        flat_files.add(key)
            if has_mask:
                mrel = df["mask"].iat[i]
                if mrel:
                    try:
                        mpath = man.resolve(mrel)
                        if not mpath.is_file():
                            msg = "mask file not found" if not mpath.exists() else "not a file"
                            problems.append(Problem(r, "mask", f"{_clip(mrel)}: {msg}"))
                        elif check_images and path is not None and is_volume_path(path):
                            if size is not None:
                                shape = size if len(size) == 3 else None
                                read_volume_mask(mpath, expected_shape=shape)
                            else:
                                # the unreadable volume is reported above: the mask is
                                # judged on its own, as a volume's or an image's
                                try:
                                    read_volume_mask(mpath, expected_shape=None)
                                except VolumeError:
                                    read_mask(mpath, expected_size=None)
                        elif check_images:
                            read_mask(mpath, expected_size=size)
                    except VolumeError as err:
                        problems.append(
                            Problem(
                                r, "mask", f"{_clip(mrel)}: {str(err).removeprefix(f'{mpath}: ')}"
                            )
                        )
                    except ImageReadError as err:
                        problems.append(Problem(r, "mask", f"{_clip(mrel)}: {err.reason}"))
                    except (ValueError, OSError) as err:
                        problems.append(Problem(r, "mask", f"{_clip(mrel)}: cannot access ({err})"))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if n_decoded and len(flat_files) == n_decoded:
        problems.append(
            Problem(
                None,
                "image",
                f"every image ({n_decoded}) decodes to a constant image, so nothing can be "
                f"learned; e.g. {constant[0].message}",
            )
        )
    elif warnings is not None:
        warnings.extend(constant)
    n_vol = sum(kinds.values())
    mixed = mixed_dimensions_note(n_vol, len(kinds) - n_vol)
    if mixed and warnings is not None:
        warnings.append(Problem(None, "image", mixed))
    return problems


def summarize(path: str | os.PathLike) -> dict:
    """Counts used by the validate command's OK line and --json output."""
    m = load_manifest(path)
    df = m.df
    return {
        "n_cases": int(len(df)),
        "labels": dict(sorted(Counter(df["label"]).items())),
        "splits": {s: int(n) for s, n in sorted(Counter(df["split"]).items())},
        "n_patients": int(len(set(df["patient_id"]) - {""})),
        "attributes": m.attribute_columns,
    }
