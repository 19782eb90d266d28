"""Tampered real bundles are refused at load, naming the file (tests/index/test_bundle.py
covers the sealing rules on a synthetic bundle; this runs them on a real ``tiny_index``).

Every file of a copy of ``tiny_index`` is tampered with in turn: a byte changed at
several positions, truncated (half, empty), one byte appended, deleted; and extra
files are added at the top and inside ``model/``. Each variant must be refused by
``CaseRetriever.load`` (a :class:`BundleError` naming the file) and by the CLI
(``index info`` and ``query``: exit 2, one line naming the file): 100% refused,
counted and asserted. A bundle from a newer format version is refused with the
version named, even when its checksums are all consistent.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from index import bundle
from retrieval import cli
from retrieval.errors import BundleError, CasebaseError
from retrieval.service.retriever import CaseRetriever

REPO = Path(__file__).resolve().parents[2]
COUNTS_FILE = REPO / "artifacts" / "robustness_counts.json"


@pytest.fixture(scope="module")
def copy(tiny_index, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("tamper") / "index"
    shutil.copytree(tiny_index, dst)
    return dst


@pytest.fixture(scope="module")
def query_image(phantom_dir) -> Path:
    return sorted(phantom_dir.glob("images/*/*.dcm"))[0]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def _variants(root: Path):
    """(description, file the message must name, apply(), restore()) for every tampering."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    assert {p.relative_to(root).as_posix() for p in files} >= {
        "bundle.json",
        "vectors.faiss",
        "cases.parquet",
        "model/weights.safetensors",
        "model/config.json",
    }
    for f in files:
        original = f.read_bytes()
        n = len(original)

        def restore(f=f, original=original):
            f.write_bytes(original)

        for pos in sorted({0, 1, n // 4, n // 2, (3 * n) // 4, n - 2, n - 1}):

            def flip(f=f, original=original, pos=pos):
                b = bytearray(original)
                b[pos] ^= 0x20 if original[pos : pos + 1].isalpha() else 0x01
                f.write_bytes(bytes(b))

            yield f"byte {pos} of {n} changed", f, flip, restore
        for keep in (n // 2, 0):
            yield (
                f"truncated to {keep} bytes",
                f,
                (lambda f=f, o=original, k=keep: f.write_bytes(o[:k])),
                restore,
            )
        yield "one byte appended", f, (lambda f=f, o=original: f.write_bytes(o + b"\n")), restore
        yield "deleted", f, f.unlink, restore
    for rel in ("notes.txt", "model/extra.bin", ".hidden", "audit/report.html"):
        extra = root / rel

        def add(extra=extra):
            extra.parent.mkdir(parents=True, exist_ok=True)
            extra.write_bytes(b"not part of the bundle")

        def remove(extra=extra, root=root):
            extra.unlink()
            if (
                extra.parent != root
                and not any(extra.parent.iterdir())
                and extra.parent.name == "audit"
            ):
                extra.parent.rmdir()

        yield "extra file", extra, add, remove


def test_every_tampered_file_is_refused_naming_it(copy, query_image):
    CaseRetriever.load(copy, device="cpu")  # the untouched copy loads
    tried, refused, failures = Counter(), Counter(), []
    for what, f, apply, restore in _variants(copy):
        rel = f.relative_to(copy).as_posix()
        apply()
        try:
            tried[rel] += 1
            ok = True
            try:
                CaseRetriever.load(copy, device="cpu")
                ok = False
                failures.append(f"{rel} {what}: CaseRetriever.load accepted it")
            except BundleError as err:
                if str(f) not in str(err):
                    ok = False
                    failures.append(f"{rel} {what}: message does not name the file: {err}")
            except Exception as err:  # noqa: BLE001
                ok = False
                failures.append(f"{rel} {what}: {type(err).__name__} instead of BundleError: {err}")
            # the CLI says the same in one line, exit 2 (index info verifies; query loads)
            for argv in (["index", "info", copy], ["query", copy, query_image, "--device", "cpu"]):
                rc, out, err = _cli(argv)
                if rc != 2 or str(f) not in err or err.count("\n") != 1 or "internal error" in err:
                    ok = False
                    failures.append(
                        f"{rel} {what}: casebase {argv[0]} exit {rc}: {err.strip()[:300]}"
                    )
            refused[rel] += ok
        finally:
            restore()
    bundle.verify(copy)  # restored intact
    total, n_refused = sum(tried.values()), sum(refused.values())
    _record(
        {
            "tampered_bundles_tried": total,
            "tampered_bundles_refused": n_refused,
            "refused_percent": round(100.0 * n_refused / max(total, 1), 2),
            "by_file": {k: f"{refused[k]}/{tried[k]}" for k in sorted(tried)},
        }
    )
    print(f"\ntampered bundles refused: {n_refused}/{total}")
    assert total >= 60
    assert not failures, "\n".join(failures[:30])
    assert n_refused == total


def _reseal(root: Path, meta: dict) -> None:
    """Write bundle.json with consistent checksums (what a newer casebase would write)."""
    body = {k: v for k, v in meta.items() if k != "bundle_sha256"}
    meta = dict(body, bundle_sha256=hashlib.sha256(bundle.canonical_json(body)).hexdigest())
    (root / "bundle.json").write_bytes(bundle.canonical_json(meta))


@pytest.mark.parametrize("version", [bundle.FORMAT_VERSION + 1, 99])
def test_newer_format_version_is_refused_with_the_version(copy, query_image, version):
    path = copy / "bundle.json"
    original = path.read_bytes()
    try:
        meta = json.loads(original)
        _reseal(copy, dict(meta, format_version=version))
        with pytest.raises(
            BundleError,
            match=rf"format version {version} is newer.*version "
            rf"{bundle.FORMAT_VERSION}\)",
        ):
            CaseRetriever.load(copy, device="cpu")
        rc, _, err = _cli(["query", copy, query_image, "--device", "cpu"])
        assert rc == 2 and f"format version {version} is newer" in err and str(path) in err
    finally:
        path.write_bytes(original)
    bundle.verify(copy)


@pytest.mark.parametrize("value", [None, "1", 1.5, [1]])
def test_missing_or_malformed_format_version_is_refused(copy, value):
    path = copy / "bundle.json"
    original = path.read_bytes()
    try:
        meta = json.loads(original)
        if value is None:
            del meta["format_version"]
        else:
            meta["format_version"] = value
        _reseal(copy, meta)
        with pytest.raises(BundleError, match="bundle.json: no format_version"):
            CaseRetriever.load(copy, device="cpu")
    finally:
        path.write_bytes(original)


def test_model_folder_of_a_bundle_with_a_newer_model_format_is_refused(copy):
    """A resealed bundle whose model config claims a newer model format: refused by version."""
    cfg = copy / "model" / "config.json"
    originals = {p: p.read_bytes() for p in (cfg, copy / "bundle.json")}
    try:
        data = json.loads(cfg.read_text())
        data["format_version"] = 99
        cfg.write_text(json.dumps(data))
        meta = json.loads(originals[copy / "bundle.json"])
        meta["files"]["model/config.json"] = bundle.sha256_file(cfg)
        _reseal(copy, meta)
        bundle.verify(copy)  # consistent checksums ...
        with pytest.raises(CasebaseError, match="model format version 99 is newer"):
            CaseRetriever.load(copy, device="cpu")  # ... but a version this casebase cannot read
    finally:
        for p, b in originals.items():
            p.write_bytes(b)


def _record(data: dict) -> None:
    previous = {}
    if COUNTS_FILE.is_file():
        with contextlib.suppress(ValueError, OSError):
            previous = json.loads(COUNTS_FILE.read_text())
    previous["bundle_integrity"] = data
    COUNTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    COUNTS_FILE.write_text(json.dumps(previous, indent=2, sort_keys=True) + "\n")
