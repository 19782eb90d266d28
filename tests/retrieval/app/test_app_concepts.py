"""The app's concept sliders (SMILY-like): one per concept stored in the bundle, and the
chosen weights reach CaseRetriever.query(concepts=...). Headless, as test_app_unit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

APP = Path(__file__).resolve().parents[3] / "app.py"


@pytest.fixture(scope="module")
def concept_index(tmp_path_factory, tiny_index, phantom_dir):
    from retrieval.cli import main
    from retrieval.data.phantom import write_concept_images

    root = tmp_path_factory.mktemp("app_concepts")
    idx = root / "index"
    shutil.copytree(tiny_index, idx)
    write_concept_images(root / "marker", "marker", "xray", n=8, size=64, site="A")
    code = main(
        ["concepts", str(idx), "--concept", f"marker={root / 'marker'}",
         "--manifest", str(phantom_dir / "manifest.csv"), "--random-runs", "2",
         "--max-images", "8", "--per-class", "4", "--store"]
    )  # fmt: skip
    assert code == 0
    return idx


def _app(monkeypatch, index: Path, manifest: Path) -> AppTest:
    monkeypatch.setenv("CASEBASE_INDEX", str(index))
    monkeypatch.setenv("CASEBASE_MANIFEST", str(manifest))
    at = AppTest.from_file(str(APP), default_timeout=180).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_slider_per_stored_concept_reaches_the_query(monkeypatch, concept_index, phantom_dir):
    from retrieval.service.retriever import CaseRetriever

    seen = {}
    real = CaseRetriever.query

    def spy(self, image, **kw):
        seen.update(kw)
        return real(self, image, **kw)

    monkeypatch.setattr(CaseRetriever, "query", spy)
    at = _app(monkeypatch, concept_index, phantom_dir / "manifest.csv")
    assert "Refine by concept" in [s.value for s in at.sidebar.subheader]
    at.button[0].click().run()
    assert not at.exception and seen["concepts"] is None  # weight 0: a plain search
    at.slider(key="concept_marker").set_value(-1.0).run()
    assert any("settings changed" in c.value for c in at.caption)
    at.button[0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert seen["concepts"] == {"marker": -1.0}
    gallery = [c.value for c in at.caption if c.value.startswith("case_") and " · sim " in c.value]
    assert len(gallery) == 5


def test_no_sliders_without_stored_concepts(monkeypatch, tiny_index, phantom_dir):
    at = _app(monkeypatch, tiny_index, phantom_dir / "manifest.csv")
    assert "Refine by concept" not in [s.value for s in at.sidebar.subheader]
    assert not [s for s in at.slider if str(s.key).startswith("concept_")]
