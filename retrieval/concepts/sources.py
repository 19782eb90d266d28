"""Where a concept's example images and the random counterexamples come from.

A concept SPEC is either a folder of example images (any format casebase reads,
searched recursively) or ``COLUMN:VALUE``: the cases of the manifest (or, without
one, of the index) whose attribute COLUMN equals VALUE. Counterexamples are random
draws of the same table's images, never the concept's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from retrieval.errors import CasebaseError


@dataclass
class ConceptSource:
    name: str
    spec: str
    kind: str  # "folder" | "attribute"
    paths: list[str]


@dataclass
class LoadedSet:
    """Images read and preprocessed for the model; unreadable ones reported and skipped."""

    paths: list[str]
    tensors: torch.Tensor  # (N, C, S, S), the model's normalised input
    failures: list[str] = field(default_factory=list)


def parse_assignment(text: str, what: str = "NAME=SPEC") -> tuple[str, str]:
    """'NAME=VALUE' -> (NAME, VALUE) with a one-line error for anything else."""
    if "=" not in text:
        raise CasebaseError(f"--concept {text!r}: use {what}")
    name, value = (t.strip() for t in text.split("=", 1))
    if not name or not value:
        raise CasebaseError(f"--concept {text!r}: use {what}")
    if not all(ch.isalnum() or ch in "-_." for ch in name):
        raise CasebaseError(f"--concept {text!r}: a name may hold letters, digits, - _ . only")
    return name, value


def image_pool(r, manifest: str | Path | None = None) -> pd.DataFrame:
    """The table random counterexamples and class inputs are drawn from (absolute image paths)."""
    if manifest is None:
        return r.cases.copy()
    from index.builder import case_table
    from retrieval.data.manifest import load_manifest

    man = load_manifest(manifest)
    return case_table(man, man.df)


def _folder_images(folder: Path) -> list[str]:
    files = [
        p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    return [str(p) for p in files]


def resolve(name: str, spec: str, pool: pd.DataFrame) -> ConceptSource:
    """A concept's example image paths from its SPEC (folder, or COLUMN:VALUE of `pool`)."""
    folder = Path(spec).expanduser()
    if folder.is_dir():
        paths = _folder_images(folder)
        if not paths:
            raise CasebaseError(f"concept {name!r}: folder {folder} holds no files")
        return ConceptSource(name, spec, "folder", paths)
    if ":" in spec:
        column, value = spec.split(":", 1)
        if column in pool.columns:
            rows = pool[pool[column].astype(str) == value]
            if rows.empty:
                seen = ", ".join(sorted(pool[column].astype(str).unique())[:12])
                raise CasebaseError(
                    f"concept {name!r}: no case has {column}={value!r} (values: {seen})"
                )
            return ConceptSource(name, spec, "attribute", rows["image"].astype(str).tolist())
        cols = ", ".join(c for c in pool.columns if c not in ("image", "mask", "case_id"))
        raise CasebaseError(
            f"concept {name!r}: {spec!r} is not a folder, and {column!r} is not a column "
            f"of the manifest (columns: {cols})"
        )
    raise CasebaseError(
        f"concept {name!r}: {spec!r} is neither a folder of images nor COLUMN:VALUE"
    )


def load_images(r, paths: list[str], progress: bool = False, desc: str = "images") -> LoadedSet:
    """Read and preprocess `paths` as the model was trained; one bad file is skipped, not fatal."""
    ok, tensors, failures = [], [], []
    for p in tqdm(paths, desc=desc, unit="img", disable=not progress, leave=False):
        try:
            tensors.append(r.preprocessor(p))
            ok.append(p)
        except CasebaseError as err:
            failures.append(str(err))
    if not tensors:
        size = r.model.config.image_size
        empty = torch.zeros((0, r.model.config.in_channels, size, size))
        return LoadedSet([], empty, failures)
    return LoadedSet(ok, torch.stack(tensors), failures)


def sample(paths: list[str], n: int, rng: np.random.Generator) -> list[str]:
    if len(paths) <= n:
        return list(paths)
    idx = np.sort(rng.choice(len(paths), size=n, replace=False))
    return [paths[i] for i in idx]
