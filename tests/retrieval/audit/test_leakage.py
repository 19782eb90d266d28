"""Leakage: planted duplicates are found; own-patient neighbours and patient clustering counted."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from index.vector_index import VectorIndex
from retrieval.audit.leakage import (
    audit_leakage,
    index_self_search,
    own_patient_neighbors,
    thumbnail_duplicates,
)
from retrieval.data.imageio import read_image
from retrieval.service.evaluate import embed_split
from retrieval.service.retriever import CaseRetriever


@pytest.fixture(scope="module")
def planted(tmp_path_factory, phantom_dir):
    """The phantom's manifest plus two test cases that copy indexed cases (new ids, new patients)."""
    root = tmp_path_factory.mktemp("planted")
    m = pd.read_csv(phantom_dir / "manifest.csv", dtype=str).fillna("")
    for col in ("image", "mask"):
        m[col] = [str(phantom_dir / p) if p else "" for p in m[col]]
    train = m[m["split"] == "train"].reset_index(drop=True)
    a, b = train.iloc[0], train.iloc[1]
    exact = root / "exact_copy.dcm"
    shutil.copyfile(a["image"], exact)  # byte-identical file under another name
    px = read_image(b["image"]).pixels[:, :, 0]
    noisy = np.clip(px * 0.97 + 0.02 + np.random.default_rng(0).normal(0, 0.005, px.shape), 0, 1)
    reenc = root / "reencoded.png"
    Image.fromarray((noisy * 255).round().astype(np.uint8)).save(reenc)  # re-windowed, re-encoded
    extra = pd.DataFrame(
        [
            {
                **a.to_dict(),
                "case_id": "planted_exact",
                "image": str(exact),
                "split": "test",
                "patient_id": "p_planted1",
            },
            {
                **b.to_dict(),
                "case_id": "planted_reenc",
                "image": str(reenc),
                "split": "test",
                "patient_id": "p_planted2",
            },
        ]
    )
    out = root / "manifest.csv"
    pd.concat([m, extra]).to_csv(out, index=False)
    return out, a["case_id"], b["case_id"]


def test_planted_duplicates_are_found(tiny_index, planted):
    manifest, orig_a, orig_b = planted
    r = CaseRetriever.load(tiny_index, device="cpu")
    qs = embed_split(r, manifest, "test", 5, progress=False)
    leak = audit_leakage(r, qs.cases, qs.vectors, 5)
    pairs = {(p["query_case"], p["index_case"]) for p in leak["identical_pixels"]["pairs"]}
    assert pairs == {("planted_exact", orig_a)}  # the re-encoded copy is not pixel-identical
    near = {(p["query_case"], p["index_case"]) for p in leak["near_duplicate_pixels"]["pairs"]}
    assert {("planted_exact", orig_a), ("planted_reenc", orig_b)} <= near
    assert all(q.startswith("planted") for q, _ in near)  # no false pixel near-duplicate
    emb = {(p["query_case"], p["index_case"]) for p in leak["near_duplicates"]["pairs"]}
    assert ("planted_exact", orig_a) in emb
    assert leak["near_duplicates"]["threshold"] >= 0.995
    assert leak["shared_case_ids"]["n"] == 0
    assert leak["own_patient_neighbors"]["n"] == 0  # the phantom's splits are patient-disjoint
    assert leak["n_flags"] >= 3
    text = repr(leak)
    assert "p_planted" not in text and "PHANTOM" not in text  # case ids only


def test_own_patient_neighbors():
    hits = [[(0.9, 0), (0.8, 1)], [(0.7, 2)], []]
    found = own_patient_neighbors(
        hits,
        ["p1", "", "p3"],
        np.array(["p1", "p2", "p3"]),
        ["q0", "q1", "q2"],
        np.array(["c0", "c1", "c2"]),
    )
    assert found == [{"query_case": "q0", "index_case": "c0", "rank": 1, "cosine": 0.9}]


def test_index_self_search_sees_patient_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, 16))
    vecs = np.repeat(centres, 4, axis=0) + 0.05 * rng.normal(size=(200, 16))  # 4 images per patient
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)
    patients = np.repeat([f"p{i}" for i in range(50)], 4)
    stats, cross = index_self_search(VectorIndex.build(vecs, "Flat"), patients, k=5)
    assert stats["share_at_5"] == pytest.approx(3 / 5, abs=0.02)  # all 3 siblings in the top 5
    assert stats["expected"] == pytest.approx(3 / 199)
    assert stats["lift"] > 30
    assert len(cross) == 200 and cross.max() < 0.99


def test_thumbnail_duplicates_ignore_shared_layout():
    rng = np.random.default_rng(0)
    base = rng.normal(size=64)  # the layout every image shares
    thumbs = np.stack([base + 0.3 * rng.normal(size=64) for _ in range(20)])
    thumbs -= thumbs.mean(1, keepdims=True)
    thumbs /= np.linalg.norm(thumbs, axis=1, keepdims=True)
    assert (thumbs[:10] @ thumbs[10:].T).max() > 0.9  # raw correlation says "all alike"
    q = np.vstack([thumbs[3], thumbs[15] * 1.0])
    found = thumbnail_duplicates(q[:1], thumbs[10:], ["q"], [f"i{i}" for i in range(10)])
    assert found == []
    found = thumbnail_duplicates(thumbs[12:13], thumbs[10:], ["q"], [f"i{i}" for i in range(10)])
    assert [f["index_case"] for f in found] == ["i2"]
