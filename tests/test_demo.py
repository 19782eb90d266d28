"""`casebase demo`: every stage on a shrunken default, then a second run that reuses it all."""

from __future__ import annotations

import argparse
import json
import time

import pytest

from retrieval.commands import demo
from retrieval.errors import CasebaseError


def _shrink(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(demo, "PHANTOM", dict(demo.PHANTOM, n=60, size=64))
    mp.setattr(demo, "EPOCHS", 1)
    mp.setattr(demo, "EXPLAIN_CASES", 2)
    mp.setattr(demo, "SANITY_CASES", 1)
    mp.setattr(demo, "_methods", lambda: ["gradcam", "similarity"])


@pytest.fixture
def small_demo(monkeypatch):
    _shrink(monkeypatch)


@pytest.fixture(scope="module")
def built(tmp_path_factory, _casebase_home):
    """One shrunken demo run for the module: (out dir, what it printed)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("demo") / "casebase-demo"
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
        _shrink(mp)
        rc = demo.run(argparse.Namespace(out=str(out), no_app=True, port=8501))
    assert rc == 0
    return out, err.getvalue()


def test_demo_builds_then_reuses(small_demo, built, capsys):
    out, err = built
    for stage in ("[1/5] phantom", "[2/5] train", "[3/5] index", "[4/5] trust", "[5/5] audit"):
        assert f"{stage}" in err and "done in" in err
    from index import bundle

    bundle.verify(out / "index")
    trust = json.loads((out / "index" / "trust.json").read_text())
    assert set(trust) == {"gradcam", "similarity"} and trust["gradcam"]["summary"]
    # the demo's smaller sanity check is what ran, and its verdict says so
    assert trust["gradcam"]["sanity"]["n_cases"] == 1
    if demo._audit_available():
        assert (out / "index" / "audit" / "report.html").is_file()
    stamp = json.loads((out / demo.STAMP).read_text())
    assert stamp["timings_s"]["total"] > 0 and stamp["sanity_cases"] == 1
    assert "streamlit run" in err  # --no-app says how to open it

    t0 = time.perf_counter()
    assert demo.run(argparse.Namespace(out=str(out), no_app=True, port=8501)) == 0
    assert time.perf_counter() - t0 < 10
    assert "nothing to build" in capsys.readouterr().err


def test_demo_repairs_a_missing_trust_table(small_demo, built, tmp_path, capsys, monkeypatch):
    import shutil

    out = tmp_path / "demo"
    shutil.copytree(built[0], out)
    calls = []
    monkeypatch.setattr(demo, "_methods", lambda: ["gradcam", "similarity", "gradient"])
    monkeypatch.setattr(demo, "_explain_eval", lambda i, m, methods: calls.append(methods) or True)
    capsys.readouterr()
    demo.build(out)
    err = capsys.readouterr().err
    assert calls == [["gradient"]]  # only the method not measured yet
    assert "reusing the model" in err and "[3/5] index    reusing" in err
    assert "[5/5] audit    reusing" in err


def test_demo_needs_the_app_unless_no_app(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "app_path", lambda: tmp_path / "nowhere" / "app.py")
    with pytest.raises(CasebaseError, match="app is missing"):
        demo.run(argparse.Namespace(out=str(tmp_path / "d"), no_app=False, port=8501))
    with pytest.raises(CasebaseError, match="not a TCP port"):
        demo.run(argparse.Namespace(out=str(tmp_path / "d"), no_app=True, port=0))


def test_app_is_found_beside_the_package():
    assert demo.app_path().is_file()
