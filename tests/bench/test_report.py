"""bench.report: the docs' figures are regenerated from JSON, and a hand edit is caught."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from bench import report

ROOT = Path(__file__).resolve().parents[2]


def test_docs_match_their_json():
    """The CI check: every block and inline figure in README.md and docs/results.md matches."""
    assert report.run(report.DOCS, check=True) == 0


def _copy_docs(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "docs" / "results.md", tmp_path / "results.md")
    return tmp_path / "results.md"


def test_hand_edited_number_in_a_block_fails_naming_it(tmp_path, capsys):
    doc = _copy_docs(tmp_path)
    text = doc.read_text()
    m = re.search(r"<!-- bench:(\w+) -->\n.*?(\d+\.\d+)", text, re.S)
    assert m, "docs/results.md has no generated block with a number"
    i = m.start(2)
    doc.write_text(text[:i] + "9" + text[i + 1 :])
    assert report.run([doc], check=True) == 1
    err = capsys.readouterr().err
    assert f"block {m.group(1)}" in err


def test_inline_figure_is_checked_and_regenerated(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / "toy.json").write_text(
        json.dumps({"runs": [{"n": 10, "p5": 0.9512}, {"n": 20, "p5": 0.5}]})
    )
    doc = tmp_path / "doc.md"
    fig = "<!-- fig toy:runs[n=10].p5 .2f -->{}<!-- /fig -->"
    doc.write_text("P@5 is " + fig.format("0.95") + " here.\n")
    assert report.run([doc], check=True, results=results) == 0
    doc.write_text("P@5 is " + fig.format("0.97") + " here.\n")
    assert report.run([doc], check=True, results=results) == 1
    assert "figure toy:runs[n=10].p5" in capsys.readouterr().err
    assert report.run([doc], check=False, results=results) == 0
    assert fig.format("0.95") in doc.read_text()


def test_missing_json_is_a_named_failure(tmp_path, capsys):
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- bench:query_latency -->\nold\n<!-- /bench:query_latency -->\n")
    assert report.run([doc], check=True, results=tmp_path) == 1
    assert "query_latency.json is missing" in capsys.readouterr().err


def test_percent_format():
    assert report.fmt(0.8734, ".1%") == "87.3%"


def test_heldout_power_by_strength_of_use_counts_only_used_runs_in_its_band():
    def run(cond, pull, flagged):
        attr = report.HELDOUT_ATTR[cond]
        return {
            "condition": cond,
            "seed": 0,
            "used": None if pull is None else pull >= 0.05,
            "intervention": None if pull is None else {"pull": pull},
            "attributes": {attr: {"flagged": flagged}},
        }

    doc = {
        "runs": [
            run("ruler", 0.6, True),
            run("device", 0.2, True),
            run("device", 0.15, False),  # strong band starts at 0.15
            run("marker", 0.1, False),
            run("marker", 0.06, True),
            run("marker", 0.01, True),  # ignored: not a use, in no band
            run("tag", None, False),
        ]
    }
    assert report._pooled_power([doc], 0.15).startswith("2/3 = 0.67 [")
    assert report._pooled_power([doc], 0.05, 0.15).startswith("1/2 = 0.50 [")
    assert report._pooled_power([doc, doc]).startswith("6/10 = 0.60 [")
    assert report._pooled_power([doc], 0.9) == "no run"
    assert "marker seed 0 (pull 0.10" in report._heldout_misses(
        {"runs": [dict(run("marker", 0.1, False), attributes={"site": {"flagged": False}})]}
    )
