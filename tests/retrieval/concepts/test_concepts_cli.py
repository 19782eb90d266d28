"""`casebase concepts` end to end on the tiny index: contract keys, --store, query --concept,
the audit's concepts section, and one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest

from index import bundle
from retrieval.cli import main
from retrieval.concepts.audit import influences, shortcuts
from retrieval.data.phantom import write_concept_images


@pytest.fixture(scope="module")
def concept_run(tmp_path_factory, tiny_index, phantom_dir):
    root = tmp_path_factory.mktemp("concepts")
    idx = root / "index"
    shutil.copytree(tiny_index, idx)
    write_concept_images(root / "marker", "marker", "xray", n=8, size=64, site="A")
    return root, idx


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_concepts_json_store_and_query(concept_run, phantom_dir, capsys):
    root, idx = concept_run
    code, out, err = _run(
        capsys,
        "concepts", str(idx),
        "--concept", f"marker={root / 'marker'}",
        "--concept", "scanner_acme=scanner:Acme",
        "--manifest", str(phantom_dir / "manifest.csv"),
        "--random-runs", "3", "--max-images", "8", "--per-class", "4",
        "--store", "--json", "--out", str(root / "c.html"),
    )  # fmt: skip
    assert code == 0, err
    data = json.loads(out)
    for name in ("marker", "scanner_acme"):
        c = data["concepts"][name]
        assert c["layer"] == data["layer"] and 0.0 <= c["cav_accuracy"] <= 1.0
        assert set(c["layers"]) == set(data["layers_tested"]) and len(c["layers"]) >= 2
        for target in ("classes", "similarity"):
            assert set(c[target]) == {"nodule", "mass", "cavity"}
            for t in c[target].values():
                assert 0.0 <= t["tcav_score"] <= 1.0 and 0.0 <= t["p_value"] <= 1.0
                assert isinstance(t["significant"], bool)
                assert len(t["scores"]) == len(t["random_scores"]) == 3
                assert t["p_value"] >= t["p_value_uncorrected"]  # Holm never lowers a p-value
    assert data["findings"] and all(f["text"] for f in data["findings"])
    html = (root / "c.html").read_text()
    assert "Concepts (TCAV)" in html and "data:image/png;base64" in html
    assert str(phantom_dir) not in html  # no file paths in the report
    # stored directions are covered by the bundle's checksums
    meta = bundle.verify(idx)
    assert {"concepts/directions.npy", "concepts/concepts.json"} <= set(meta["files"])
    img = next((phantom_dir / "images" / "nodule").iterdir())
    code, out, err = _run(capsys, "query", str(idx), str(img), "--json", "--concept", "marker=-1")
    assert code == 0, err
    res = json.loads(out)
    assert res["concepts"] == {"marker": -1.0} and len(res["neighbors"]) == 5
    code, out, err = _run(capsys, "query", str(idx), str(img), "--concept", "ruler=-1")
    assert code == 2 and "unknown concept 'ruler'" in err and "Traceback" not in err


def test_query_api_moves_the_ranking(concept_run, phantom_dir):
    from retrieval.service.retriever import CaseRetriever

    root, idx = concept_run
    r = CaseRetriever.load(idx)
    img = next((phantom_dir / "images" / "mass").iterdir())
    plain = r.query(img, k=10, regions=False)
    moved = r.query(img, k=10, regions=False, concepts={"scanner_acme": -3.0})
    assert moved.concepts == {"scanner_acme": -3.0} and plain.concepts is None
    assert [n.case_id for n in plain.neighbors] != [n.case_id for n in moved.neighbors]


def test_stored_concepts_are_tamper_evident(concept_run, tmp_path):
    _, idx = concept_run
    copy = tmp_path / "idx"
    shutil.copytree(idx, copy)
    p = copy / "concepts" / "directions.npy"
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 1
    p.write_bytes(bytes(raw))
    with pytest.raises(Exception, match="checksum mismatch"):
        bundle.verify(copy)


def test_bad_specs_are_one_line_errors(concept_run, capsys):
    root, idx = concept_run
    for spec, msg in (
        ("x=/no/such/folder", "neither a folder"),
        ("x=nocolumn:1", "not a column"),
        ("x=scanner:Nobody", "no case has scanner='Nobody'"),
        ("novalue", "NAME=SPEC"),
    ):
        code, _, err = _run(capsys, "concepts", str(idx), "--concept", spec)
        assert code == 2 and msg in err and "Traceback" not in err, err
    code, _, err = _run(
        capsys, "concepts", str(idx), "--concept", f"m={root / 'marker'}", "--layer",
        "backbone.features.6",
    )  # fmt: skip
    assert code == 2 and "last block" in err


def test_audit_shortcut_rule_and_section():
    from retrieval.audit.report import render_html

    def t(score, rnd, p, sig):
        return {"tcav_score": score, "random_mean": rnd, "random_std": 0.1, "p_value": p,
                "significant": sig, "scores": [score] * 3, "random_scores": [rnd] * 3}  # fmt: skip

    concepts = {
        "concepts": {
            "marker": {
                "layer": "backbone.features.4", "cav_accuracy": 0.9, "n_images": 8,
                "classes": {"nodule": t(0.9, 0.5, 0.001, True), "mass": t(0.1, 0.5, 0.001, True)},
                "similarity": {"nodule": t(0.6, 0.5, 0.4, False)},
                "layers": {},
            }
        }
    }  # fmt: skip
    found = shortcuts(concepts)
    # significant and rising: a shortcut; significant but falling, or not significant: not
    assert [(f["concept"], f["class"], f["target"]) for f in found] == [
        ("marker", "nodule", "classes")
    ]
    # the significant falling one is an influence (the artefact moves the model away from mass)
    moved = influences(concepts)
    assert [(f["concept"], f["class"], f["direction"]) for f in moved] == [
        ("marker", "mass", "falls")
    ]
    assert "away from mass" in moved[0]["text"] and found[0]["direction"] == "rises"
    html = render_html(
        {
            "attributes": {},
            "concepts": concepts,
            "concept_shortcuts": found,
            "concept_influences": moved,
        }
    )
    assert "Concept shortcut:" in html and "Concepts (TCAV)" in html
    assert "Concept influence:" in html and "away from mass" in html
