"""Optional bundle signing: with a key configured, a deliberately edited bundle.json (checksums
recomputed) is refused; without one, bundles load as before."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from index import bundle
from retrieval import atomic, cli
from retrieval.errors import BundleError
from retrieval.service.retriever import CaseRetriever

KEY = "5f" * 32
OTHER_KEY = "a7" * 32


def _make(tmp_path, name="b"):
    root = tmp_path / name
    with atomic.atomic_dir(root) as tmp:
        (tmp / "vectors.faiss").write_bytes(b"\x00\x01" * 100)
        (tmp / "model").mkdir()
        (tmp / "model" / "config.json").write_text("{}")
        bundle.seal(tmp, {"faiss": {"factory": "Flat"}, "ood": {"threshold": 0.02}})
    return root


def _forge(root, edit) -> None:
    """What someone editing bundle.json on purpose does: change it, recompute every checksum."""
    meta = json.loads((root / "bundle.json").read_text())
    edit(meta)
    body = {k: v for k, v in meta.items() if k != "bundle_sha256"}
    meta["bundle_sha256"] = hashlib.sha256(bundle.canonical_json(body)).hexdigest()
    (root / "bundle.json").write_bytes(bundle.canonical_json(meta))


def _raise_threshold(meta):
    meta["ood"]["threshold"] = 9.0


def test_without_a_key_nothing_is_signed_and_a_forgery_passes_the_checksums(tmp_path):
    root = _make(tmp_path)
    assert "signature" not in bundle.verify(root)
    _forge(root, _raise_threshold)
    assert bundle.verify(root)["ood"]["threshold"] == 9.0  # checksums alone cannot catch it


def test_signed_bundle_refuses_an_edited_bundle_json(tmp_path, monkeypatch):
    monkeypatch.setenv("CASEBASE_BUNDLE_KEY", KEY)
    root = _make(tmp_path)
    meta = bundle.verify(root)
    assert meta["signature"]["algorithm"] == "HMAC-SHA256"
    assert KEY not in (root / "bundle.json").read_text()
    _forge(root, _raise_threshold)
    with pytest.raises(BundleError, match=r"bundle\.json: signature mismatch"):
        bundle.verify(root)


def test_signed_bundle_refuses_a_swapped_file_with_updated_digests(tmp_path, monkeypatch):
    monkeypatch.setenv("CASEBASE_BUNDLE_KEY", KEY)
    root = _make(tmp_path)
    (root / "vectors.faiss").write_bytes(b"\x07" * 200)
    digest = bundle.sha256_file(root / "vectors.faiss")
    _forge(root, lambda m: m["files"].update({"vectors.faiss": digest}))
    with pytest.raises(BundleError, match="signature mismatch"):
        bundle.verify(root)


def test_unsigned_or_foreign_bundles_are_refused_when_a_key_is_configured(tmp_path, monkeypatch):
    unsigned = _make(tmp_path, "unsigned")
    monkeypatch.setenv("CASEBASE_BUNDLE_KEY", OTHER_KEY)
    foreign = _make(tmp_path, "foreign")
    monkeypatch.setenv("CASEBASE_BUNDLE_KEY", KEY)
    with pytest.raises(BundleError, match="not signed, but a bundle signing key is configured"):
        bundle.verify(unsigned)
    with pytest.raises(BundleError, match="signed with another key"):
        bundle.verify(foreign)
    # stripping the signature (and fixing the checksum) does not help either
    _forge(foreign, lambda m: m.pop("signature"))
    with pytest.raises(BundleError, match="not signed"):
        bundle.verify(foreign)


def test_key_file_in_casebase_home_and_updates_stay_signed(tmp_path, _casebase_home):
    key_file = _casebase_home / bundle.SIGNING_KEY_FILE
    key_file.write_text(KEY + "\n")
    try:
        root = _make(tmp_path)
        meta = bundle.update(root, {"trust.json": b"{}"}, {"trust": True})
        assert meta["signature"]["value"] and bundle.verify(root)["trust"] is True
        _forge(root, lambda m: m.update({"trust": False}))
        with pytest.raises(BundleError, match="signature mismatch"):
            bundle.verify(root)
    finally:
        key_file.unlink()
    assert bundle.verify(root)["trust"] is False  # no key: as before, checksums only


def test_real_bundle_load_and_cli(tiny_index, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CASEBASE_BUNDLE_KEY", KEY)
    copy = tmp_path / "index"
    shutil.copytree(tiny_index, copy)
    with pytest.raises(BundleError, match="not signed"):  # built before the key existed
        CaseRetriever.load(copy, device="cpu")
    bundle.seal(copy, bundle.read_meta(copy))  # sign it in place (a rebuild would, too)
    CaseRetriever.load(copy, device="cpu")
    _forge(copy, lambda m: m["ood"].update({"threshold": 9.0}))
    assert cli.main(["index", "info", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "signature mismatch" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
