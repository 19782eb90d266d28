"""Which attributes the audit looks at, and how each is coded into groups.

An attribute is any non-core column of the case table (site, sex, age,
scanner, …). Default selection: every attribute column that the query split
also has and that takes 2..50 distinct values, except columns named
``lesion_*``: those describe the finding itself (its size, position, shape),
which retrieval *should* match on, so they are never a shortcut by default
(ask for one with ``--attributes`` to see how strongly neighbours share it); a *numeric* column with more
than 10 distinct values (age, BMI, …) is treated as continuous and binned into
quartiles of the indexed cases (equal-count bins, so every group is large
enough for the concordance null and the probe; the bin edges are reported).
Empty strings are missing values: such cases belong to no group.

Every attribute becomes integer codes (``-1`` = missing) over one shared list
of group names, for the indexed cases and for the queries alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from retrieval.data.manifest import CORE_COLUMNS
from retrieval.errors import CasebaseError

MAX_GROUPS = 50
FINDING_PREFIX = "lesion_"  # columns describing the lesion itself: not audited unless asked
CONTINUOUS_MIN_DISTINCT = 10
N_QUANTILE_BINS = 4


@dataclass
class CodedAttribute:
    name: str
    kind: str  # "categorical" | "binned"
    binning: str | None  # how a continuous attribute was binned (None for categorical)
    groups: list[str]  # group names; code i <-> groups[i]
    index_codes: np.ndarray  # (n_index,) int16, -1 = missing
    query_codes: np.ndarray  # (n_query,) int16, -1 = missing


def _numeric(values: pd.Series) -> np.ndarray | None:
    """Float array (NaN = missing) when every non-empty value parses as a number, else None."""
    present = values[values.str.strip() != ""]
    if present.empty:
        return None
    nums = pd.to_numeric(present, errors="coerce")
    if nums.isna().any():
        return None
    out = np.full(len(values), np.nan)
    out[(values.str.strip() != "").to_numpy()] = nums.to_numpy(dtype=float)
    return out


def _fmt(x: float) -> str:
    return f"{x:g}" if abs(x - round(x)) > 1e-9 else str(int(round(x)))


def _bin(name: str, index_vals: np.ndarray, query_vals: np.ndarray) -> CodedAttribute:
    finite = index_vals[np.isfinite(index_vals)]
    edges = np.unique(np.quantile(finite, np.linspace(0, 1, N_QUANTILE_BINS + 1)))
    inner = edges[1:-1]
    groups = []
    for i in range(len(edges) - 1):
        close = "]" if i == len(edges) - 2 else ")"
        groups.append(f"[{_fmt(edges[i])}, {_fmt(edges[i + 1])}{close}")

    def code(v: np.ndarray) -> np.ndarray:
        c = np.searchsorted(inner, v, side="right").astype(np.int16)
        c[~np.isfinite(v)] = -1
        return c

    binning = (
        f"quartiles of the indexed cases ({len(groups)} equal-count bins; values outside "
        f"the indexed range go to the end bins): " + ", ".join(groups)
    )
    return CodedAttribute(name, "binned", binning, groups, code(index_vals), code(query_vals))


def _categorical(name: str, index_vals: pd.Series, query_vals: pd.Series) -> CodedAttribute:
    present = [v for v in pd.concat([index_vals, query_vals]).unique() if v.strip() != ""]
    groups = sorted(present)
    lookup = {g: i for i, g in enumerate(groups)}

    def code(s: pd.Series) -> np.ndarray:
        return np.array([lookup.get(v, -1) for v in s], dtype=np.int16)

    return CodedAttribute(name, "categorical", None, groups, code(index_vals), code(query_vals))


def code_attribute(name: str, index_vals: pd.Series, query_vals: pd.Series) -> CodedAttribute | str:
    """The coded attribute, or a string saying why it cannot be audited."""
    index_vals = index_vals.fillna("").astype(str)
    query_vals = query_vals.fillna("").astype(str)
    both = pd.concat([index_vals, query_vals])
    distinct = both[both.str.strip() != ""].nunique()
    if distinct < 2:
        return f"{distinct} distinct value(s); nothing to compare"
    inum, qnum = _numeric(index_vals), _numeric(query_vals)
    if (
        inum is not None
        and (qnum is not None or query_vals.str.strip().eq("").all())
        and distinct > CONTINUOUS_MIN_DISTINCT
    ):
        if qnum is None:
            qnum = np.full(len(query_vals), np.nan)
        if np.isfinite(inum).sum() < 2 * N_QUANTILE_BINS:
            return "too few numeric values in the index to bin"
        return _bin(name, inum, qnum)
    if distinct > MAX_GROUPS:
        return f"{distinct} distinct values (more than {MAX_GROUPS}) and not numeric"
    return _categorical(name, index_vals, query_vals)


def select_attributes(
    index_cases: pd.DataFrame,
    query_cases: pd.DataFrame,
    known: list[str],
    requested: list[str] | None,
) -> tuple[list[CodedAttribute], dict[str, str]]:
    """(coded attributes, {skipped name: reason}); unknown requested names raise CasebaseError."""
    if requested:
        unknown = [a for a in requested if a not in known]
        if unknown:
            raise CasebaseError(
                f"unknown attribute(s) {', '.join(unknown)}; the index has: "
                f"{', '.join(known) or '(no attribute columns)'}"
            )
        missing = [a for a in requested if a not in query_cases.columns]
        if missing:
            raise CasebaseError(f"attribute(s) {', '.join(missing)} not in the query manifest")
        names = list(dict.fromkeys(requested))
    else:
        names = [a for a in known if not a.startswith(FINDING_PREFIX)]
    coded, skipped = [], {}
    if not requested:  # a column the index never stored cannot be audited: say so, not nothing
        for name in query_cases.columns:
            if name not in CORE_COLUMNS and name not in known and not name.startswith("_"):
                skipped[name] = (
                    "in the query manifest but not in the index: rebuild the index from a "
                    "manifest that has it to audit it"
                )
    for name in names:
        if name not in query_cases.columns:
            skipped[name] = "not in the query manifest"
            continue
        out = code_attribute(name, index_cases[name], query_cases[name])
        if isinstance(out, str):
            if requested:
                raise CasebaseError(f"attribute {name!r} cannot be audited: {out}")
            skipped[name] = out
        else:
            coded.append(out)
    return coded, skipped
