"""CaseRetriever end to end on tiny phantoms of both modalities."""

import json

import numpy as np
import pandas as pd
import pytest

from index import bundle
from retrieval import CaseRetriever
from retrieval.cli import main
from retrieval.errors import CasebaseError

CONTRACT_KEYS = {"prediction", "knn_vote", "ood", "neighbors", "explanation_text", "maps"}


def _test_cases(phantom):
    df = pd.read_csv(phantom / "manifest.csv", dtype=str).fillna("")
    return df[df["split"] == "test"]


@pytest.mark.parametrize("which", ["tiny_index", "tiny_photo_index"])
def test_query_returns_contract_and_exact_regions(request, which):
    index_dir = request.getfixturevalue(which)
    phantom = request.getfixturevalue(
        "phantom_dir" if which == "tiny_index" else "photo_phantom_dir"
    )
    r = CaseRetriever.load(index_dir)
    case = _test_cases(phantom).iloc[0]
    res = r.query(phantom / case["image"], k=4)
    js = res.to_json()
    assert CONTRACT_KEYS <= set(js)
    assert set(js["prediction"]["probabilities"]) == set(r.classes)
    assert abs(sum(js["prediction"]["probabilities"].values()) - 1) < 1e-5
    assert abs(sum(js["knn_vote"].values()) - 1) < 1e-5
    assert len(js["neighbors"]) == 4
    sims = [n["similarity"] for n in js["neighbors"]]
    assert sims == sorted(sims, reverse=True)
    scores = [n["similarity_score"] for n in js["neighbors"]]  # calibrated at index build
    assert scores == sorted(scores, reverse=True) and all(0 <= v <= 1 for v in scores)
    assert js["similarity_scale"]["calibrated"] is True
    h, w = res.original_size
    for nb in res.neighbors:
        assert nb.completeness_error < 1e-4
        assert nb.matched_regions, "every neighbour has at least one matched region"
        ch, cw = nb.original_size
        for reg in nb.matched_regions:
            assert reg.contribution > 0
            assert reg.share == pytest.approx(reg.contribution / nb.similarity)
            x0, y0, x1, y1 = reg.query_box
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            x0, y0, x1, y1 = reg.case_box
            assert 0 <= x0 < x1 <= cw and 0 <= y0 < y1 <= ch
    assert res.prediction.label in js["explanation_text"]
    json.dumps(js)  # serialisable


def test_exclude_patient_and_filters(tiny_index):
    r = CaseRetriever.load(tiny_index)
    row = r.cases.iloc[0]
    res = r.query(row["image"], k=5)
    assert res.neighbors[0].case_id == row["case_id"]  # an indexed image finds itself first
    res = r.query(row["image"], k=5, exclude_patient=row["patient_id"])
    assert all(n.patient_id != row["patient_id"] for n in res.neighbors)
    site = r.cases["site"].iloc[0]
    res = r.query(row["image"], k=3, filters={"site": site})
    assert res.neighbors and all(n.attributes["site"] == site for n in res.neighbors)
    with pytest.raises(CasebaseError, match="unknown filter attribute"):
        r.query(row["image"], filters={"nope": "x"})


def test_grayscale_query_to_rgb_model_and_back(tiny_photo_index, tiny_index):
    gray = np.random.default_rng(0).random((50, 70)).astype(np.float32)
    rgb = np.random.default_rng(1).random((40, 40, 3)).astype(np.float32)
    assert CaseRetriever.load(tiny_photo_index).query(gray, k=2).neighbors
    assert CaseRetriever.load(tiny_index).query(rgb, k=2).neighbors


def test_embed_matches_stored_vectors(tiny_index):
    import torch

    r = CaseRetriever.load(tiny_index)
    rows = r.cases.index[:3]
    batch = torch.stack([r.preprocess(r.cases.at[i, "image"]) for i in rows])
    emb = r.embed(batch).cpu().numpy()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb, r.index.reconstruct_all()[: len(rows)], atol=1e-4)


def test_cli_query_json_and_saved_maps(tiny_index, phantom_dir, tmp_path, capsys):
    case = _test_cases(phantom_dir).iloc[0]
    rc = main(
        [
            "query",
            str(tiny_index),
            str(phantom_dir / case["image"]),
            "-k",
            "3",
            "--json",
            "--explain",
            "similarity",
            "--save-maps",
            str(tmp_path / "maps"),
        ]
    )
    assert rc == 0
    js = json.loads(capsys.readouterr().out)
    assert CONTRACT_KEYS <= set(js) and len(js["neighbors"]) == 3
    arr = np.load(js["maps"]["similarity"], allow_pickle=False)
    from retrieval.data.imageio import read_image

    assert arr.shape == tuple(read_image(phantom_dir / case["image"]).original_size)
    assert arr.dtype == np.float32 and np.isfinite(arr).all()
    assert (tmp_path / "maps" / "similarity.png").is_file()


def test_reference_class_found_by_name_set_by_hand_and_refused_when_unknown(
    tiny_index, phantom_dir, capsys
):
    from retrieval.service.retriever import find_reference_class

    assert find_reference_class(["mass", "Normal", "nodule"]) == "Normal"
    assert find_reference_class(["No Finding", "effusion"]) == "No Finding"
    assert find_reference_class(["cavity", "mass", "nodule"]) is None
    r = CaseRetriever.load(tiny_index)
    assert r.reference_class is None and r.model.explain_reference is None  # no normal class
    assert r.set_reference_class("mass") == "mass" and r.model.explain_reference == 1
    assert r.set_reference_class("none") is None and r.model.explain_reference is None
    with pytest.raises(CasebaseError, match="not a class of this index"):
        r.set_reference_class("healthy")
    case = _test_cases(phantom_dir).iloc[0]
    image = str(phantom_dir / case["image"])
    assert main(["query", str(tiny_index), image, "--reference-class", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "'bogus' is not a class" in err and "Traceback" not in err
    assert main(["query", str(tiny_index), image, "--json", "--reference-class", "mass"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["reference_class"] == "mass"
    contrasted = js["prediction"]["label"] != "mass"  # the reference class keeps its own logit
    assert main(["query", str(tiny_index), image, "--reference-class", "mass"]) == 0
    assert ("rather than mass" in capsys.readouterr().out) == contrasted
    assert main(["query", str(tiny_index), image, "--json", "--reference-class", "none"]) == 0
    assert json.loads(capsys.readouterr().out)["reference_class"] is None


def test_cli_errors_are_one_line(tiny_index, tmp_path, capsys):
    bad = tmp_path / "x.png"
    bad.write_text("not an image")
    assert main(["query", str(tiny_index), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "x.png" in err and "Traceback" not in err
    assert main(["query", str(tmp_path / "nope"), str(bad)]) == 2
    assert "no such index folder" in capsys.readouterr().err


def test_tampered_bundle_is_refused_at_load(tiny_index, tmp_path):
    import shutil

    copy = tmp_path / "idx"
    shutil.copytree(tiny_index, copy)
    p = copy / "cases.parquet"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(CasebaseError, match="cases.parquet: checksum mismatch"):
        CaseRetriever.load(copy)


def test_eval_reports_contract_keys(tiny_index, phantom_dir, capsys):
    assert main(["eval", str(tiny_index), str(phantom_dir / "manifest.csv"), "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    for key in (
        "n_queries",
        "precision_at_1",
        "precision_at_5",
        "precision_at_10",
        "map_at_r",
        "knn_accuracy",
    ):
        assert 0.0 <= js[key] <= 1.0 or key == "n_queries"
    assert js["n_queries"] == len(_test_cases(phantom_dir))
    meta = bundle.verify(tiny_index)
    assert meta["embedding"]["weighting"] == "saliency"


def test_ood_query_borrows_no_trust(tiny_index, phantom_dir):
    """Trust measured in distribution is not shown for a query flagged "I don't know"."""
    r = CaseRetriever.load(tiny_index)
    r.trust = {"gradcam": {"summary": "points at the lesion 90% of the time", "n_cases": 12}}
    image = phantom_dir / _test_cases(phantom_dir)["image"].iloc[0]
    r.meta.setdefault("ood", {})["threshold"] = float("inf")  # nothing is out of distribution
    inside = r.query(image, k=3, explain=("gradcam",))
    assert not inside.ood.flag and inside.trust["gradcam"]["n_cases"] == 12
    r.meta["ood"]["threshold"] = -1.0  # everything is
    flagged = r.query(image, k=3, explain=("gradcam",))
    assert flagged.ood.flag
    assert flagged.trust == {} and flagged.to_json()["trust"] == {}
