"""`casebase ingest-dicomweb` and `query dicomweb://...` against a real Orthanc server.

The fixture starts the Debian ``Orthanc`` binary with the DICOMweb plugin on a
free loopback port (basic authentication on, remote access off, no DICOM
port), uploads a 30-case phantom through the REST API and stops the server
afterwards whatever happens. Without Orthanc the Orthanc tests skip with a
message (``scripts/system-deps.sh`` installs ``orthanc`` + ``orthanc-dicomweb``).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from retrieval.cli import main
from retrieval.errors import CasebaseError

pytestmark = pytest.mark.orthanc  # under CI=true a skip fails (tests/ci_required.py)

USER = "casebase"
PASSWORD = "orthanc-test-pw-7f3a"
PW_ENV = "CASEBASE_TEST_ORTHANC_PW"
PHI_KEY = "00112233445566778899aabbccddeeff00112233"

_BINARIES = (
    "/usr/sbin/Orthanc",
    "/usr/bin/Orthanc",
    "/usr/local/bin/Orthanc",
    "/usr/local/sbin/Orthanc",
)
_PLUGINS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so*",
    "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/x86_64-linux-gnu/orthanc/libOrthancDicomWeb.so*",
    "/usr/lib/aarch64-linux-gnu/orthanc/libOrthancDicomWeb.so*",
)


def _find_orthanc() -> tuple[str | None, str | None]:
    binary = shutil.which("Orthanc") or next((b for b in _BINARIES if os.access(b, os.X_OK)), None)
    plugin = None
    for pattern in _PLUGINS:
        hits = sorted(glob.glob(pattern))
        if hits:
            plugin = hits[0]
            break
    return binary, plugin


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Orthanc:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc = proc
        self.port = port
        self.log = log
        self.rest = f"http://127.0.0.1:{port}"
        self.dicomweb = f"{self.rest}/dicom-web"

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)


def _start_orthanc(binary: str, plugin: str, work: Path) -> _Orthanc:
    import requests

    last_log = ""
    for attempt in range(3):  # a free port can be taken between choosing and binding
        port = _free_port()
        storage = work / f"storage-{attempt}"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "casebase-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "HttpPort": port,
            "HttpServerEnabled": True,
            "DicomServerEnabled": False,
            "DicomPort": 0,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "Plugins": [plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Ssl": False},
            "SaveJobs": False,
            "ConcurrentJobs": 1,
            "HttpThreadsCount": 8,
            "LimitFindResults": 0,
        }
        cfg = work / f"orthanc-{attempt}.json"
        cfg.write_text(json.dumps(config, indent=2))
        log = work / f"orthanc-{attempt}.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                [binary, str(cfg)],
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=work,
                start_new_session=True,
            )
        server = _Orthanc(proc, port, log)
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    r = requests.get(f"{server.rest}/system", auth=(USER, PASSWORD), timeout=2)
                    if r.status_code == 200 and r.json().get("PluginsEnabled") is not None:
                        plugins = requests.get(
                            f"{server.rest}/plugins", auth=(USER, PASSWORD), timeout=5
                        ).json()
                        if "dicom-web" not in plugins:
                            raise RuntimeError(
                                f"Orthanc started without the DICOMweb plugin ({plugins})"
                            )
                        return server
                except requests.RequestException:
                    pass
                time.sleep(0.2)
        except BaseException:
            _stop(proc)
            raise
        last_log = server.log_tail()
        _stop(proc)
    raise RuntimeError(f"Orthanc did not start; log tail:\n{last_log}")


@pytest.fixture(scope="module")
def env():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CASEBASE_PHI_KEY", PHI_KEY)
        mp.setenv(PW_ENV, PASSWORD)
        mp.delenv("CASEBASE_DICOMWEB_TOKEN", raising=False)
        mp.delenv("CASEBASE_DICOMWEB_USERNAME", raising=False)
        yield mp


@pytest.fixture(scope="module")
def phantom(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("dicomweb") / "phantom"
    assert main(["phantom", str(out), "--n", "30", "--size", "64"]) == 0
    files = sorted((out / "images").rglob("*.dcm"))
    assert len(files) == 30
    return out


@pytest.fixture(scope="module")
def orthanc(env, phantom, tmp_path_factory):
    binary, plugin = _find_orthanc()
    if binary is None or plugin is None:
        pytest.skip(
            "Orthanc with the DICOMweb plugin is not installed "
            f"(binary: {binary or 'missing'}, plugin: {plugin or 'missing'}); "
            "run scripts/system-deps.sh (apt-get install orthanc orthanc-dicomweb)"
        )
    import requests

    work = tmp_path_factory.mktemp("orthanc")
    server = _start_orthanc(binary, plugin, work)
    try:
        t0 = time.perf_counter()
        for f in sorted((phantom / "images").rglob("*.dcm")):
            r = requests.post(
                f"{server.rest}/instances", data=f.read_bytes(), auth=(USER, PASSWORD), timeout=30
            )
            assert r.status_code == 200, (f, r.status_code, r.text[:200])
            assert r.json()["Status"] in ("Success", "AlreadyStored"), r.text[:200]
        server.upload_seconds = time.perf_counter() - t0
        yield server
    finally:
        _stop(server.proc)
        assert server.proc.poll() is not None


def _uids(path: Path) -> tuple[str, str, str]:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def _label_maps(phantom: Path, work: Path) -> tuple[Path, Path, dict[str, str]]:
    """(file,label) CSV for ingest-dicom, (sop_instance_uid,label) CSV for ingest-dicomweb."""
    m = pd.read_csv(phantom / "manifest.csv", dtype=str)
    by_file = work / "labels_by_file.csv"
    by_uid = work / "labels_by_uid.csv"
    sop_label = {}
    with open(by_file, "w", newline="") as f1, open(by_uid, "w", newline="") as f2:
        w1, w2 = csv.writer(f1), csv.writer(f2)
        w1.writerow(["file", "label"])
        w2.writerow(["sop_instance_uid", "label"])
        for img, label in zip(m["image"], m["label"], strict=True):
            rel = Path(img).relative_to("images").as_posix()
            sop = _uids(phantom / img)[2]
            w1.writerow([rel, label])
            w2.writerow([sop, label])
            sop_label[sop] = label
    return by_file, by_uid, sop_label


def _frame(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    return df.drop(columns=["image"]).sort_values("case_id").reset_index(drop=True)


# --------------------------------------------------------------------------- Orthanc round trip


def test_ingest_dicomweb_matches_ingest_dicom(orthanc, phantom, tmp_path, capsys):
    by_file, by_uid, sop_label = _label_maps(phantom, tmp_path)
    local = tmp_path / "local.csv"
    assert (
        main(
            [
                "ingest-dicom",
                str(phantom / "images"),
                "--out",
                str(local),
                "--label-from",
                f"csv:{by_file}",
            ]
        )
        == 0
    )
    web = tmp_path / "web" / "manifest.csv"
    t0 = time.perf_counter()
    rc = main(
        [
            "ingest-dicomweb",
            orthanc.dicomweb,
            "--out",
            str(web),
            "--username",
            USER,
            "--password-env",
            PW_ENV,
            "--label-from",
            f"csv:{by_uid}",
        ]
    )
    ingest_s = time.perf_counter() - t0
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "30 downloaded" in out.out

    a, b = _frame(web), _frame(local)
    assert len(a) == 30
    assert list(a.columns) == list(b.columns)
    pd.testing.assert_frame_equal(a, b)  # same cases, labels, attributes, hashed patients, splits
    phantom_labels = sorted(pd.read_csv(phantom / "manifest.csv", dtype=str)["label"])
    assert sorted(a["label"]) == phantom_labels
    assert all(p.startswith("p_") and len(p) == 18 for p in a["patient_id"])

    # PHI never written: no raw PatientID, no patient name, no password
    text = web.read_text()
    import pydicom

    for f in sorted((phantom / "images").rglob("*.dcm"))[:10]:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        assert str(ds.PatientID) not in text
        assert str(ds.PatientName).split("^")[1] not in text
    assert PASSWORD not in text and PASSWORD not in out.out + out.err

    # the cache holds the instances byte for byte, named by a hash of the SOPInstanceUID
    df = pd.read_csv(web, dtype=str)
    cache = web.parent / "dicomweb-cache"
    originals = {_uids(f)[2]: f for f in (phantom / "images").rglob("*.dcm")}
    for rel in df["image"]:
        p = (web.parent / rel).resolve()
        assert p.is_relative_to(cache.resolve())
    for sop, f in originals.items():
        h = hashlib.sha256(sop.encode()).hexdigest()
        cached = cache / h[:2] / f"{h}.dcm"
        assert cached.read_bytes() == f.read_bytes()
    assert not list(cache.rglob(".*.tmp"))

    # a second run re-downloads nothing
    t1 = time.perf_counter()
    assert (
        main(
            [
                "ingest-dicomweb",
                orthanc.dicomweb,
                "--out",
                str(web),
                "--username",
                USER,
                "--password-env",
                PW_ENV,
                "--label-from",
                f"csv:{by_uid}",
            ]
        )
        == 0
    )
    cached_s = time.perf_counter() - t1
    out2 = capsys.readouterr()
    assert "0 downloaded, 30 already cached" in out2.out
    pd.testing.assert_frame_equal(_frame(web), a)

    # the manifest is a valid casebase manifest
    assert main(["validate", str(web)]) == 0
    capsys.readouterr()
    with capsys.disabled():
        print(
            f"\n[orthanc round trip] upload 30 instances {orthanc.upload_seconds:.2f} s, "
            f"ingest-dicomweb (QIDO+WADO+decode) {ingest_s:.2f} s, "
            f"re-run from cache {cached_s:.2f} s"
        )


def test_ingest_dicomweb_selected_studies_and_keyword_label(orthanc, phantom, tmp_path, capsys):
    files = sorted((phantom / "images").rglob("*.dcm"))[:3]
    studies = [_uids(f)[0] for f in files]
    out = tmp_path / "some.parquet"
    args = [
        "ingest-dicomweb",
        orthanc.dicomweb,
        "--out",
        str(out),
        "--username",
        USER,
        "--password-env",
        PW_ENV,
        "--label-from",
        "Manufacturer",
        "--cache",
        str(tmp_path / "c"),
    ]
    for s in studies:
        args += ["--study", s]
    args += ["--study", "1.2.3.4.5.999"]  # not on the server: reported, not fatal
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "study not found: 1.2.3.4.5.999" in captured.err
    df = pd.read_parquet(out)
    assert len(df) == 3
    import pydicom

    expected = sorted(str(pydicom.dcmread(f, stop_before_pixels=True).Manufacturer) for f in files)
    assert sorted(df["label"]) == expected
    # --strict turns the missing study into an error
    assert main(args + ["--strict"]) == 2
    assert "not found" in capsys.readouterr().err


def test_auth_failure_is_one_clear_line(orthanc, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WRONG_PW", "definitely-not-it-913")
    out = tmp_path / "m.csv"
    rc = main(
        [
            "ingest-dicomweb",
            orthanc.dicomweb,
            "--out",
            str(out),
            "--username",
            USER,
            "--password-env",
            "WRONG_PW",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "authentication failed" in err and "HTTP 401" in err and "$WRONG_PW" in err
    assert "definitely-not-it-913" not in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()

    # no credentials at all
    assert main(["ingest-dicomweb", orthanc.dicomweb, "--out", str(out)]) == 2
    assert "requires authentication" in capsys.readouterr().err

    # credentials in the URL are used but never echoed
    url = orthanc.dicomweb.replace("http://", f"http://{USER}:wrong-in-url-55@")
    assert main(["ingest-dicomweb", url, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "authentication failed" in err and "wrong-in-url-55" not in err

    # a missing password variable is a usage error, before any request
    assert (
        main(
            [
                "ingest-dicomweb",
                orthanc.dicomweb,
                "--out",
                str(out),
                "--username",
                USER,
                "--password-env",
                "NO_SUCH_VAR_CASEBASE",
            ]
        )
        == 2
    )
    assert "NO_SUCH_VAR_CASEBASE is not set" in capsys.readouterr().err


def test_query_by_study_series_and_instance(orthanc, phantom, monkeypatch):
    from retrieval.data.dicomweb import fetch_instance

    monkeypatch.setenv("CASEBASE_DICOMWEB_USERNAME", USER)
    monkeypatch.setenv("CASEBASE_DICOMWEB_PASSWORD", PASSWORD)
    f = sorted((phantom / "images").rglob("*.dcm"))[5]
    study, series, sop = _uids(f)
    base = orthanc.dicomweb.replace("http://", "dicomweb://")
    for url in (
        f"{base}/studies/{study}",
        f"{base}/studies/{study}/series/{series}",
        f"{base}/studies/{study}/series/{series}/instances/{sop}",
    ):
        path = fetch_instance(url)
        assert Path(path).read_bytes() == f.read_bytes(), url

    monkeypatch.setenv("CASEBASE_DICOMWEB_PASSWORD", "nope")
    with pytest.raises(CasebaseError, match="authentication failed"):
        fetch_instance(f"{base}/studies/{study}", cache_dir=str(Path(path).parent / "other"))
    with pytest.raises(CasebaseError, match="not found"):
        monkeypatch.setenv("CASEBASE_DICOMWEB_PASSWORD", PASSWORD)
        fetch_instance(f"{base}/studies/1.2.3.4.5.6.7")


@pytest.mark.slow
def test_cli_query_dicomweb_url(orthanc, phantom, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CASEBASE_DICOMWEB_USERNAME", USER)
    monkeypatch.setenv("CASEBASE_DICOMWEB_PASSWORD", PASSWORD)
    model, index = tmp_path / "model", tmp_path / "index"
    manifest = phantom / "manifest.csv"
    assert (
        main(["train", str(manifest), "--out", str(model), "--epochs", "1", "--device", "cpu"]) == 0
    )
    assert (
        main(["index", "build", str(model), str(manifest), "--out", str(index), "--device", "cpu"])
        == 0
    )
    capsys.readouterr()
    f = sorted((phantom / "images").rglob("*.dcm"))[0]
    study = _uids(f)[0]
    url = orthanc.dicomweb.replace("http://", "dicomweb://") + f"/studies/{study}"
    assert main(["query", str(index), url, "-k", "3", "--json", "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["neighbors"]) == 3
    assert res["prediction"]["label"] in {"nodule", "mass", "cavity"}


# --------------------------------------------------------------------------- without a server


def test_connection_refused_is_specific(tmp_path, capsys, env):
    port = _free_port()
    rc = main(
        [
            "ingest-dicomweb",
            f"http://127.0.0.1:{port}/dicom-web",
            "--out",
            str(tmp_path / "m.csv"),
            "--timeout",
            "5",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "cannot connect" in err and "connection refused" in err
    assert "Traceback" not in err


def test_url_helpers():
    from retrieval.data.dicomweb import _multipart_parts, parse_dicomweb_url, sanitize_url

    assert sanitize_url("https://bob:hunter2@pacs.example:8443/dicom-web?token=abc") == (
        "https://pacs.example:8443/dicom-web?token=***"
    )
    assert parse_dicomweb_url("dicomweb://h:8042/dicom-web/studies/1.2.3") == (
        "http://h:8042/dicom-web",
        "1.2.3",
        None,
        None,
    )
    assert parse_dicomweb_url(
        "dicomweb+https://h/wado/rs/studies/1.2/series/1.3/instances/1.4"
    ) == ("https://h/wado/rs", "1.2", "1.3", "1.4")
    with pytest.raises(CasebaseError, match="expected"):
        parse_dicomweb_url("dicomweb://h:8042/dicom-web/1.2.3")
    with pytest.raises(CasebaseError, match="not a DICOM UID"):
        parse_dicomweb_url("dicomweb://h/studies/abc")
    body = (
        b"--XyZ\r\nContent-Type: application/dicom\r\n\r\n" + b"A\r\n\r\nx" + b"\r\n--XyZ\r\n"
        b"Content-Type: application/dicom\r\n\r\nBB\r\n--XyZ--\r\n"
    )
    assert _multipart_parts(
        body, 'multipart/related; type="application/dicom"; boundary="XyZ"'
    ) == [b"A\r\n\r\nx", b"BB"]


def test_auth_args(monkeypatch):
    from retrieval.data.dicomweb import auth_from_args

    assert auth_from_args(None, None, None) is None
    monkeypatch.setenv("TOK_X", "tok-secret")
    a = auth_from_args(None, None, "TOK_X")
    assert a.token == "tok-secret" and "tok-secret" not in repr(a)
    with pytest.raises(CasebaseError, match="not both"):
        auth_from_args("u", "P", "TOK_X")
    with pytest.raises(CasebaseError, match="--password-env"):
        auth_from_args("u", None, None)
    with pytest.raises(CasebaseError, match="needs --username"):
        auth_from_args(None, "P", None)


def test_bearer_token_is_sent_and_never_shown(tmp_path, capsys, monkeypatch, env):
    import http.server
    import threading

    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server API
            auth = self.headers.get("Authorization", "")
            seen.append(auth)
            if auth != "Bearer tok-123-secret":
                self.send_response(401)
                self.end_headers()
                return
            body = b"[]"
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
        monkeypatch.setenv("PACS_TOKEN", "tok-123-secret")
        assert (
            main(
                [
                    "ingest-dicomweb",
                    url,
                    "--out",
                    str(tmp_path / "m.csv"),
                    "--token-env",
                    "PACS_TOKEN",
                ]
            )
            == 2
        )
        err = capsys.readouterr().err
        assert "has no studies" in err and "tok-123-secret" not in err
        assert seen and seen[-1] == "Bearer tok-123-secret"
        monkeypatch.setenv("PACS_TOKEN", "expired-token-77")
        assert (
            main(
                [
                    "ingest-dicomweb",
                    url,
                    "--out",
                    str(tmp_path / "m.csv"),
                    "--token-env",
                    "PACS_TOKEN",
                ]
            )
            == 2
        )
        err = capsys.readouterr().err
        assert "rejected the bearer token from $PACS_TOKEN" in err and "expired-token-77" not in err
    finally:
        server.shutdown()
        server.server_close()
