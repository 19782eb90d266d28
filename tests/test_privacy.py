"""No protected health information reaches any output: files, stdout, stderr, warnings, logs, the app.

The phantom's DICOM files are rewritten with distinctive PatientName,
PatientID, OtherPatientIDs, birth and study dates (conformant and, for half
the patients, malformed: pydicom's validation warnings quote malformed values),
AccessionNumber, InstitutionName, ReferringPhysicianName, PatientAddress and
StudyID. Then the whole pipeline runs on them:

    ingest-dicom -> validate -> train -> index build -> index info -> query (--json,
    --save-maps, --explain) -> eval -> audit (when the command exists) -> the app
    page (when app.py exists; rendered with streamlit's AppTest)

and every file written (walked recursively, hidden ones included, binary
ones too: searched as bytes in UTF-8, UTF-16-LE/BE and Latin-1, ignoring ASCII
case), every file and folder name, and everything shown (stdout, stderr,
Python warnings, log records, the app's elements) is searched for those
strings: zero hits.

The files also sit the way hospital exports name them: in one folder per
patient named ``FAMILY_GivenN_MRN-QZX-NNNN`` and with the MRN and family name
in the file name, so the names and MRNs in paths are searched for too (the
manifest points at pseudonymous links; labels come from a header keyword, and
``--label-from folder`` is refused without echoing the folder's name).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from pathlib import Path

import pandas as pd
import pytest

from retrieval import cli

REPO = Path(__file__).resolve().parents[1]
COUNTS_FILE = REPO / "artifacts" / "robustness_counts.json"

# Header values planted in every file (per patient where noted) and what to search for.
FAMILY, GIVEN = "QZXFAMILY", "Zéldaqzx"
BIRTH_OK, BIRTH_BAD = "19230417", "17.04.1923"
STUDY_OK, STUDY_BAD = "20190823", "2019/08/23"
NEEDLES = [
    FAMILY,
    GIVEN,
    "Zeldaqzx",  # PatientName
    "MRN-QZX-",  # PatientID prefix (+ the patient number)
    "OTHERQZX77",  # OtherPatientIDs
    "19230417",
    "1923-04-17",
    "17.04.1923",
    "1923/04/17",
    "04/17/1923",
    "17/04/1923",  # birth date
    "20190823",
    "2019-08-23",
    "2019/08/23",
    "23.08.2019",
    "08/23/2019",
    "23/08/2019",  # study date
    "ACCQZX991",  # AccessionNumber
    "Qzx Canary Hospital",  # InstitutionName
    "DRQZXWHO",  # ReferringPhysicianName
    "Qzxlane Road",  # PatientAddress
    "SIDQZX42",  # StudyID
]


def _forms(needle: str) -> list[bytes]:
    out = set()
    for enc in ("utf-8", "utf-16-le", "utf-16-be", "latin-1"):
        with contextlib.suppress(UnicodeEncodeError):
            out.add(needle.lower().encode(enc))
            out.add(needle.upper().encode(enc).lower())
    return sorted(out)


NEEDLE_BYTES = {n: _forms(n) for n in NEEDLES}


def _hits_in(data: bytes) -> list[str]:
    low = data.lower()  # ASCII case only; the forms above cover the rest
    return [n for n, forms in NEEDLE_BYTES.items() if any(f in low for f in forms)]


def _plant_phi(src_dir: Path, dst_dir: Path) -> int:
    """Copy the phantom's DICOMs into patient-named folders and files, rewriting the identifying
    header fields; the label goes into SeriesDescription."""
    import pydicom

    patients: dict[str, int] = {}
    n = 0
    for src in sorted(src_dir.glob("images/*/*.dcm")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # malformed dates on purpose
            ds = pydicom.dcmread(src)
            ds.SeriesDescription = src.parent.name
            _rewrite(ds, patients, dst_dir, src.name)
        n += 1
    assert n and len(patients) >= 6
    return n


def _rewrite(ds, patients: dict[str, int], dst_dir: Path, name: str) -> None:
    pno = patients.setdefault(str(ds.PatientID), len(patients))
    # how exports name things: a folder per patient, the MRN and family name in the file name
    out = (
        dst_dir / f"{FAMILY}_{GIVEN}{pno}_MRN-QZX-{pno:04d}" / f"MRN-QZX-{pno:04d}_{FAMILY}_{name}"
    )
    bad_dates = pno % 2 == 1
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = f"{FAMILY}^{GIVEN}{pno}"
    ds.PatientID = f"MRN-QZX-{pno:04d}"
    ds.OtherPatientIDs = "OTHERQZX77"
    ds.PatientBirthDate = BIRTH_BAD if bad_dates else BIRTH_OK
    for kw in ("StudyDate", "SeriesDate", "ContentDate", "AcquisitionDate"):
        setattr(ds, kw, STUDY_BAD if bad_dates else STUDY_OK)
    if "PatientAge" in ds:
        del ds.PatientAge  # the age band must come from the dates
    ds.AccessionNumber = "ACCQZX991"
    ds.InstitutionName = "Saint Qzx Canary Hospital"
    ds.ReferringPhysicianName = "DRQZXWHO^Anna"
    ds.PatientAddress = "1 Qzxlane Road"
    ds.StudyID = "SIDQZX42"
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _shown(capfd, caplog, record) -> str:
    out, err = capfd.readouterr()
    text = (
        out + err + caplog.text + "".join(f"{w.category.__name__}: {w.message}\n" for w in record)
    )
    caplog.clear()
    record.clear()
    return text


def test_no_phi_in_any_output(phantom_dir, tmp_path, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    dicom_in = tmp_path / "dicom_in"
    n_files = _plant_phi(phantom_dir, dicom_in)
    # the planted inputs do hold every needle (the scan can find what it looks for)
    planted = set()
    for p in dicom_in.rglob("*.dcm"):
        planted.update(_hits_in(p.read_bytes()))
    assert planted >= set(NEEDLES) - {
        "Zeldaqzx",
        "1923-04-17",
        "1923/04/17",
        "04/17/1923",
        "17/04/1923",
        "2019-08-23",
        "23.08.2019",
        "08/23/2019",
        "23/08/2019",
    }, planted

    capfd.readouterr()  # planting logged pydicom's warnings about the malformed dates: not output
    caplog.clear()
    work = tmp_path / "work"
    work.mkdir()
    manifest = work / "manifest.csv"
    shown: list[tuple[str, str]] = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")

        def run(*argv) -> str:
            rc = cli.main([str(a) for a in argv])
            text = _shown(capfd, caplog, record)
            shown.append((" ".join(str(a) for a in argv[: 2 if argv[0] == "index" else 1]), text))
            assert rc == 0, f"casebase {argv[0]} failed ({rc}):\n{text[-2000:]}"
            return text

        # folder names as labels: refused (they are patients' names), without echoing them
        assert cli.main([str(a) for a in ("ingest-dicom", dicom_in, "--out", manifest)]) == 2
        assert (
            cli.main(
                [
                    str(a)
                    for a in ("ingest-dicom", dicom_in, "--out", manifest, "--label-from", "folder")
                ]
            )
            == 2
        )
        text = _shown(capfd, caplog, record)
        shown.append(("ingest-dicom (refused)", text))
        assert "--label-from" in text and "refusing folder names" in text and not manifest.exists()
        run("ingest-dicom", dicom_in, "--out", manifest, "--label-from", "SeriesDescription")
        df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
        assert len(df) == n_files and set(df["age_band"]) <= {"90+", ""}
        assert set(df["label"]) == {p.name for p in phantom_dir.glob("images/*")}
        assert df["image"].str.startswith("manifest.links/").all()  # pseudonymous links
        assert (df["age_band"] == "90+").sum() >= n_files // 3  # conformant dates gave the band
        run("validate", manifest)
        run(
            "train",
            manifest,
            "--out",
            work / "model",
            "--epochs",
            "2",
            "--image-size",
            "32",
            "--device",
            "cpu",
        )
        run("index", "build", work / "model", manifest, "--out", work / "index", "--device", "cpu")
        run("index", "info", work / "index", "--json")
        query = next(dicom_in.rglob("*.dcm"))
        run(
            "query",
            work / "index",
            query,
            "-k",
            "3",
            "--json",
            "--save-maps",
            work / "maps",
            "--explain",
            "gradcam,similarity",
            "--device",
            "cpu",
        )
        run("query", work / "index", query, "-k", "3", "--device", "cpu")
        split = "test" if (df["split"] == "test").sum() >= 2 else "val"
        run("eval", work / "index", manifest, "--split", split, "--json", "--device", "cpu")
        run("eval", work / "index", manifest, "--split", split, "--device", "cpu")
        if (REPO / "retrieval" / "commands" / "audit.py").is_file():
            run(
                "audit",
                work / "index",
                manifest,
                "--split",
                split,
                "--out",
                work / "audit.html",
                "--permutations",
                "20",
                "--json",
            )
            run("audit", work / "index", manifest, "--split", split, "--permutations", "20")

    if (REPO / "app.py").is_file():
        shown.append(("app", _app_page_text(work / "index", manifest)))

    # every file written, and every name
    scanned, hits = 0, []
    for root in (work, Path(os.environ["CASEBASE_HOME"])):
        for p in sorted(root.rglob("*")):
            found = _hits_in(str(p.relative_to(root)).encode())
            if p.is_symlink():  # a pseudonymous link: its name is searched, it points at an input
                assert p.resolve().is_relative_to(dicom_in.resolve()), p
            elif p.is_file():
                found += _hits_in(p.read_bytes())
                if p.suffix == ".parquet":  # compressed pages: search the decoded values too
                    found += _hits_in(pd.read_parquet(p).to_csv(index=False).encode())
                scanned += 1
            if found:
                hits.append(f"{p}: {sorted(set(found))}")
    for what, text in shown:
        found = _hits_in(text.encode("utf-8", "replace"))
        if found:
            hits.append(f"shown by {what}: {sorted(set(found))}")
    _record(
        {
            "files_scanned": scanned,
            "outputs_scanned": len(shown),
            "needles": len(NEEDLES),
            "phi_hits": len(hits),
            "commands": [w for w, _ in shown],
        }
    )
    assert scanned >= 10
    assert not hits, "PHI found:\n" + "\n".join(hits)


def _app_page_text(index_dir: Path, manifest: Path) -> str:
    """Render the app on the index (AppTest), run a query, return the text of every element."""
    from streamlit.testing.v1 import AppTest

    env = {"CASEBASE_INDEX": str(index_dir), "CASEBASE_MANIFEST": str(manifest)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180)
        at.run()
        assert not at.exception, [e.message for e in at.exception]
        buttons = [b for b in at.button if b.label == "Run query"]
        assert buttons, "no 'Run query' button on the page"
        buttons[0].click().run()
        assert not at.exception, [e.message for e in at.exception]
        # A query flagged "I don't know" hides the neighbours behind "show anyway": open it,
        # so that the scan covers everything a user can make the page show.
        for box in at.checkbox:
            if box.key == "show_anyway" and not box.value:
                box.check().run()
                assert not at.exception, [e.message for e in at.exception]
        texts = []

        def walk(node):
            proto = getattr(node, "proto", None)
            if proto is not None:
                texts.append(str(proto))
            for child in getattr(node, "children", {}).values():
                walk(child)

        walk(at._tree)
        page = "\n".join(texts)
        assert "Run query" in page and "most similar cases" in page  # a result is shown
        return page
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _record(data: dict) -> None:
    previous = {}
    if COUNTS_FILE.is_file():
        with contextlib.suppress(ValueError, OSError):
            previous = json.loads(COUNTS_FILE.read_text())
    previous["privacy"] = data
    COUNTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    COUNTS_FILE.write_text(json.dumps(previous, indent=2, sort_keys=True) + "\n")


def test_the_scanner_finds_planted_phi_in_every_encoding():
    for needle in ("QZXFAMILY", "Zéldaqzx", "17.04.1923"):
        for enc in ("utf-8", "utf-16-le", "utf-16-be"):
            blob = b"\x00\x01binary" + f"name: {needle.lower()}".encode(enc) + b"\xff"
            assert needle in _hits_in(blob), (needle, enc)
    assert _hits_in(b"nothing to see, p_0123456789abcdef, 90+") == []


def test_the_phi_key_is_documented():
    """Where the key lives and how to rotate it: in privacy.py's docstring and the README."""
    from retrieval.data import privacy

    doc = privacy.__doc__ or ""
    for needle in ("CASEBASE_PHI_KEY", "phi.key", "CASEBASE_HOME", "Rotating the key", "re-ingest"):
        assert needle in doc, needle
    readme = (
        (REPO / "README.md").read_text(encoding="utf-8") if (REPO / "README.md").is_file() else ""
    )
    others = (REPO / "data_manifests" / "README.md", REPO / "docs" / "how-it-works.md")
    docs = readme + "".join(p.read_text(encoding="utf-8") for p in others if p.is_file())
    assert "CASEBASE_PHI_KEY" in docs and "phi.key" in docs and "rotate" in docs.lower()
