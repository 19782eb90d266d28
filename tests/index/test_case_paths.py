"""Bundles keep case paths relative to the manifest's folder; bundles with absolute paths
(built before) still load."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from index import bundle
from index.case_store import MANIFEST_RELATIVE, write_cases
from retrieval.service.retriever import CaseRetriever


def test_bundle_stores_manifest_relative_paths(tiny_index, phantom_dir):
    meta = bundle.verify(tiny_index)
    assert meta["case_paths"] == MANIFEST_RELATIVE
    assert Path(meta["manifest"]) == (phantom_dir / "manifest.csv").resolve()
    raw = pd.read_parquet(tiny_index / "cases.parquet")
    stored = [p for col in ("image", "mask") for p in raw[col] if p]
    assert stored and not any(Path(p).is_absolute() for p in stored)
    assert not any(str(phantom_dir.resolve()) in p for p in stored)
    manifest = pd.read_csv(phantom_dir / "manifest.csv", dtype=str).set_index("case_id")
    for cid, img in zip(raw["case_id"], raw["image"], strict=True):
        assert img == manifest.at[cid, "image"]  # exactly the manifest's own relative path
    r = CaseRetriever.load(tiny_index, device="cpu")
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in r.cases["image"])
    assert all(Path(p).is_file() for p in r.cases["mask"] if p)


def test_old_bundle_with_absolute_paths_still_loads(tiny_index, tmp_path):
    new = CaseRetriever.load(tiny_index, device="cpu")
    old = tmp_path / "old"
    shutil.copytree(tiny_index, old)
    write_cases(new.cases, old / "cases.parquet")  # absolute paths, as bundles used to store
    meta = bundle.read_meta(old)
    meta.pop("case_paths")
    bundle.seal(old, meta)
    assert Path(pd.read_parquet(old / "cases.parquet")["image"][0]).is_absolute()
    r = CaseRetriever.load(old, device="cpu")
    assert r.cases["image"].tolist() == new.cases["image"].tolist()
    res = r.query(r.cases["image"][0], k=3)
    assert res.neighbors[0].case_id == r.cases["case_id"][0]
