"""retrieval.data.privacy: keyed pseudonyms, a private key file, coarse ages."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from retrieval.data import privacy
from retrieval.data.privacy import (
    AGE_BANDS,
    age_band,
    age_band_from_dates,
    hash_patient_id,
    key_path,
    parse_dicom_age,
)


def test_hash_format_stability_and_key_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CASEBASE_HOME", str(tmp_path / "home"))
    h = hash_patient_id("PHX0012345")
    assert h.startswith("p_") and len(h) == 18 and int(h[2:], 16) >= 0
    assert hash_patient_id("PHX0012345") == h == hash_patient_id("  PHX0012345 ")
    assert hash_patient_id("PHX0012346") != h
    assert "0012345" not in h
    kp = key_path()
    assert kp == tmp_path / "home" / "phi.key" and kp.exists()
    assert stat.S_IMODE(os.stat(kp).st_mode) == 0o600
    assert len(bytes.fromhex(kp.read_text().strip())) == 32
    assert not [p for p in kp.parent.iterdir() if p.name != "phi.key"]  # no temp file left
    with pytest.raises(ValueError):
        hash_patient_id("   ")


def test_key_rotation_changes_hashes(tmp_path, monkeypatch):
    monkeypatch.setenv("CASEBASE_HOME", str(tmp_path / "one"))
    first = hash_patient_id("PHX1")
    monkeypatch.setenv("CASEBASE_HOME", str(tmp_path / "two"))
    second = hash_patient_id("PHX1")
    assert first != second  # a new key: old pseudonyms no longer match
    (tmp_path / "two" / "phi.key").write_text("11" * 32 + "\n")
    os.utime(tmp_path / "two" / "phi.key", ns=(1, 1))
    assert hash_patient_id("PHX1") not in (first, second)
    monkeypatch.setenv("CASEBASE_HOME", str(tmp_path / "one"))
    assert hash_patient_id("PHX1") == first


def test_env_key_overrides_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CASEBASE_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("CASEBASE_PHI_KEY", "ab" * 32)
    a = hash_patient_id("PHX9")
    assert not (tmp_path / "h" / "phi.key").exists()
    monkeypatch.setenv("CASEBASE_PHI_KEY", "a text passphrase, not hex")
    b = hash_patient_id("PHX9")
    assert a != b and b == hash_patient_id("PHX9")


def test_concurrent_first_use_agrees_on_one_key(tmp_path, monkeypatch):
    monkeypatch.setenv("CASEBASE_HOME", str(tmp_path / "race"))
    privacy._cache.clear()
    out: list[str] = []
    threads = [
        threading.Thread(target=lambda: out.append(hash_patient_id("PHX7"))) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(out)) == 1 and len(out) == 8


def test_unwritable_home_is_a_user_error(tmp_path, monkeypatch):
    from retrieval.errors import CasebaseError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("CASEBASE_HOME", str(blocker / "sub"))
    with pytest.raises(CasebaseError, match="CASEBASE_PHI_KEY"):
        hash_patient_id("PHX1")


def test_age_bands_and_dicom_ages():
    assert age_band(47) == "40-49" and age_band(40) == "40-49" and age_band(49.9) == "40-49"
    assert age_band(0.5) == "0-9" and age_band(89) == "80-89"
    assert age_band(90) == "90+" and age_band(104) == "90+"
    assert age_band(None) == "" and age_band(-3) == "" and age_band("n/a") == ""
    assert age_band("045Y") == "40-49"
    assert set(AGE_BANDS) >= {age_band(a) for a in range(0, 120)}
    assert parse_dicom_age("045Y") == 45.0
    assert parse_dicom_age("006M") == 0.5
    assert parse_dicom_age("003W") == pytest.approx(21 / 365.25)
    assert parse_dicom_age("012D") == pytest.approx(12 / 365.25)
    assert parse_dicom_age("52") == 52.0
    assert (
        parse_dicom_age("") is None
        and parse_dicom_age("abc") is None
        and parse_dicom_age(None) is None
    )
    assert age_band_from_dates("19700615", "20200614") == "40-49"
    assert age_band_from_dates("19700615", "20200615") == "50-59"
    assert (
        age_band_from_dates("", "20200101") == ""
        and age_band_from_dates("20210101", "20200101") == ""
    )
    assert age_band_from_dates("19701332", "20200101") == ""
