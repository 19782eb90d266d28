"""Refine by example (Rocchio) and by region; matched regions served from the region index."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from index import bundle
from retrieval import CaseRetriever
from retrieval.cli import main
from retrieval.errors import CasebaseError
from retrieval.model.preprocess import Geometry
from retrieval.service import refine


def _query_image(phantom, i=0):
    df = pd.read_csv(phantom / "manifest.csv", dtype=str).fillna("")
    return phantom / df[df["split"] == "test"].iloc[i]["image"]


# ------------------------------------------------------------------ pure functions
def test_rocchio_moves_toward_liked_and_away_from_unliked():
    rng = np.random.default_rng(0)
    q, a, b = (v / np.linalg.norm(v) for v in rng.standard_normal((3, 16)))
    moved = refine.rocchio(q, a[None], b[None])
    assert np.linalg.norm(moved) == pytest.approx(1.0, abs=1e-6)
    assert moved @ a > q @ a and moved @ b < q @ b
    np.testing.assert_allclose(refine.rocchio(q, np.zeros((0, 16)), np.zeros((0, 16))), q, 1e-6)
    expected = q + refine.BETA * a - refine.GAMMA * b
    np.testing.assert_allclose(moved, expected / np.linalg.norm(expected), atol=1e-6)


def test_parse_ids_and_box():
    assert refine.parse_ids(["a,b", " c ", "a"]) == ["a", "b", "c"]
    assert refine.parse_ids(None) == []
    assert refine.parse_box("1,2,30,40") == (1.0, 2.0, 30.0, 40.0)
    for bad in ("1,2,3", "a,b,c,d", "1,2,3,nan"):
        with pytest.raises(CasebaseError, match="X0,Y0,X1,Y1"):
            refine.parse_box(bad)


def test_select_cells_maps_boxes_to_cells_and_refuses_bad_ones():
    g = Geometry((200, 100), 64)  # H 200, W 100 original; 4x4 grid of stride 16
    # cells centred on input px 0, 16, 32, 48 span [0, 8.5), [8.5, 24.5), [24.5, 40.5),
    # [40.5, 64): x [0, 13.3), [13.3, 38.3), [38.3, 63.3), [63.3, 100) (scale 1.5625),
    # y [0, 26.6), [26.6, 76.6), [76.6, 126.6), [126.6, 200) (scale 3.125)
    sel = refine.select_cells((0, 0, 50, 100), g, (4, 4))  # covers 47% of the third cells
    assert sel.cells[:2, :2].all() and sel.cells.sum() == 4 and sel.note == ""
    assert sel.searched == [0, 0, 39, 77]  # the four cells' box
    sel = refine.select_cells((5, 5, 45, 95), g, (4, 4))  # >= 72% of each of 4 cells
    assert sel.cells.sum() == 4 and sel.clip == [5, 5, 45, 95]
    tiny = refine.select_cells((60, 120, 64, 124), g, (4, 4))
    assert tiny.cells.sum() == 1 and tiny.cells[2, 2] and "widened" in tiny.note
    assert tiny.clip == g.cell_box(2, 2, (4, 4))
    for box, msg in [
        ((10, 10, 5, 20), "inverted"),
        ((10, 10, 10, 20), "empty"),
        ((-1, 0, 10, 10), "outside the image"),
        ((0, 0, 101, 10), "outside the image"),
    ]:
        with pytest.raises(CasebaseError, match=msg):
            refine.select_cells(box, g, (4, 4))


# --------------------------------------------------------------- on a tiny index
@pytest.fixture(scope="module")
def r(tiny_index):
    return CaseRetriever.load(tiny_index)


def test_bundle_holds_a_checksummed_region_index(tiny_index, r):
    meta = bundle.verify(tiny_index)
    assert meta["format_version"] == 2 and meta["regions"]["factory"] == "Flat"
    assert {"regions/cells.npy", "regions/cells.faiss", "regions/weights.npy"} <= set(meta["files"])
    ri = r.region_index
    assert len(ri) == len(r.cases) and ri.index.ntotal == len(r.cases) * np.prod(ri.grid)
    # the stored cells rebuild every stored embedding
    stored = r.index.reconstruct_all()
    rebuilt = np.stack([r.stored_embedding(i) for i in range(len(ri))])
    np.testing.assert_allclose(rebuilt, stored, atol=1e-5)


def test_matched_regions_from_the_bundle_equal_re_encoding(r, phantom_dir, monkeypatch):
    img = _query_image(phantom_dir)
    res = r.query(img, k=4)
    q = r.encode(img)
    ctxs = r.encode_many([n.image for n in res.neighbors])
    for nb, c in zip(res.neighbors, ctxs, strict=True):
        assert nb.matched_regions and nb.completeness_error < 1e-4
        again = copy.deepcopy(nb)
        r.match_regions(q, c, again)
        assert [m.query_box for m in nb.matched_regions] == [
            m.query_box for m in again.matched_regions
        ]
        assert [m.case_box for m in nb.matched_regions] == [
            m.case_box for m in again.matched_regions
        ]
        np.testing.assert_allclose(
            [m.contribution for m in nb.matched_regions],
            [m.contribution for m in again.matched_regions],
            rtol=1e-4,
            atol=1e-7,
        )
    # no neighbour image is read for matched regions any more
    monkeypatch.setattr(r, "encode_many", lambda *_: pytest.fail("re-encoded a neighbour"))
    assert all(n.matched_regions for n in r.query(img, k=4).neighbors)
    assert not any(n.matched_regions for n in r.query(img, k=4, regions=False).neighbors)


def test_batched_stored_regions_equal_one_neighbour_at_a_time(r, phantom_dir):
    """The query decomposes its neighbours in one batch; one by one gives the same answer."""
    img = _query_image(phantom_dir, 1)
    res = r.query(img, k=5)
    q = r.encode(img)
    sel = refine.select_cells((8, 8, 40, 40), q.geometry, q.grid)
    for selection in (None, sel):
        batch = copy.deepcopy(res.neighbors)
        r.stored_regions_many(q, batch, selection=selection)
        for nb in batch:
            one = copy.deepcopy(nb)
            one.matched_regions, one.maps = [], {}
            r.stored_regions(q, one, selection=selection)
            assert [m.query_box for m in one.matched_regions] == [
                m.query_box for m in nb.matched_regions
            ]
            assert [m.case_box for m in one.matched_regions] == [
                m.case_box for m in nb.matched_regions
            ]
            for side in ("query", "case"):
                np.testing.assert_allclose(
                    one.maps["similarity"][side], nb.maps["similarity"][side], atol=1e-6
                )
            assert abs(one.completeness_error - nb.completeness_error) < 1e-9


def test_like_and_unlike(r, phantom_dir):
    img = _query_image(phantom_dir, 1)
    base = r.query(img, k=5, regions=False)
    top = base.neighbors[0].case_id
    res = r.query(img, k=5, unlike=[top], regions=False)
    assert top not in [n.case_id for n in res.neighbors]  # an unliked case never comes back
    assert res.to_json()["feedback"]["unlike"] == [top]
    far = r.query(img, k=len(r.cases), regions=False).neighbors[-1]  # the least similar case
    liked = r.query(img, k=5, like=[far.case_id], regions=False)
    row = r.rows_of([far.case_id])[0]
    q = r.encode(img).embedding.numpy()
    moved = refine.rocchio(q, r.case_embedding(row)[None], np.zeros((0, q.size)))
    assert moved @ r.case_embedding(row) > q @ r.case_embedding(row)
    expected = [r.cases.at[i, "case_id"] for _, i in r.search(moved, 5)[0]]
    assert [n.case_id for n in liked.neighbors] == expected
    with pytest.raises(CasebaseError, match="unknown case ids nope, zz"):
        r.query(img, like=["nope", top], unlike=["zz"])
    with pytest.raises(CasebaseError, match="both liked and unliked"):
        r.query(img, like=[top], unlike=[top])


def test_region_query(r, phantom_dir):
    img = _query_image(phantom_dir, 2)
    h, w = r.encode(img).geometry.original_size
    box = (0, 0, w // 2, h // 2)
    res = r.query(img, k=5, region=box)
    js = res.to_json()
    assert js["region"] == list(box) and "region_note" not in js
    scores = [n["region_score"] for n in js["neighbors"]]
    assert scores == sorted(scores, reverse=True)
    # the scores are exact MaxSim over the stored cells
    q = r.encode(img)
    qz, _ = r.query_cells(q)
    sel = refine.select_cells(box, q.geometry, q.grid)
    qu = refine.unit(qz[sel.cells.ravel()])
    brute = [
        float((qu @ refine.unit(r.region_index.case(i)[0]).T).max(axis=1).mean())
        for i in range(len(r.cases))
    ]
    best = np.argsort(brute)[::-1][:5]
    assert [n.row for n in res.neighbors] == best.tolist()
    np.testing.assert_allclose(scores, np.array(brute)[best], atol=1e-5)
    for nb in js["neighbors"]:
        for reg in nb["matched_regions"]:
            x0, y0, x1, y1 = reg["query_box"]
            assert box[0] <= x0 < x1 <= box[2] and box[1] <= y0 < y1 <= box[3]
    # a box smaller than a cell is widened, and said
    small = r.query(img, k=2, region=(1, 1, 3, 3)).to_json()
    assert "widened" in small["region_note"] and small["region"] == [1, 1, 3, 3]
    unl = r.query(img, k=5, region=box, unlike=[res.neighbors[0].case_id])
    assert res.neighbors[0].case_id not in [n.case_id for n in unl.neighbors]
    with pytest.raises(CasebaseError, match="outside the image"):
        r.query(img, region=(0, 0, w + 5, h))


def test_cli_region_and_feedback(tiny_index, phantom_dir, capsys):
    img = str(_query_image(phantom_dir))
    assert (
        main(["query", tiny_index.as_posix(), img, "-k", "3", "--region", "0,0,32,32", "--json"])
        == 0
    )
    js = json.loads(capsys.readouterr().out)
    assert js["region"] == [0, 0, 32, 32] and all("region_score" in n for n in js["neighbors"])
    assert main(["query", str(tiny_index), img, "--unlike", "no_such_case"]) == 2
    err = capsys.readouterr().err
    assert "unknown case id no_such_case" in err and "Traceback" not in err
    assert main(["query", str(tiny_index), img, "--region", "30,30,10,40"]) == 2
    assert "inverted" in capsys.readouterr().err


def test_format_1_bundle_still_loads_and_falls_back(
    tiny_index, tmp_path, monkeypatch, capsys, phantom_dir
):
    old = tmp_path / "old"
    shutil.copytree(tiny_index, old)
    shutil.rmtree(old / "regions")
    meta = json.loads((old / "bundle.json").read_text())
    meta.pop("regions")
    monkeypatch.setattr(bundle, "FORMAT_VERSION", 1)
    bundle.seal(old, meta)
    monkeypatch.undo()
    r1 = CaseRetriever.load(old)
    assert r1.meta["format_version"] == 1 and r1.region_index is None
    assert "no region index" in capsys.readouterr().err  # said once...
    CaseRetriever.load(old)
    assert capsys.readouterr().err == ""  # ...not twice
    res = r1.query(_query_image(phantom_dir), k=3)
    assert all(n.matched_regions for n in res.neighbors)  # by re-encoding, as before
    with pytest.raises(CasebaseError, match="casebase index build"):
        r1.query(_query_image(phantom_dir), region=(0, 0, 32, 32))
