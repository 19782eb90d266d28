"""Attribute selection and binning, the flag rule, and per-group precision."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from retrieval.audit import verdict
from retrieval.audit.attributes import code_attribute, select_attributes
from retrieval.audit.groups import group_precision, label_precision, spread
from retrieval.errors import CasebaseError


def _frames():
    rng = np.random.default_rng(0)
    n, m = 200, 40
    index = pd.DataFrame(
        {
            "site": rng.choice(["A", "B", "C"], n),
            "age": rng.integers(20, 90, n).astype(str),
            "const": ["x"] * n,
            "accession": [f"acc{i}" for i in range(n)],
            "grade": rng.choice(["1", "2", "3"], n),  # numeric but few values: categorical
        }
    )
    query = pd.DataFrame({c: index[c].iloc[:m].to_numpy() for c in index})
    query.loc[0, "site"] = ""  # missing
    query.loc[1, "age"] = "150"  # outside the indexed range -> last bin
    return index, query


def test_default_selection_and_binning():
    index, query = _frames()
    attrs, skipped = select_attributes(index, query, list(index.columns), None)
    by = {a.name: a for a in attrs}
    assert set(by) == {"site", "age", "grade"}
    assert set(skipped) == {"const", "accession"}
    assert by["site"].kind == "categorical" and by["site"].groups == ["A", "B", "C"]
    assert by["site"].query_codes[0] == -1
    assert by["grade"].kind == "categorical"
    age = by["age"]
    assert age.kind == "binned" and "quartiles" in age.binning and len(age.groups) == 4
    counts = np.bincount(age.index_codes, minlength=4)
    assert counts.min() > 30  # roughly equal-count bins
    assert age.query_codes[1] == 3
    assert age.groups[-1].endswith("]")


def test_a_manifest_column_the_index_lacks_is_named_as_skipped():
    index, query = _frames()
    query["orig_size"] = "300x200"
    query["image"] = "x.png"  # core columns are no attributes
    _, skipped = select_attributes(index, query, list(index.columns), None)
    assert "not in the index" in skipped["orig_size"] and "image" not in skipped


def test_requested_attributes_are_checked():
    index, query = _frames()
    with pytest.raises(CasebaseError, match="unknown attribute.*scanner.*site"):
        select_attributes(index, query, list(index.columns), ["site", "scanner"])
    with pytest.raises(CasebaseError, match="cannot be audited"):
        select_attributes(index, query, list(index.columns), ["const"])
    attrs, _ = select_attributes(index, query, list(index.columns), ["age"])
    assert [a.name for a in attrs] == ["age"]


def test_code_attribute_reasons():
    s = pd.Series(["1"] * 10)
    assert "nothing to compare" in code_attribute("x", s, s)


def test_decide():
    flagged, bias, reasons = verdict.decide(0.001, 1.5, 0.7, 1 / 3, (0.8, 1e-30))
    assert flagged and not bias and len(reasons) == 3
    # the query-side test alone is enough (a label-proxy shortcut)
    flagged, _, reasons = verdict.decide(0.5, 1.0, 0.7, 1 / 3, (0.8, 1e-30), 0.001, 1.3)
    assert flagged and len(reasons) == 4 and "query-side null" in reasons[1]
    assert not verdict.decide(0.5, 1.0, 0.7, 1 / 3, (0.8, 1e-30), 0.02, 1.3)[0]
    # same evidence, but the attribute says nothing about the label: retrieval bias, not a shortcut
    flagged, bias, _ = verdict.decide(0.001, 1.5, 0.7, 1 / 3, (0.03, 0.6))
    assert not flagged and bias
    for args in [(0.02, 1.5, 0.7, 1 / 3), (0.001, 1.02, 0.7, 1 / 3), (0.001, 1.5, 0.4, 1 / 3)]:
        assert verdict.decide(*args, (0.8, 1e-30))[:2] == (False, False)
    flagged, _, reasons = verdict.decide(0.001, 1.5, None, None, (0.8, 1e-30))
    assert flagged and any("probe not available" in r for r in reasons)
    _, _, reasons = verdict.decide(1.0, 1.0, None, None, (0.99, 1e-30))
    assert any("cannot separate" in r for r in reasons)


def test_label_association():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 600)
    v, p = verdict.label_association(rng.integers(0, 3, 600), labels)
    assert v < 0.1 and p > 0.001
    v, p = verdict.label_association(labels.copy(), labels)
    assert v == pytest.approx(1.0) and p < 1e-10
    assert verdict.label_association(np.zeros(5, int), labels[:5]) == (None, None)


def test_group_precision():
    from retrieval.audit.attributes import CodedAttribute

    nb_labels = np.array([["a"] * 5, ["a", "a", "b", "b", "b"], ["b"] * 5, ["a"] * 5])
    valid = np.ones((4, 5), bool)
    prec = label_precision(nb_labels, valid, np.array(["a", "a", "a", "b"]))
    assert prec.tolist() == [1.0, 0.4, 0.0, 0.0]
    attr = CodedAttribute(
        "site",
        "categorical",
        None,
        ["A", "B", "C"],
        np.zeros(1, np.int16),
        np.array([0, 0, 1, -1], np.int16),
    )
    g = group_precision(attr, prec)
    assert g["A"]["n"] == 2 and g["A"]["precision_at_5"] == pytest.approx(0.7)
    assert g["B"] == {
        "n": 1,
        "precision_at_5": 0.0,
        "interval": [pytest.approx(np.nan, nan_ok=True)] * 2,
    }
    assert g["C"]["n"] == 0 and g["C"]["precision_at_5"] is None
    assert spread(g, min_n=1) == pytest.approx(0.7)
    assert spread(g, min_n=5) is None


def test_lesion_columns_are_findings_not_audited_by_default():
    """lesion_* columns describe the finding itself: a retrieval that shares them is doing its job."""
    index, query = _frames()
    index["lesion_size"] = np.resize(["small", "large"], len(index))
    query["lesion_size"] = np.resize(["small", "large"], len(query))
    attrs, skipped = select_attributes(index, query, list(index.columns), None)
    assert "lesion_size" not in {a.name for a in attrs}
    attrs, _ = select_attributes(index, query, list(index.columns), ["lesion_size"])
    assert [a.name for a in attrs] == ["lesion_size"]
