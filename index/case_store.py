"""The case table: one row per indexed vector, in id order, stored as Parquet.

Columns: case_id, label, split, patient_id (hashed), image and mask (for
showing neighbours and explaining them), and every attribute column of the
manifest. All values are strings, as in the manifest.

Paths are stored relative to the manifest's folder (bundle.json:
``"case_paths": "manifest-relative"`` and ``manifest``), so a bundle carries no
absolute location of the data (a home folder, a patient-named export folder);
:func:`read_cases` resolves them again. Bundles built before stored absolute
paths and load as they are.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from retrieval.errors import BundleError

CORE_COLUMNS = ["case_id", "label", "split", "patient_id", "image", "mask"]
PATH_COLUMNS = ("image", "mask")
MANIFEST_RELATIVE = "manifest-relative"


def image_root(meta: dict) -> Path | None:
    """The folder a bundle's case paths are relative to (None: they are absolute, older bundles)."""
    if meta.get("case_paths") == MANIFEST_RELATIVE and meta.get("manifest"):
        return Path(meta["manifest"]).parent
    return None


def _relative(p: str, root: Path) -> str:
    if not p or not os.path.isabs(p):
        return p
    try:
        return Path(os.path.relpath(p, root)).as_posix()
    except ValueError:  # another drive (Windows)
        return p


def attribute_columns(cases: pd.DataFrame) -> list[str]:
    return [c for c in cases.columns if c not in CORE_COLUMNS]


def write_cases(cases: pd.DataFrame, path: str | Path, root: str | Path | None = None) -> None:
    """Write the case table; with ``root``, absolute image/mask paths are stored relative to it."""
    table = cases.reset_index(drop=True).astype(str)
    if root is not None:
        for col in PATH_COLUMNS:
            if col in table:
                table[col] = [_relative(p, Path(root)) for p in table[col]]
    table.to_parquet(path, index=False)


def read_cases(path: str | Path, root: str | Path | None = None) -> pd.DataFrame:
    """Read the case table; with ``root`` (:func:`image_root`), relative paths are resolved."""
    try:
        df = pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises many types for corrupt files
        raise BundleError(f"{path}: not a readable case table ({type(err).__name__})") from None
    missing = [c for c in CORE_COLUMNS if c not in df.columns]
    if missing:
        raise BundleError(f"{path}: case table lacks column(s) {', '.join(missing)}")
    df = df.fillna("").astype(str)
    if root is not None:
        for col in PATH_COLUMNS:
            if col in df:
                df[col] = [
                    p if not p or os.path.isabs(p) else os.path.normpath(os.path.join(root, p))
                    for p in df[col]
                ]
    return df
