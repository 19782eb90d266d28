"""The Streamlit app, run headless in-process with streamlit.testing (no browser, no server).

The app takes its index from ``CASEBASE_INDEX`` / ``CASEBASE_MANIFEST`` here
(the same as ``-- --index ... --manifest ...`` on the streamlit command line).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

APP = Path(__file__).resolve().parents[3] / "app.py"
TIMEOUT = 180  # the first run imports torch and loads the model; the CPU may be shared


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _texts(at: AppTest) -> str:
    parts = []
    for kind in ("markdown", "caption", "subheader", "info", "warning", "error", "title"):
        parts += [str(e.value) for e in getattr(at, kind)]
    return "\n".join(parts)


def _block(at: AppTest, key: str):
    """The container made with st.container(key=key), or None."""

    def find(node):
        proto = getattr(node, "proto", None)
        if proto is not None and str(getattr(proto, "id", "")).endswith("-" + key):
            return node
        for child in getattr(node, "children", {}).values():
            hit = find(child)
            if hit is not None:
                return hit
        return None

    return find(at._tree)


def _app(monkeypatch, index: Path | None, manifest: Path | None) -> AppTest:
    if index is None:
        monkeypatch.delenv("CASEBASE_INDEX", raising=False)
    else:
        monkeypatch.setenv("CASEBASE_INDEX", str(index))
    if manifest is None:
        monkeypatch.delenv("CASEBASE_MANIFEST", raising=False)
    else:
        monkeypatch.setenv("CASEBASE_MANIFEST", str(manifest))
    return AppTest.from_file(str(APP), default_timeout=TIMEOUT)


@pytest.fixture
def app(monkeypatch, tiny_index, phantom_dir) -> AppTest:
    at = _app(monkeypatch, tiny_index, phantom_dir / "manifest.csv").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_no_index_says_how_to_make_one(monkeypatch):
    at = _app(monkeypatch, None, None).run()
    assert not at.exception
    assert "casebase demo" in _texts(at)


def test_not_a_bundle_is_a_friendly_error(monkeypatch, tmp_path):
    at = _app(monkeypatch, tmp_path, None).run()
    assert not at.exception
    assert any("not an index bundle" in e.value for e in at.error)


def test_pick_a_test_case_and_query(app, phantom_dir):
    import pandas as pd

    test_ids = set(pd.read_csv(phantom_dir / "manifest.csv").query("split == 'test'")["case_id"])
    box = app.selectbox(key="case")
    assert box.value in test_ids
    # the picker shows case ids only: the label is the answer, shown after the query
    assert all(o in test_ids for o in box.options), box.options[:3]
    assert "Ground truth" not in _texts(app)
    assert app.multiselect[0].value == ["gradcam", "similarity"]
    app.button[0].click().run()
    assert not app.exception, [e.value for e in app.exception]
    assert not app.error, [e.value for e in app.error]
    heads = [s.value for s in app.subheader]
    for h in ("Prediction", "Explanation maps", "Nearest cases"):
        assert h in heads
    text = _texts(app)
    captions = [c.value for c in app.caption]
    gallery = [c for c in captions if c.startswith("case_") and " · sim " in c]
    assert len(gallery) == 5
    assert "Ground truth from the manifest" in text
    assert "pseudonymised" in text
    # every chosen map has a trust line (not measured on this tiny index)
    assert sum("explain-eval" in c for c in captions) == 2
    # no image path or file name on the page (only case ids, pseudonyms and attributes)
    assert ".dcm" not in text and "/images/" not in text


def test_exclude_patient_and_filters_reach_the_service(app, monkeypatch):
    from retrieval.service.retriever import CaseRetriever

    seen = {}
    real = CaseRetriever.query

    def spy(self, image, **kw):
        seen.update(kw)
        return real(self, image, **kw)

    monkeypatch.setattr(CaseRetriever, "query", spy)
    app.multiselect(key="filter_label").set_value(["mass"])
    app.run()
    app.button[0].click().run()
    assert not app.exception
    assert seen["filters"] == {"label": ["mass"]}
    assert seen["exclude_patient"].startswith("p_")
    labels = [c.value.split(" · ")[1] for c in app.caption if c.value.startswith("case_")]
    assert labels and set(labels) == {"mass"}


def test_ood_hides_the_answer_until_asked_then_greys_it(app, monkeypatch):
    from retrieval.service.results import OODResult
    from retrieval.service.retriever import CaseRetriever

    monkeypatch.setattr(CaseRetriever, "ood", lambda self, feats: OODResult(9.0, True, 1.0))
    app.button[0].click().run()
    assert not app.exception
    assert any("I don't know" in w.value for w in app.warning)
    # no prediction, no confidence, no neighbours under the banner
    heads = [s.value for s in app.subheader]
    assert "Prediction" not in heads and "Nearest cases" not in heads
    assert not app.metric and "confidence" not in _texts(app)
    assert not [c for c in app.caption if c.value.startswith("case_")]

    app.checkbox(key="show_anyway").check().run()
    assert not app.exception
    heads = [s.value for s in app.subheader]
    assert "Prediction" in heads and "Nearest cases" in heads
    guess = app.metric[0]
    assert "not an answer" in guess.label and not guess.delta  # no "100% confidence"
    # all of it inside the greyed container
    greyed = _block(app, "ood_greyed")
    assert greyed is not None
    assert {"Prediction", "Explanation maps", "Nearest cases"} <= {
        s.value for s in greyed.subheader
    }


def test_in_distribution_answer_has_no_gate(app):
    app.button[0].click().run()
    assert not app.exception
    assert "show_anyway" not in [c.key for c in app.checkbox]
    assert _block(app, "ood_greyed") is None
    assert "Nearest cases" in [s.value for s in app.subheader]


def test_bad_upload_is_a_friendly_error(app):
    app.radio(key="source").set_value("Upload an image").run()
    app.file_uploader(key="upload").upload("x.png", b"this is text, not a picture", "image/png")
    app.run()
    assert not app.exception
    errors = [e.value for e in app.error]
    assert errors and "not a DICOM/PNG/JPEG/TIFF/NPY file" in errors[0]
    assert "Traceback" not in _texts(app)


def test_huge_image_is_refused_before_decoding(app):
    app.radio(key="source").set_value("Upload an image").run()
    big = _png(np.zeros((7000, 7000), np.uint8))  # 49 MP, a few hundred kB compressed
    app.file_uploader(key="upload").upload("big.png", big, "image/png")
    app.run()
    assert not app.exception
    assert any("pixels" in e.value and "limit" in e.value for e in app.error)


def test_upload_a_png_and_query(app):
    rng = np.random.default_rng(0)
    img = (rng.random((64, 64)) * 255).astype(np.uint8)
    app.radio(key="source").set_value("Upload an image").run()
    app.file_uploader(key="upload").upload("scan.png", _png(img), "image/png")
    app.run()
    assert not app.error
    app.button[0].click().run()
    assert not app.exception
    if any("I don't know" in w.value for w in app.warning):  # noise may well be flagged
        app.checkbox(key="show_anyway").check().run()
    assert "Nearest cases" in [s.value for s in app.subheader]
    # a PNG carries no patient: the exclude box is off and disabled
    box = [c for c in app.checkbox if c.key and c.key.startswith("exclude_")][0]
    assert box.value is False and box.disabled


def test_uploaded_indexed_dicom_is_a_self_match_and_its_patient_can_be_excluded(
    app, monkeypatch, phantom_dir, tiny_index
):
    import pandas as pd

    from retrieval.service.retriever import CaseRetriever

    indexed = set(pd.read_parquet(tiny_index / "cases.parquet")["case_id"])
    m = pd.read_csv(phantom_dir / "manifest.csv")
    row = m[m["case_id"].isin(indexed)].iloc[0]
    seen = {}
    real = CaseRetriever.query

    def spy(self, image, **kw):
        seen.update(kw)
        return real(self, image, **kw)

    monkeypatch.setattr(CaseRetriever, "query", spy)
    app.radio(key="source").set_value("Upload an image").run()
    data = (phantom_dir / row["image"]).read_bytes()
    app.file_uploader(key="upload").upload("scan.dcm", data, "application/dicom")
    app.run()
    assert not app.error, [e.value for e in app.error]
    box = [c for c in app.checkbox if c.key and c.key.startswith("exclude_")][0]
    assert box.value is True and not box.disabled and "DICOM header" in box.label
    app.button[0].click().run()
    assert not app.exception
    assert seen["exclude_patient"] == row["patient_id"]  # hashed as on ingest
    # with its own patient excluded the case itself cannot come back; untick both and it is
    # recognised as the query itself and still left out (the default)
    box.uncheck().run()
    app.button[0].click().run()
    assert seen["exclude_patient"] is None and seen["exclude_self"] is True
    notice = [i.value for i in app.info if "itself" in i.value]
    assert notice and row["case_id"] in notice[0] and "identical pixels" in notice[0]
    gallery = [c.value.split(" · ")[0] for c in app.caption if c.value.startswith("case_")]
    assert gallery and row["case_id"] not in gallery

    app.checkbox(key="exclude_self").uncheck().run()
    app.button[0].click().run()
    assert seen["exclude_self"] is False
    gallery = [c.value.split(" · ")[0] for c in app.caption if c.value.startswith("case_")]
    assert gallery[0] == row["case_id"]
    assert any("itself" in w.value and row["case_id"] in w.value for w in app.warning)


def test_audit_tab_shows_the_report_or_how_to_make_it(
    monkeypatch, tiny_index, phantom_dir, tmp_path
):
    import shutil

    from index import bundle

    at = _app(monkeypatch, tiny_index, phantom_dir / "manifest.csv").run()
    assert any("casebase audit" in i.value for i in at.info)

    copy = tmp_path / "index"
    shutil.copytree(tiny_index, copy)
    bundle.update(copy, files={"audit/report.html": b"<html><body><h1>AUDIT-OK</h1></body></html>"})
    at = _app(monkeypatch, copy, phantom_dir / "manifest.csv").run()
    assert not at.exception
    assert not any("casebase audit" in i.value for i in at.info)
    assert any("Shortcut audit" in c.value for c in at.caption)
    # the whole report in one frame (st.iframe, not a fixed-height components.html)
    frames = list(at.get("iframe"))
    assert len(frames) == 1
    assert "AUDIT-OK" in frames[0].proto.srcdoc
    # (its height follows the content: checked in a browser, test_app_browser.py)
