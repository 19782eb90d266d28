"""The whole audit on a tiny trained index: JSON contract, HTML report, CLI, screenshot."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from index import bundle
from retrieval.cli import main
from retrieval.data.phantom import FACTOR_COLUMNS
from retrieval.service.retriever import CaseRetriever

ROOT = Path(__file__).resolve().parents[3]
ATTR_KEYS = {
    "concordance",
    "expected",
    "lift",
    "p_value",
    "probe_balanced_accuracy",
    "chance",
    "flagged",
}
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def audit(tiny_index, phantom_dir):
    from retrieval.audit import run_audit

    r = CaseRetriever.load(tiny_index, device="cpu")
    return run_audit(
        r, phantom_dir / "manifest.csv", "test", None, permutations=99, seed=0, progress=False
    )


@pytest.fixture(scope="module")
def report_html(audit):
    from retrieval.audit.report import render_html

    return render_html(audit.data, audit.examples)


def test_json_contract(audit, phantom_dir):
    d = audit.data
    json.dumps(d, allow_nan=False)  # strict JSON: no NaN / inf
    assert set(d["attributes"]) == {"site", "sex", "age", "scanner"}
    for name, v in d["attributes"].items():
        assert ATTR_KEYS <= set(v), name
        assert isinstance(v["flagged"], bool)
        assert 0 < v["p_value"] <= 1 and v["p_value"] <= v["p_value_holm"] <= 1
        assert (
            v["permutations"] == 1599
        )  # raised: Holm over 2 tests x 4 attributes can reach p < 0.01
        assert v["query_null"]["permutations"] == 1599 and 0 < v["query_null"]["p_value"] <= 1
        # the weakest lift each test could flag on these 9 queries: above the rule's floor
        for side in (v, v["query_null"]):
            assert side["detectable_lift"] is None or side["detectable_lift"] >= 1.05
        assert v["query_null"]["detectable_lift"] is not None
    assert (
        d["attributes"]["age"]["kind"] == "binned"
        and "quartiles" in d["attributes"]["age"]["binning"]
    )
    assert d["n_queries"] == 9  # the phantom's test split
    for groups in d["groups"].values():
        assert sum(g["n"] for g in groups.values()) <= d["n_queries"]
        for g in groups.values():
            assert set(g) >= {"n", "precision_at_5"}
    cf = d["counterfactual"]
    assert cf["n_queries"] == 9 and cf["max_queries"] == 200
    for cond in ("original", "lesion_removed", "background_removed"):
        assert 0 <= cf["masked_retrieval"][cond]["precision_at_5"] <= 1
    assert 0 <= cf["similarity_in_lesion"]["query"] <= 1
    assert {
        "near_duplicates",
        "identical_pixels",
        "own_patient_neighbors",
        "shared_case_ids",
    } <= set(d["leakage"])
    assert "flag_rule" in d


def test_report_is_self_contained_and_phi_free(report_html, phantom_dir, tiny_index, audit):
    html = report_html
    assert html.startswith("<!DOCTYPE html>")
    srcs = re.findall(r"""\bsrc\s*=\s*["']?([^"'\s>]+)""", html, re.I)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"\bhref\s*=", html, re.I)
    assert not re.search(r"<script|<link|<iframe|@import|url\(", html, re.I)
    assert "PatientName" not in html and "PHANTOM^" not in html
    assert str(phantom_dir) not in html and str(tiny_index) not in html  # no file paths
    r = CaseRetriever.load(tiny_index, device="cpu", verify=False)
    for pid in set(r.cases["patient_id"]):
        assert pid not in html  # not even hashed patient ids
    assert html.count("<img") >= 4  # concordance, probe, groups, counterfactual (+ examples)
    # the verdicts' limits travel with them: the held-out miss is stated in the report
    assert "How far a verdict goes" in html and "not proof" in html
    assert "this audit can flag an attribute only from a lift of" in html
    # worst examples show the score the app shows, not only raw cosines that all read ~1.000
    assert audit.examples
    for ex in audit.examples:
        for p in ex.neighbors:
            assert p.score is not None and 0.0 <= p.score <= 1.0
            assert f"score {p.score:.2f}, cosine" in html


@pytest.mark.browser
def test_screenshot(report_html, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is absent (the test command installs Debian's chromium)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    page_file = tmp_path / "report.html"
    page_file.write_text(report_html, encoding="utf-8")
    artifacts = ROOT / "artifacts"
    artifacts.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(page_file.as_uri())
            page.wait_for_load_state("load")
            widths = page.evaluate(
                "Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)"
            )
            page.screenshot(path=str(artifacts / "audit_report.png"), full_page=True)
        finally:
            browser.close()
    assert len(widths) >= 4 and all(w > 0 for w in widths)
    assert (artifacts / "audit_report.png").stat().st_size > 10_000


def test_cli_json_stores_report_in_bundle(tiny_index, phantom_dir, tmp_path, capsys):
    idx = tmp_path / "index"
    shutil.copytree(tiny_index, idx)
    out = tmp_path / "report.html"
    rc = main(
        [
            "audit",
            str(idx),
            str(phantom_dir / "manifest.csv"),
            "--json",
            "--permutations",
            "49",
            "--attributes",
            "site,sex",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert set(d["attributes"]) == {"site", "sex"}
    assert set(d["groups"]) == {"site", "sex"}
    assert out.read_text().startswith("<!DOCTYPE html>")
    meta = bundle.verify(idx)  # still a valid bundle, with the report listed
    assert {"audit/report.html", "audit/audit.json"} <= set(meta["files"])
    stored = json.loads((idx / "audit" / "audit.json").read_text())
    assert stored["attributes"]["site"]["p_value"] == d["attributes"]["site"]["p_value"]
    CaseRetriever.load(idx, device="cpu")


def test_cli_table_and_errors(tiny_index, phantom_dir, tmp_path, capsys):
    idx = tmp_path / "index"
    shutil.copytree(tiny_index, idx)
    manifest = str(phantom_dir / "manifest.csv")
    assert main(["audit", str(idx), manifest, "--attributes", "site,shoe_size"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        "Traceback" not in err and len(err.splitlines()) == 1
    )  # fails before embedding: no progress bar
    assert err == (
        "casebase audit: error: unknown attribute(s) shoe_size; the index has: site, sex, age, "
        "scanner, " + ", ".join(FACTOR_COLUMNS)
    )
    assert main(["audit", str(idx), manifest, "--split", "nosuch"]) == 2
    assert "no cases in split" in capsys.readouterr().err
    assert (
        main(["audit", str(idx), manifest, "--attributes", "scanner", "--permutations", "19"]) == 0
    )
    text = capsys.readouterr().out
    assert "concord." in text and "scanner" in text and "rule:" in text
    assert re.search(
        r"With 9 queries this audit can flag an attribute only from a lift of [\d.]+", text
    )


def test_rgb_photo_index(tiny_photo_index, photo_phantom_dir):
    """RGB images: masks, lesion removal, overlays and the report work on three channels too."""
    from retrieval.audit import run_audit
    from retrieval.audit.report import render_html

    r = CaseRetriever.load(tiny_photo_index, device="cpu")
    res = run_audit(
        r, photo_phantom_dir / "manifest.csv", permutations=19, progress=False, max_counterfactual=4
    )
    assert "device" in res.data["attributes"]
    assert res.data["counterfactual"]["n_queries"] == 4
    html = render_html(res.data, res.examples)
    assert html.count("data:image/png;base64,") >= 4
