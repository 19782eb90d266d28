"""`casebase audit` and `casebase eval` side by side: the report file's mode, what the audit
says about the bundle's copy, the exclusion wording, and age described the same way."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from html import unescape

import pytest

from retrieval.cli import main
from retrieval.service.retriever import CaseRetriever


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _audit(idx, manifest, *extra) -> list[str]:
    return [
        "audit",
        str(idx),
        str(manifest),
        "--attributes",
        "site",
        "--permutations",
        "19",
        *extra,
    ]


def test_audit_out_is_0644_and_says_when_it_replaces_the_bundle_copy(
    tiny_index, phantom_dir, tmp_path, capsys, umask_022
):
    idx = tmp_path / "index"
    shutil.copytree(tiny_index, idx)
    out = tmp_path / "report.html"
    manifest = phantom_dir / "manifest.csv"

    assert main(_audit(idx, manifest, "--out", str(out))) == 0
    first = capsys.readouterr().out
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    line = [x for x in first.splitlines() if x.strip().startswith("report:")][0]
    assert str(out) in line and str(idx / "audit" / "report.html") in line
    assert "written too" in line and "replaced" not in line

    assert main(_audit(idx, manifest, "--out", str(out), "--json")) == 0
    cap = capsys.readouterr()
    data = json.loads(cap.out)
    assert data["report"]["bundle_replaced"] is True
    assert "replaced too" in cap.err
    assert stat.S_IMODE(out.stat().st_mode) == 0o644

    # the header and the leakage line tell the same story about the own-patient exclusion
    html = out.read_text()
    assert data["queries_with_patient_id"] == data["n_queries"] > 0
    header = unescape(re.search(r"<h1>.*?</h1><p class=muted>(.*?)</p>", html, re.S).group(1))
    assert "the query's own patient excluded" in header
    assert "the leakage check searches without the exclusion" in header
    assert "exclusion off" not in html
    assert "searched without the exclusion (every other section excludes them)" in html


def test_exclusion_wording_follows_the_patient_ids():
    from retrieval.audit.report import exclusion_note

    assert exclusion_note({"n_queries": 10, "queries_with_patient_id": 10}) == (
        "the query's own patient excluded"
    )
    assert "not excluded" in exclusion_note({"n_queries": 10, "queries_with_patient_id": 0})
    assert "4 of 10" in exclusion_note({"n_queries": 10, "queries_with_patient_id": 4})


def test_eval_and_audit_describe_age_the_same_way(tiny_index, phantom_dir, capsys):
    from retrieval.audit import run_audit
    from retrieval.service.evaluate import evaluate

    manifest = phantom_dir / "manifest.csv"
    r = CaseRetriever.load(tiny_index, device="cpu")
    rep = evaluate(r, manifest, "test", progress=False)
    aud = run_audit(
        r,
        manifest,
        "test",
        ["age", "site"],
        permutations=0,
        progress=False,
        max_counterfactual=0,
        examples=False,
        hash_pixels=False,
    ).data
    age = aud["attributes"]["age"]
    assert age["kind"] == "binned"
    assert rep.attribute_binning["age"] == age["binning"]
    assert rep.attribute_agreement["age"] == pytest.approx(age["concordance"], abs=1e-9)
    assert rep.attribute_agreement["site"] == pytest.approx(
        aud["attributes"]["site"]["concordance"], abs=1e-9
    )
    assert "site" not in rep.attribute_binning

    assert main(["eval", str(tiny_index), str(manifest), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert f"age: {age['binning']}" in text
