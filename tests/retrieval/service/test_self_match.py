"""A query that is itself an indexed case is recognised, said, and left out on request."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from retrieval.data.imageio import read_image, to_uint8_rgb
from retrieval.service.retriever import CaseRetriever


@pytest.fixture(scope="module")
def r(tiny_index):
    return CaseRetriever.load(tiny_index, device="cpu")


@pytest.fixture(scope="module")
def manifest(phantom_dir):
    m = pd.read_csv(phantom_dir / "manifest.csv")
    m["path"] = [str(phantom_dir / p) for p in m["image"]]
    return m


def _indexed_row(r, manifest):
    indexed = set(r.cases["case_id"])
    return manifest[manifest["case_id"].isin(indexed)].iloc[3]


def test_an_indexed_image_is_recognised_and_left_out_on_request(r, manifest):
    row = _indexed_row(r, manifest)
    kept = r.query(row["path"], k=5, regions=False)
    assert kept.self_match is not None
    assert kept.self_match.case_id == row["case_id"]
    assert kept.self_match.reason == "identical pixels"
    assert kept.self_match.similarity >= 0.999 and not kept.self_match.excluded
    assert kept.neighbors[0].case_id == row["case_id"]  # backward compatible: still there

    dropped = r.query(row["path"], k=5, regions=False, exclude_self=True)
    assert dropped.self_match.excluded
    ids = [n.case_id for n in dropped.neighbors]
    assert len(ids) == 5 and row["case_id"] not in ids
    assert ids[:4] == [n.case_id for n in kept.neighbors[1:5]]
    out = dropped.to_json()["self_match"]
    assert out["case_id"] == row["case_id"] and out["excluded"] is True


def test_a_png_export_of_an_indexed_case_is_recognised(r, manifest):
    from PIL import Image

    row = _indexed_row(r, manifest)
    buf = io.BytesIO()
    Image.fromarray(to_uint8_rgb(read_image(row["path"]).pixels)).save(buf, format="PNG")
    buf.seek(0)
    buf.name = "upload.png"
    res = r.query(read_image(buf), k=3, regions=False, exclude_self=True)
    assert res.self_match is not None and res.self_match.case_id == row["case_id"]
    assert row["case_id"] not in [n.case_id for n in res.neighbors]


def test_a_test_case_is_not_a_self_match(r, manifest):
    for _, row in manifest[manifest["split"] == "test"].head(3).iterrows():
        res = r.query(row["path"], k=3, regions=False, case_id=row["case_id"], exclude_self=True)
        assert res.self_match is None
        assert res.to_json()["self_match"] is None
        assert len(res.neighbors) == 3


def test_a_known_case_id_is_a_self_match_whatever_the_pixels(r, manifest):
    row = _indexed_row(r, manifest)
    noise = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    res = r.query(noise, k=3, regions=False, case_id=row["case_id"], exclude_self=True)
    assert res.self_match.reason == "same case id" and res.self_match.excluded
    assert row["case_id"] not in [n.case_id for n in res.neighbors]
