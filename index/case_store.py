"""The case table: one row per indexed vector, in id order, stored as Parquet.

Columns: case_id, label, split, patient_id (hashed), image and mask (absolute
paths, for showing neighbours and explaining them), and every attribute
column of the manifest. All values are strings, as in the manifest.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from retrieval.errors import BundleError

CORE_COLUMNS = ["case_id", "label", "split", "patient_id", "image", "mask"]


def attribute_columns(cases: pd.DataFrame) -> list[str]:
    return [c for c in cases.columns if c not in CORE_COLUMNS]


def write_cases(cases: pd.DataFrame, path: str | Path) -> None:
    cases.reset_index(drop=True).astype(str).to_parquet(path, index=False)


def read_cases(path: str | Path) -> pd.DataFrame:
    try:
        df = pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises many types for corrupt files
        raise BundleError(f"{path}: not a readable case table ({type(err).__name__})") from None
    missing = [c for c in CORE_COLUMNS if c not in df.columns]
    if missing:
        raise BundleError(f"{path}: case table lacks column(s) {', '.join(missing)}")
    return df.fillna("").astype(str)
