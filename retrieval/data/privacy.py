"""Pseudonymisation of patient identifiers and coarsening of ages.

Patient IDs never leave the reader: manifests, index bundles and reports hold
``hash_patient_id(PatientID)`` instead, a keyed HMAC-SHA256 truncated to 64
bits (``"p_" + 16 hex digits``). Without the key the hash cannot be reversed
by trying every plausible hospital ID (which a plain, unkeyed hash would
allow), yet the same patient always maps to the same pseudonym so that
patient-disjoint splits and "exclude the query's own patient" still work.

Where the key lives
-------------------
1. ``CASEBASE_PHI_KEY`` in the environment, if set: a hex string (decoded to
   bytes when it is valid hex of at least 16 bytes) or any other text (its
   UTF-8 bytes). Use this to share one key across machines (e.g. from a
   secrets manager).
2. Otherwise the file ``$CASEBASE_HOME/phi.key`` (``CASEBASE_HOME`` defaults
   to ``~/.config/casebase``). On first use it is created with 32 random
   bytes (stored as hex), permissions ``0600``, written to a temporary file
   and renamed into place so that two processes starting together agree on
   one key.

Rotating the key
----------------
Delete or replace ``phi.key`` (or change ``CASEBASE_PHI_KEY``), then
re-ingest / re-convert every manifest and rebuild the indexes. Hashes made
with the old key no longer match the new ones: the same patient gets a new
pseudonym, so mixing manifests made under different keys would silently put
one patient in two splits. Keep the key as secret as the data: anyone holding
it and a list of candidate IDs can re-identify the pseudonyms.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import tempfile
from datetime import date
from pathlib import Path

from retrieval.errors import CasebaseError

__all__ = [
    "AGE_BANDS",
    "age_band",
    "age_band_from_dates",
    "hash_patient_id",
    "is_pseudonym",
    "key_check",
    "keyed_digest",
    "key_path",
    "load_key",
    "parse_dicom_age",
    "pseudonymise_patient_ids",
]

_KEY_ENV = "CASEBASE_PHI_KEY"
_HOME_ENV = "CASEBASE_HOME"

# (low, high) inclusive decade bands; 90+ is one band (HIPAA Safe Harbor
# aggregates ages over 89).
AGE_BANDS: tuple[str, ...] = (
    "0-9",
    "10-19",
    "20-29",
    "30-39",
    "40-49",
    "50-59",
    "60-69",
    "70-79",
    "80-89",
    "90+",
)


def casebase_home() -> Path:
    """The folder holding casebase's per-user state (the PHI key)."""
    home = os.environ.get(_HOME_ENV)
    if home:
        return Path(home).expanduser()
    return Path.home() / ".config" / "casebase"


def key_path() -> Path:
    """Where the PHI key file lives (whether or not it exists yet)."""
    return casebase_home() / "phi.key"


def _decode_key_text(text: str) -> bytes:
    text = text.strip()
    if re.fullmatch(r"(?:[0-9a-fA-F]{2}){16,}", text):
        return bytes.fromhex(text)
    return text.encode("utf-8")


_cache: dict[tuple[str, int, int], bytes] = {}


def load_key(env: str, filename: str, what: str, create: bool) -> bytes | None:
    """A secret key from ``$env`` (hex or text), else from ``$CASEBASE_HOME/filename``.

    ``create``: make the file (32 random bytes as hex, mode 0600, atomically)
    when it is missing; otherwise a missing file means "no key" (None). Shared
    by the PHI key (always created) and the bundle-signing key (only when
    configured, :mod:`index.bundle`).
    """
    value = os.environ.get(env)
    if value is not None and value.strip():
        return _decode_key_text(value)
    path = casebase_home() / filename
    try:
        st = path.stat()
        cached = _cache.get((str(path), st.st_ino, st.st_mtime_ns))
        if cached is not None:
            return cached
    except OSError:
        pass
    try:
        if not path.exists():
            if not create:
                return None
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{filename}.", dir=str(path.parent))
            try:
                os.fchmod(fd, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(secrets.token_bytes(32).hex() + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                try:
                    # link() fails if another process created the key first: keep theirs
                    os.link(tmp, path)
                except FileExistsError:
                    pass
                except OSError:
                    if not path.exists():
                        os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        key = _decode_key_text(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise CasebaseError(
            f"cannot read or create the {what} file {path} ({err.strerror or err}); "
            f"set {env} or {_HOME_ENV}"
        ) from None
    if len(key) < 16:
        raise CasebaseError(f"the {what} in {path} is too short (need at least 16 bytes)")
    try:
        st = path.stat()
        _cache[(str(path), st.st_ino, st.st_mtime_ns)] = key
    except OSError:
        pass
    return key


def _load_key() -> bytes:
    key = load_key(_KEY_ENV, "phi.key", "PHI key", create=True)
    assert key is not None  # created when missing
    return key


def keyed_digest(text: str, n_hex: int = 16) -> str:
    """HMAC-SHA256 of ``text`` under the PHI key, as ``n_hex`` hex digits (for pseudonyms)."""
    return hmac.new(_load_key(), text.encode("utf-8"), hashlib.sha256).hexdigest()[:n_hex]


def hash_patient_id(raw: str) -> str:
    """Keyed pseudonym for a patient identifier: ``"p_" + 16 hex digits``.

    Surrounding whitespace is ignored (DICOM pads values). An empty ID raises
    ``ValueError``: callers decide what stands in for a missing patient.
    """
    text = str(raw).strip()
    if not text:
        raise ValueError("empty patient identifier")
    return "p_" + keyed_digest(text)


def key_check() -> str:
    """8 hex digits that tell PHI keys apart without revealing them (a keyed digest of a fixed
    text): an index bundle records it, so that eval and audit can say when a raw-id manifest
    is hashed under another key than the bundle's ids were (their patients would not match)."""
    return keyed_digest("casebase:key-check", 8)


_PSEUDONYM = re.compile(r"p_[0-9a-f]{16}")


def is_pseudonym(value: str) -> bool:
    """True for a value of the form :func:`hash_patient_id` produces (``p_`` + 16 hex)."""
    return _PSEUDONYM.fullmatch(str(value)) is not None


def pseudonymise_patient_ids(values) -> list[str]:
    """Patient ids as pseudonyms: raw ids hashed, pseudonyms and empty values kept.

    Why: a hand-written manifest may hold raw ids (an MRN) that would otherwise reach
    index bundles and reports. The hash is deterministic, so grouping (patient-disjoint
    splits, own-patient exclusion, leakage checks) is unchanged as long as every reader
    goes through this (the manifest loader does) under the same key; a value already of
    the ``p_`` + 16 hex form is taken as hashed and kept, so hashing twice never happens
    (a raw id that happens to have that form is kept as is). Each distinct id is hashed
    once.
    """
    out: list[str] = []
    seen: dict[str, str] = {}
    for v in values:
        text = str(v).strip()
        if not text or is_pseudonym(text):
            out.append(text)
            continue
        if text not in seen:
            seen[text] = hash_patient_id(text)
        out.append(seen[text])
    return out


def age_band(age_years: float | int | str | None) -> str:
    """Decade band of an age in years: ``47 -> "40-49"``, ``93 -> "90+"``; "" if unknown."""
    if age_years is None:
        return ""
    try:
        age = float(age_years)
    except (TypeError, ValueError):
        parsed = parse_dicom_age(str(age_years))
        if parsed is None:
            return ""
        age = parsed
    if age != age or age < 0 or age > 150:  # NaN or absurd
        return ""
    if age >= 90:
        return "90+"
    lo = int(age // 10) * 10
    return f"{lo}-{lo + 9}"


def parse_dicom_age(text: str | None) -> float | None:
    """Parse a DICOM AS value (``"045Y"``, ``"006M"``, ``"003W"``, ``"012D"``) to years.

    Also accepts a bare number of years. Returns None when it cannot be parsed.
    """
    if text is None:
        return None
    s = str(text).strip().upper()
    if not s:
        return None
    m = re.fullmatch(r"(\d{1,3})\s*([DWMY]?)", s)
    if not m:
        return None
    n = int(m.group(1))
    unit = m.group(2) or "Y"
    years = {"D": n / 365.25, "W": n * 7 / 365.25, "M": n / 12.0, "Y": float(n)}[unit]
    return years


def _parse_da(text: str | None) -> date | None:
    if not text:
        return None
    s = str(text).strip().replace(".", "")  # old ACR-NEMA style YYYY.MM.DD
    m = re.fullmatch(r"(\d{4})(\d{2})(\d{2})", s[:8])
    if not m:
        return None
    try:
        return date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError:
        return None


def age_band_from_dates(birth_date: str | None, study_date: str | None) -> str:
    """Age band from DICOM DA values (YYYYMMDD); "" when either is missing or invalid."""
    b, s = _parse_da(birth_date), _parse_da(study_date)
    if b is None or s is None or s < b:
        return ""
    years = s.year - b.year - ((s.month, s.day) < (b.month, b.day))
    return age_band(years)
