import json
import os

import pytest

from index import bundle
from retrieval import atomic
from retrieval.errors import BundleError


def _make(tmp_path):
    root = tmp_path / "b"
    with atomic.atomic_dir(root) as tmp:
        (tmp / "vectors.faiss").write_bytes(b"\x00\x01" * 100)
        (tmp / "model").mkdir()
        (tmp / "model" / "config.json").write_text("{}")
        bundle.seal(tmp, {"faiss": {"factory": "Flat"}})
    return root


def test_sealed_bundle_verifies(tmp_path):
    meta = bundle.verify(_make(tmp_path))
    assert set(meta["files"]) == {"vectors.faiss", "model/config.json"}
    assert meta["format_version"] == bundle.FORMAT_VERSION


@pytest.mark.parametrize("rel", ["vectors.faiss", "model/config.json", "bundle.json"])
def test_every_flipped_byte_is_refused_naming_the_file(tmp_path, rel):
    root = _make(tmp_path)
    data = bytearray((root / rel).read_bytes())
    for pos in range(0, len(data), max(1, len(data) // 7)):
        copy = bytearray(data)
        copy[pos] ^= 0x01
        (root / rel).write_bytes(bytes(copy))
        with pytest.raises(BundleError, match=rel.split("/")[-1]):
            bundle.verify(root)
    (root / rel).write_bytes(bytes(data))
    bundle.verify(root)


def test_missing_and_extra_files_are_refused(tmp_path):
    root = _make(tmp_path)
    (root / "extra.bin").write_bytes(b"x")
    with pytest.raises(BundleError, match="extra.bin: unexpected"):
        bundle.verify(root)
    os.unlink(root / "extra.bin")
    os.unlink(root / "vectors.faiss")
    with pytest.raises(BundleError, match="vectors.faiss: missing"):
        bundle.verify(root)


def test_newer_format_version_is_refused_with_the_version(tmp_path):
    root = _make(tmp_path)
    meta = json.loads((root / "bundle.json").read_text())
    meta["format_version"] = bundle.FORMAT_VERSION + 1
    (root / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=f"version {bundle.FORMAT_VERSION + 1} is newer"):
        bundle.verify(root)


def test_update_adds_files_atomically_and_keeps_old_ones(tmp_path):
    root = _make(tmp_path)
    before = (root / "vectors.faiss").read_bytes()
    meta = bundle.update(root, files={"trust.json": b'{"a": 1}'}, meta_updates={"note": "x"})
    assert meta["note"] == "x" and "trust.json" in meta["files"]
    assert bundle.verify(root)["files"]["vectors.faiss"] == bundle.sha256_file(
        root / "vectors.faiss"
    )
    assert (root / "vectors.faiss").read_bytes() == before
    assert not list(tmp_path.glob(".b.*"))


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="no such index folder"):
        bundle.verify(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="bundle.json: missing"):
        bundle.verify(tmp_path / "empty")
