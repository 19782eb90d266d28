"""Query findings: a set from too few calibration cases says it holds every class and why; a
filter that matches no indexed case is a one-line error naming the values the column has; the
text output prints small OOD scores with significant digits and says when the query is an
indexed case itself."""

from __future__ import annotations

import json
import re
import types

import numpy as np
import pandas as pd
import pytest
import torch

from retrieval.cli import main
from retrieval.errors import CasebaseError
from retrieval.service import conformal
from retrieval.service.results import Prediction
from retrieval.service.retriever import CaseRetriever


def _fake_retriever(n_cal: int, classes=("alpha", "beta")):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(len(classes)), n_cal)
    y = np.arange(n_cal) % len(classes)
    heads = {
        "classifier": conformal.ConformalHead.calibrate(probs, y),
        "knn_vote": conformal.ConformalHead.calibrate(probs, y, seed=1),
    }
    cal = conformal.ConformalCalibration(0.9, f"the val split ({n_cal} cases)", n_cal, heads=heads)
    cases = pd.DataFrame({"label": list(classes) * 3, "site": ["A", "B", "A"] * len(classes)})
    return types.SimpleNamespace(
        conformal=cal,
        classes=list(classes),
        cases=cases,
        attribute_names=["site"],
        _patients=np.array([""] * len(cases)),
        search=lambda vec, k, exclude_patient=None: [[(0.9, 0), (0.8, 1)]],
    )


def _attach(r, coverage=None) -> Prediction:
    p = Prediction("beta", {"alpha": 0.01, "beta": 0.99})
    CaseRetriever.attach_sets(r, p, torch.zeros(4), coverage)
    return p


def test_min_calibration_is_where_qhat_becomes_finite():
    for cov in (0.5, 0.8, 0.9, 0.95, 0.99):
        need = conformal.min_calibration(cov)
        assert np.isfinite(conformal.conformal_quantile(np.arange(need), cov))
        assert not np.isfinite(conformal.conformal_quantile(np.arange(need - 1), cov))
    assert conformal.min_calibration(0.9) == 9


def test_too_few_calibration_cases_flag_the_set_and_say_why():
    p = _attach(_fake_retriever(6))
    assert sorted(p.set) == ["alpha", "beta"]  # every class, whatever the image
    why = "only 6 calibration cases: a 90% set needs at least 9, so it holds every class"
    assert p.set_uninformative == why
    js = p.set_json()
    assert js["set_informative"] is False and js["set_uninformative_reason"] == why
    assert js["n_calibration"] == 6
    assert why in conformal.describe_set(p)
    # the same 6 cases support a 50% set: no flag
    p = _attach(_fake_retriever(6), coverage=0.5)
    assert p.set_uninformative is None and p.set_json()["set_informative"] is True
    # enough cases for 90%: no flag
    p = _attach(_fake_retriever(30))
    assert p.set_uninformative is None and "calibration cases" not in conformal.describe_set(p)


def test_filter_matching_no_case_is_an_error_naming_the_values():
    r = _fake_retriever(10)
    with pytest.raises(
        CasebaseError, match=r"filter site=Z matches no indexed case; site has 'A', 'B'"
    ):
        CaseRetriever._allowed(r, None, {"site": ["Z"]})
    assert CaseRetriever._allowed(r, None, {"site": ["Z", "B"]}).sum() == 2  # one value matches
    r.cases["view"] = ["PA"] * 3 + ["AP"] * 3
    r.cases["site"] = ["A"] * 3 + ["B"] * 3
    with pytest.raises(CasebaseError, match="match no indexed case together"):
        CaseRetriever._allowed(r, None, {"site": ["A"], "view": ["AP"]})


def test_cli_filter_matching_nothing_exits_with_one_line(tiny_index, phantom_dir, capsys):
    cases = pd.read_csv(phantom_dir / "manifest.csv")
    image = str(phantom_dir / cases["image"].iloc[0])
    rc = main(["query", str(tiny_index), image, "--filter", "site=nowhere", "--json"])
    captured = capsys.readouterr()
    assert rc != 0 and captured.out == ""
    err = captured.err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "site=nowhere matches no indexed case" in err
    assert any(repr(str(s)) in err for s in cases["site"].unique())


def test_cli_text_ood_digits_and_self_match(tiny_index, capsys):
    r = CaseRetriever.load(tiny_index)
    image = r.cases["image"].iloc[0]  # an indexed case queried again
    assert main(["query", str(tiny_index), image, "-k", "2", "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["self_match"] is not None
    assert main(["query", str(tiny_index), image, "-k", "2"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("OOD score"))
    score, thr = (float(v) for v in re.findall(r"OOD score (\S+) \(threshold ([^)]+)\)", line)[0])
    assert score == pytest.approx(js["ood"]["score"], rel=5e-3)
    assert thr == pytest.approx(js["ood"]["threshold"], rel=5e-3)
    assert f"note: the query is indexed case {js['self_match']['case_id']} itself" in out
    # the headline's confidence is the probabilities line's number
    pred = js["prediction"]
    shown = pred["calibrated_probabilities"] or pred["probabilities"]
    assert f"{pred['label']} {shown[pred['label']]:.2f}" in out
