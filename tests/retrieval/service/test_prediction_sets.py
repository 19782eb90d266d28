"""Prediction sets end to end: calibrated at build, shown by query, measured by eval."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from index import bundle
from retrieval import CaseRetriever
from retrieval.cli import main
from retrieval.service.conformal import CONFORMAL_FILE, NO_SETS_NOTE
from retrieval.service.evaluate import evaluate


def _test_image(phantom):
    df = pd.read_csv(phantom / "manifest.csv", dtype=str).fillna("")
    return phantom / df[df["split"] == "test"].iloc[0]["image"]


def test_bundle_records_calibration(tiny_index):
    meta = bundle.verify(tiny_index)
    assert CONFORMAL_FILE in meta["files"]
    c = meta["calibration"]
    assert c["available"] and c["temperature"] > 0 and c["n"] >= 2
    assert c["calibrated_on"]  # which cases, in words
    assert meta["conformal"]["coverage"] == 0.9
    assert set(meta["conformal"]["methods"]) == {"classifier", "knn_vote"}


def test_query_json_carries_the_set(tiny_index, phantom_dir, capsys):
    assert main(["query", str(tiny_index), str(_test_image(phantom_dir)), "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    p = js["prediction"]
    classes = set(p["probabilities"])
    assert p["set_coverage"] == 0.9
    assert p["set"] and set(p["set"]) <= classes and p["label"] in p["set"]
    assert p["knn_set"] and set(p["knn_set"]) <= classes
    assert abs(sum(p["calibrated_probabilities"].values()) - 1) < 1e-6
    assert p["outcome"] in ("answer", "ambiguous", "unknown")
    if p["outcome"] == "ambiguous":
        assert js["explanation_text"].startswith("Ambiguous between")
        assert " or ".join(p["set"]) + ": 90% set" in js["explanation_text"]
    elif p["outcome"] == "answer":
        assert f"{p['label']}: 90% set" in js["explanation_text"]


def test_coverage_per_query_grows_the_set(tiny_index, phantom_dir):
    r = CaseRetriever.load(tiny_index)
    img = _test_image(phantom_dir)
    small = r.query(img, k=3, regions=False, coverage=0.3).prediction
    big = r.query(img, k=3, regions=False, coverage=0.999).prediction
    assert set(small.set) <= set(big.set)
    assert big.set_coverage == 0.999
    assert len(big.set) == len(r.classes)  # too few calibration cases for 99.9 %: every label
    assert main(["query", str(tiny_index), str(img), "--coverage", "1.5"]) == 2


def test_old_bundle_without_sets_still_loads_and_says_so(tiny_index, phantom_dir, tmp_path, capsys):
    old = tmp_path / "old_index"
    shutil.copytree(tiny_index, old)
    (old / CONFORMAL_FILE).unlink()
    meta = json.loads((old / bundle.BUNDLE_JSON).read_text())
    for key in ("conformal", "calibration"):
        meta.pop(key, None)
    bundle.seal(old, meta)
    r = CaseRetriever.load(old)
    res = r.query(_test_image(phantom_dir), k=3, regions=False)
    assert res.prediction.set is None and res.outcome in ("uncalibrated", "unknown")
    js = res.to_json()
    assert js["prediction"]["set"] is None and js["prediction"]["set_coverage"] is None
    if not res.ood.flag:
        assert NO_SETS_NOTE in res.explanation_text
    assert main(["query", str(old), str(_test_image(phantom_dir))]) == 0
    assert "rebuild" in capsys.readouterr().out
    rep = evaluate(r, phantom_dir / "manifest.csv", progress=False)
    assert rep.prediction_sets["coverage"] is None and "rebuild" in rep.prediction_sets["note"]
    assert rep.calibration["ece_after"] is None and rep.calibration["ece_before"] >= 0


def test_eval_reports_sets_calibration_and_plot(tiny_index, phantom_dir, tmp_path, capsys):
    png = tmp_path / "rel.png"
    args = ["eval", str(tiny_index), str(phantom_dir / "manifest.csv"), "--json"]
    assert main(args + ["--plot", str(png)]) == 0
    js = json.loads(capsys.readouterr().out)
    ps, cal = js["prediction_sets"], js["calibration"]
    assert ps["target_coverage"] == 0.9
    assert 0 <= ps["coverage"] <= 1 and 1 <= ps["mean_size"] <= 3
    assert ps["by_class"] and all("coverage" in v for v in ps["by_class"].values())
    n = sum(v["n"] for v in ps["by_class"].values())
    assert n == js["n_queries"]
    lo, hi = ps["coverage_ci95"]
    assert lo <= ps["coverage"] <= hi
    assert ps["randomized"]["mean_size"] <= ps["mean_size"]  # shown sets hold the randomised ones
    assert 0 <= ps["knn_vote"]["coverage"] <= 1
    assert cal["ece_before"] >= 0 and cal["ece_after"] >= 0 and cal["temperature"] > 0
    assert cal["plot"] == str(png) and png.read_bytes()[:4] == b"\x89PNG"
    assert main(args[:-1] + ["--coverage", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "50% prediction sets" in out and "ECE" in out


@pytest.mark.parametrize("mondrian", ["site"])
def test_mondrian_build_and_group_query(tiny_index, phantom_dir, tmp_path, mondrian):
    from index.builder import build_index

    out = tmp_path / "idx"
    build_index(
        tiny_index / "model",
        phantom_dir / "manifest.csv",
        out,
        progress=False,
        mondrian=mondrian,
        coverage=0.8,
    )
    r = CaseRetriever.load(out)
    assert r.conformal.group_attribute == "site" and r.conformal.coverage == 0.8
    head = r.conformal.heads["classifier"]
    site = str(head.groups[0])
    p = r.query(_test_image(phantom_dir), k=3, regions=False, group=site).prediction
    assert p.set_group == site and p.set_coverage == 0.8
    p = r.query(_test_image(phantom_dir), k=3, regions=False, group="nowhere").prediction
    assert p.set_group is None and "pooled" in p.set_note
    with pytest.raises(Exception, match="no such column"):
        build_index(
            tiny_index / "model",
            phantom_dir / "manifest.csv",
            tmp_path / "x",
            progress=False,
            mondrian="nonexistent",
        )
    assert np.isfinite(head.scores).all()
