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


# ------------------------------------------------ stored pixel fingerprints (index.fingerprints)
def _counting_reads(monkeypatch):
    """Count the images the self-match check reads (it imports read_image at call time)."""
    import retrieval.data.imageio as imageio

    calls = []
    real = imageio.read_image

    def counted(src, *a, **kw):
        calls.append(src)
        return real(src, *a, **kw)

    monkeypatch.setattr(imageio, "read_image", counted)
    return calls


def test_the_bundle_stores_the_audits_fingerprint_of_every_case(r):
    from retrieval.audit.leakage import fingerprint

    assert r.fingerprints is not None and r.meta["pixel_fingerprints"]["cases"] == len(r.cases)
    for row in (0, len(r.cases) // 2, len(r.cases) - 1):
        h, t = fingerprint(read_image(r.cases.at[row, "image"]).pixels)
        assert r.fingerprints.same_hash(row, h)
        assert abs(r.fingerprints.correlation(row, t) - 1.0) < 1e-3
        assert not r.fingerprints.same_hash((row + 1) % len(r.cases), h)


def test_self_match_comes_from_stored_fingerprints_without_reading_an_image(
    r, manifest, monkeypatch
):
    from retrieval.service.self_match import find_self_match

    row = _indexed_row(r, manifest)
    q = r.encode(row["path"])
    calls = _counting_reads(monkeypatch)
    found = find_self_match(r, q)
    assert found is not None and found[0].case_id == row["case_id"]
    assert found[0].reason == "identical pixels" and found[0].similarity >= 0.999
    assert calls == []


def _near_duplicate(r, manifest, monkeypatch):
    """(query context, row): another picture of an indexed case (shifted 8 px), which the
    (faked) search puts at cosine 0.9995 to it: a near-duplicate, not the same image."""
    from retrieval.audit.leakage import fingerprint

    row = _indexed_row(r, manifest)
    target = int(np.flatnonzero(r.cases["case_id"].to_numpy() == row["case_id"])[0])
    pixels = read_image(row["path"]).pixels
    shifted = np.roll(pixels, 8, axis=1)
    corr = float(fingerprint(shifted)[1] @ fingerprint(pixels)[1])
    assert corr < 0.995 - 1e-3  # precondition: the thumbnails do differ
    q = r.encode(shifted[..., 0] if shifted.shape[-1] == 1 else shifted)
    monkeypatch.setattr(r, "search", lambda v, k, *a, **kw: [[(0.9995, target)]])
    return q, target


def test_a_near_duplicate_is_not_a_self_match_and_no_image_is_read(r, manifest, monkeypatch):
    from retrieval.service.self_match import find_self_match

    q, _ = _near_duplicate(r, manifest, monkeypatch)
    calls = _counting_reads(monkeypatch)
    assert find_self_match(r, q) is None
    assert calls == []
    # the same answer as reading the candidate's image (the behaviour of older bundles)
    monkeypatch.setattr(r, "fingerprints", None)
    assert find_self_match(r, q) is None
    assert len(calls) == 1


def test_a_thumbnail_near_the_threshold_is_decided_from_the_image(r, manifest, monkeypatch):
    """Stored float16 thumbnails decide only clear cases; near 0.995 the image is read."""
    from index.fingerprints import PixelFingerprints
    from retrieval.audit.leakage import fingerprint
    from retrieval.service.self_match import SELF_THUMB, find_self_match

    q, target = _near_duplicate(r, manifest, monkeypatch)
    _, q_thumb = fingerprint(q.image.pixels)
    thumbs = np.array(r.fingerprints.thumbs, np.float16)
    # a stored thumbnail 0.0005 below the threshold: within float16's error of it
    other = np.asarray(thumbs[target], np.float64)
    other -= (other @ q_thumb) * q_thumb
    other /= np.linalg.norm(other)
    c = SELF_THUMB - 0.0005
    thumbs[target] = (c * q_thumb + np.sqrt(1 - c * c) * other).astype(np.float16)
    monkeypatch.setattr(r, "fingerprints", PixelFingerprints(r.fingerprints.sha, thumbs))
    calls = _counting_reads(monkeypatch)
    assert find_self_match(r, q) is None  # the image (a different picture) decides
    assert len(calls) == 1


def test_a_bundle_without_fingerprints_still_finds_self_matches(
    tiny_index, tmp_path, manifest, monkeypatch
):
    import json
    import shutil

    from index import bundle
    from retrieval.service.self_match import find_self_match

    old = tmp_path / "old"
    shutil.copytree(tiny_index, old)
    shutil.rmtree(old / "fingerprints")
    meta = json.loads((old / "bundle.json").read_text())
    meta.pop("pixel_fingerprints")
    bundle.seal(old, meta)
    r_old = CaseRetriever.load(old, device="cpu")
    assert r_old.fingerprints is None
    row = _indexed_row(r_old, manifest)
    res = r_old.query(row["path"], k=3, regions=False, exclude_self=True)
    assert res.self_match is not None and res.self_match.case_id == row["case_id"]
    assert res.self_match.reason == "identical pixels"
    assert row["case_id"] not in [n.case_id for n in res.neighbors]
    calls = _counting_reads(monkeypatch)
    assert find_self_match(r_old, r_old.encode(row["path"])) is not None
    assert len(calls) >= 1  # read from the image, as before the fingerprints
