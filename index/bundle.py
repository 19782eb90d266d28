"""Index bundle I/O: checksummed, versioned, atomic.

    INDEX_DIR/bundle.json     format version, model fingerprint, embedding config,
                              faiss factory, counts, sha256 of every other file,
                              and its own sha256 (`bundle_sha256`)
    INDEX_DIR/vectors.faiss
    INDEX_DIR/cases.parquet   one row per vector, in id order
    INDEX_DIR/model/          weights.safetensors + config.json
    INDEX_DIR/regions/        every case's projected feature cells + their FAISS index
                              (format 2; index.region_index)
    INDEX_DIR/fingerprints/   every case's pixel hash + thumbnail, for the self-match check
                              (optional, index.fingerprints; without it images are read)
    INDEX_DIR/similarity_quantiles.npy   calibration of similarity_score (absent in bundles
                              built before it: the service falls back to (1 + cosine) / 2)
    INDEX_DIR/...             later additions (trust.json, audit/) are listed too

bundle.json is written in one canonical serialisation, so any changed byte in
it (even whitespace) is caught; any changed, missing or extra byte elsewhere
fails its file's checksum. Updates (explain-eval results, audit reports) are
made in a hard-linked copy and swapped in atomically, so a kill at any point
leaves the previous bundle loadable.

Checksums catch damage, not a deliberate edit (anyone can recompute them).
Optional signing closes that: when a bundle key is configured
(``CASEBASE_BUNDLE_KEY``, hex or text, else the file ``$CASEBASE_HOME/bundle.key``;
kept like the PHI key, see :func:`retrieval.data.privacy.load_key`, but never
created automatically), every build and update signs bundle.json with
HMAC-SHA256 (``signature``: algorithm, key id, value over everything but the
signature and ``bundle_sha256``, which lists every file's sha256), and loading
refuses a bundle whose signature is missing or does not match. Without a key,
nothing is signed or checked. Create a key with
``python -c "import secrets; print(secrets.token_hex(32))" > ~/.config/casebase/bundle.key``
(mode 0600), and give it to whoever must load the bundles.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
from pathlib import Path

from retrieval import atomic
from retrieval.errors import BundleError

# 2: regions/ (the region index, index.region_index); version-1 bundles still load and
# fall back to re-encoding neighbours for their matched regions.
FORMAT_VERSION = 2
BUNDLE_JSON = "bundle.json"
SIGNING_KEY_ENV = "CASEBASE_BUNDLE_KEY"
SIGNING_KEY_FILE = "bundle.key"


def signing_key() -> bytes | None:
    """The configured bundle-signing key, or None (then bundles are neither signed nor checked)."""
    from retrieval.data.privacy import load_key

    return load_key(SIGNING_KEY_ENV, SIGNING_KEY_FILE, "bundle signing key", create=False)


def _key_id(key: bytes) -> str:
    """Names a key without revealing it (tells "another key" from "edited")."""
    return hashlib.sha256(b"casebase bundle key id\0" + key).hexdigest()[:12]


def _signed_body(meta: dict) -> bytes:
    return canonical_json(
        {k: v for k, v in meta.items() if k not in ("signature", "bundle_sha256")}
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def canonical_json(obj: dict) -> bytes:
    return (
        json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=True, allow_nan=False) + "\n"
    ).encode()


def _files(root: Path) -> list[str]:
    rels = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return sorted(r for r in rels if r != BUNDLE_JSON)


def seal(root: Path, meta: dict) -> dict:
    """Checksum every file under `root` and write bundle.json (call inside a temp folder)."""
    meta = {k: v for k, v in meta.items() if k not in ("files", "bundle_sha256", "signature")}
    meta["format_version"] = FORMAT_VERSION
    meta["files"] = {rel: sha256_file(root / rel) for rel in _files(root)}
    key = signing_key()
    if key is not None:
        meta["signature"] = {
            "algorithm": "HMAC-SHA256",
            "key_id": _key_id(key),
            "value": hmac.new(key, _signed_body(meta), hashlib.sha256).hexdigest(),
        }
    meta["bundle_sha256"] = hashlib.sha256(canonical_json(meta)).hexdigest()
    (root / BUNDLE_JSON).write_bytes(canonical_json(meta))
    return meta


def read_meta(root: str | Path) -> dict:
    """Parse bundle.json and check the format version (no checksums)."""
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"{root}: no such index folder")
    path = root / BUNDLE_JSON
    if not path.is_file():
        raise BundleError(f"{path}: missing (not an index bundle, or an unfinished build)")
    raw = path.read_bytes()
    try:
        meta = json.loads(raw)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as err:
        raise BundleError(f"{path}: not valid JSON ({err}); the bundle is corrupted") from None
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise BundleError(f"{path}: no format_version; the bundle is corrupted")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"{path}: bundle format version {version} is newer than this casebase reads "
            f"(version {FORMAT_VERSION}); upgrade casebase or rebuild the index"
        )
    return meta


def verify(root: str | Path) -> dict:
    """Read bundle.json and verify every checksum; raise BundleError naming the bad file."""
    root = Path(root)
    meta = read_meta(root)
    path = root / BUNDLE_JSON
    body = {k: v for k, v in meta.items() if k != "bundle_sha256"}
    try:
        expected_raw = canonical_json(meta)
    except ValueError:
        expected_raw = b""
    if path.read_bytes() != expected_raw or hashlib.sha256(
        canonical_json(body)
    ).hexdigest() != meta.get("bundle_sha256"):
        raise BundleError(
            f"{path}: checksum mismatch (bundle.json was changed after it was written)"
        )
    _check_signature(path, meta)
    listed = meta.get("files")
    if not isinstance(listed, dict) or not listed:
        raise BundleError(f"{path}: lists no files; the bundle is corrupted")
    for rel, digest in sorted(listed.items()):
        f = root / rel
        if not f.is_file():
            raise BundleError(f"{f}: missing from the bundle")
        if sha256_file(f) != digest:
            raise BundleError(f"{f}: checksum mismatch (file changed since the bundle was built)")
    extra = sorted(set(_files(root)) - set(listed))
    if extra:
        raise BundleError(
            f"{root / extra[0]}: unexpected file in the bundle (not listed in bundle.json)"
        )
    return meta


def _check_signature(path: Path, meta: dict) -> None:
    key = signing_key()
    if key is None:
        return
    sig = meta.get("signature")
    where = f"{SIGNING_KEY_ENV} or $CASEBASE_HOME/{SIGNING_KEY_FILE}"
    if not isinstance(sig, dict) or not isinstance(sig.get("value"), str):
        raise BundleError(
            f"{path}: not signed, but a bundle signing key is configured ({where}); rebuild "
            "the index with the key, or remove the key to load unsigned bundles"
        )
    expected = hmac.new(key, _signed_body(meta), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(sig["value"], expected):
        if sig.get("key_id") != _key_id(key):
            raise BundleError(
                f"{path}: signed with another key (key id {sig.get('key_id')}, the configured "
                f"key is {_key_id(key)}; {where})"
            )
        raise BundleError(
            f"{path}: signature mismatch (bundle.json was edited after it was signed); "
            "refusing to load it"
        )


def update(
    root: str | Path, files: dict[str, bytes] | None = None, meta_updates: dict | None = None
) -> dict:
    """Add or replace files and metadata, atomically (hard-linked copy, then swap)."""
    root = Path(root)
    meta = verify(root)
    with atomic.atomic_dir(root) as tmp:
        for rel in meta["files"]:
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(root / rel, dst)
            except OSError:
                shutil.copy2(root / rel, dst)
        for rel, data in (files or {}).items():
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.exists():
                dst.unlink()  # never write through a hard link into the live bundle
            dst.write_bytes(data)
        meta.update(meta_updates or {})
        meta = seal(tmp, meta)
    return meta
