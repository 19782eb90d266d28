"""Cases from a PACS over DICOMweb: QIDO-RS search, WADO-RS retrieve, same manifest as ingest-dicom.

``ingest_dicomweb(URL, OUT)`` asks a DICOMweb server (Orthanc, dcm4chee,
Google Healthcare, DICOMcloud, ...) for its studies (or only the studies
named), their series and their instances (QIDO-RS), retrieves every instance
*as stored* (WADO-RS, ``transfer-syntax=*``: no server-side transcoding) into
a local cache, then turns each cached file into exactly the manifest row
``casebase ingest-dicom`` writes for that file: the same case id (from the
SOPInstanceUID), keyed patient hash, split, attributes, the same
skip-and-report of undecodable instances and the same manifest writer.

The cache (default: ``dicomweb-cache/`` beside the manifest) holds one file
per instance, named by SHA-256 of its SOPInstanceUID
(``ab/ab12....dcm``), written atomically; instances already there are not
downloaded again, so an interrupted ingest resumes where it stopped. The
cached files are the PACS's DICOM files and hold PHI: keep the cache where
the data may live, delete it when done (the manifest only needs it if you
train / index from it).

Labels (``--label-from``): a DICOM keyword (default ``StudyDescription``;
identifying and date elements are refused) or ``csv:PATH`` with a ``label``
column and one of ``sop_instance_uid`` / ``series_instance_uid`` /
``study_instance_uid`` (the most specific match wins; "unknown" otherwise).

Authentication: HTTP basic (``--username U --password-env VAR``: the password
is read from the environment variable ``VAR``) or a bearer token
(``--token-env VAR``). Secrets never appear in output, errors or files; URLs
are shown without their user-info part.

``fetch_instance("dicomweb://HOST:PORT/PATH/studies/UID[/series/UID[/instances/UID]]")``
downloads one instance (the first of the study / series when no instance is
named) for ``casebase query``; ``dicomweb+https://`` uses TLS. Credentials for
it come from ``CASEBASE_DICOMWEB_TOKEN`` or ``CASEBASE_DICOMWEB_USERNAME`` +
``CASEBASE_DICOMWEB_PASSWORD``; its cache is ``CASEBASE_DICOMWEB_CACHE`` or a
private temporary folder removed when the process exits.
"""

from __future__ import annotations

import atexit
import csv
import hashlib
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from retrieval.errors import CasebaseError

__all__ = [
    "DEFAULT_CACHE_NAME",
    "DicomWebAuth",
    "DicomWebClient",
    "DicomWebReport",
    "InstanceRef",
    "auth_from_env",
    "cache_path_for",
    "fetch_instance",
    "ingest_dicomweb",
    "parse_dicomweb_url",
    "sanitize_url",
]

DEFAULT_CACHE_NAME = "dicomweb-cache"
DEFAULT_TIMEOUT = 30.0
DEFAULT_LABEL_KEYWORD = "StudyDescription"
_ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_RETRY_STATUS = (429, 502, 503, 504)

# QIDO-RS JSON tags
_STUDY_UID = "0020000D"
_SERIES_UID = "0020000E"
_SOP_UID = "00080018"
_SERIES_NUMBER = "00200011"
_INSTANCE_NUMBER = "00200013"

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class DicomWebError(CasebaseError):
    """The DICOMweb server could not be reached, refused us, or answered nonsense."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------- URLs & secrets


def sanitize_url(url: str) -> str:
    """``url`` without user-info (``user:password@``) and without its query string's values."""
    try:
        parts = urlsplit(str(url))
    except ValueError:
        return re.sub(r"//[^/@\s]*@", "//", str(url))
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host + (f":{port}" if port else "")
    query = "&".join(q.split("=", 1)[0] + "=***" for q in parts.query.split("&") if q)
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _split_userinfo(url: str) -> tuple[str, str | None, str | None]:
    """(url without user-info, username, password) — URL-embedded credentials."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None, None
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    from urllib.parse import unquote

    user = unquote(parts.username) if parts.username else None
    pw = unquote(parts.password) if parts.password else None
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)), user, pw


def _normalise_scheme(url: str) -> str:
    """dicomweb:// -> http://, dicomweb+https:// -> https://, dicomweb+http:// -> http://."""
    low = url.lower()
    for prefix, repl in (
        ("dicomweb+https://", "https://"),
        ("dicomweb+http://", "http://"),
        ("dicomwebs://", "https://"),
        ("dicomweb://", "http://"),
    ):
        if low.startswith(prefix):
            return repl + url[len(prefix) :]
    return url


@dataclass
class DicomWebAuth:
    """Credentials; ``__repr__`` never shows a secret."""

    username: str | None = None
    password: str | None = None
    token: str | None = None
    source: str = ""  # where they came from, for messages (e.g. "$PACS_PASSWORD")

    def __repr__(self) -> str:
        kind = "bearer token" if self.token else ("basic" if self.username else "none")
        return f"DicomWebAuth({kind}{', ' + self.source if self.source else ''})"

    __str__ = __repr__

    @property
    def secrets(self) -> list[str]:
        return [s for s in (self.password, self.token) if s]

    def describe(self) -> str:
        if self.token:
            return f"bearer token from {self.source or 'the environment'}"
        if self.username:
            return f"user {self.username!r} with the password from {self.source or 'the URL'}"
        return "no credentials"


def auth_from_args(
    username: str | None, password_env: str | None, token_env: str | None
) -> DicomWebAuth | None:
    """Credentials from the command line's ``--username/--password-env/--token-env``."""
    if token_env and (username or password_env):
        raise CasebaseError("use either --token-env or --username/--password-env, not both")
    if token_env:
        token = os.environ.get(token_env)
        if not token:
            raise CasebaseError(
                f"--token-env {token_env}: environment variable {token_env} is not set or empty"
            )
        return DicomWebAuth(token=token.strip(), source=f"${token_env}")
    if password_env and not username:
        raise CasebaseError("--password-env needs --username")
    if username:
        if not password_env:
            raise CasebaseError(
                "--username needs --password-env VAR (the name of an environment variable holding "
                "the password; passwords are never taken on the command line)"
            )
        pw = os.environ.get(password_env)
        if pw is None:
            raise CasebaseError(
                f"--password-env {password_env}: environment variable {password_env} is not set"
            )
        return DicomWebAuth(username=username, password=pw, source=f"${password_env}")
    return None


def auth_from_env() -> DicomWebAuth | None:
    """Credentials for ``fetch_instance`` (``casebase query``) from CASEBASE_DICOMWEB_* variables."""
    token = os.environ.get("CASEBASE_DICOMWEB_TOKEN")
    if token:
        return DicomWebAuth(token=token.strip(), source="$CASEBASE_DICOMWEB_TOKEN")
    user = os.environ.get("CASEBASE_DICOMWEB_USERNAME")
    if user:
        return DicomWebAuth(
            username=user,
            password=os.environ.get("CASEBASE_DICOMWEB_PASSWORD", ""),
            source="$CASEBASE_DICOMWEB_PASSWORD",
        )
    return None


# --------------------------------------------------------------------------- client


@dataclass(frozen=True)
class InstanceRef:
    study: str
    series: str
    sop: str
    series_number: int | None = None
    instance_number: int | None = None

    @property
    def where(self) -> str:
        return f"instance {self.sop} (series {self.series}, study {self.study})"


def _tag_value(item: dict, tag: str):
    try:
        values = item[tag].get("Value") or []
    except (KeyError, AttributeError, TypeError):
        return None
    return values[0] if values else None


def _as_int(value) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def _multipart_parts(body: bytes, content_type: str) -> list[bytes]:
    """The bodies of a multipart/related message (RFC 2046), in order."""
    m = re.search(r'boundary="?([^";]+)"?', content_type, re.IGNORECASE)
    if not m:
        return [body]
    delim = b"\r\n--" + m.group(1).strip().encode("latin-1")
    pieces = (b"\r\n" + body).split(delim)
    parts: list[bytes] = []
    for piece in pieces[1:]:
        if piece.startswith(b"--"):  # close delimiter
            break
        # transport padding, then CRLF, then headers, blank line, body
        nl = piece.find(b"\r\n")
        if nl < 0:
            continue
        piece = piece[nl + 2 :]
        if piece.startswith(b"\r\n"):  # no part headers
            parts.append(piece[2:])
            continue
        _head, sep, data = piece.partition(b"\r\n\r\n")
        if sep:
            parts.append(data)
    return parts


def _looks_like_dicom(data: bytes) -> bool:
    if len(data) >= 132 and data[128:132] == b"DICM":
        return True
    if len(data) >= 8:
        g = int.from_bytes(data[0:2], "little")
        return g in (0x0002, 0x0008)
    return False


class DicomWebClient:
    """A thin, error-translating wrapper over :class:`dicomweb_client.DICOMwebClient`.

    QIDO-RS goes through dicomweb-client; WADO-RS retrieval is done here with
    the same session so that the instance bytes are kept exactly as stored
    (dicomweb-client would decode and re-encode them).
    """

    def __init__(
        self,
        url: str,
        auth: DicomWebAuth | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = 3,
    ):
        try:
            import requests
            from dicomweb_client.api import DICOMwebClient
        except ImportError as err:  # pragma: no cover - a declared dependency
            raise CasebaseError(
                f"DICOMweb needs the 'dicomweb-client' package ({err}); pip install dicomweb-client"
            ) from None
        url = _normalise_scheme(str(url).strip())
        try:
            url, url_user, url_pw = _split_userinfo(url)
        except ValueError as err:
            raise DicomWebError(f"invalid DICOMweb URL {sanitize_url(url)!r} ({err})") from None
        if auth is None and url_user:
            auth = DicomWebAuth(username=url_user, password=url_pw or "", source="the URL")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise DicomWebError(
                f"invalid DICOMweb URL {sanitize_url(url)!r}: use http(s)://HOST[:PORT]/PATH "
                "(e.g. http://localhost:8042/dicom-web) or dicomweb://HOST:PORT/PATH"
            )
        self.url = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), parts.query, ""))
        self.safe_url = sanitize_url(self.url)
        self.auth = auth
        self.timeout = float(timeout)
        self.retries = max(1, int(retries))
        self._secrets = auth.secrets if auth else []
        session = requests.Session()
        session.trust_env = True
        if auth is not None and auth.token:
            session.headers["Authorization"] = f"Bearer {auth.token}"
        elif auth is not None and auth.username:
            session.auth = (auth.username, auth.password or "")
        self.session = session
        kwargs = {"session": session}
        try:
            self.client = DICOMwebClient(self.url, timeout=self.timeout, **kwargs)
        except TypeError:  # older dicomweb-client without `timeout`
            self.client = DICOMwebClient(self.url, **kwargs)
        except ValueError as err:
            raise DicomWebError(
                f"invalid DICOMweb URL {self.safe_url!r} ({self._scrub(str(err))})"
            ) from None
        self.client.set_http_retry_params(
            retry=True, max_attempts=self.retries, wait_exponential_multiplier=250
        )

    # -- errors -------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        text = re.sub(r"(\w+://)[^/@\s]+@", r"\1", str(text))
        for s in self._secrets:
            if s:
                text = text.replace(s, "***")
        return " ".join(text.split())[:300]

    def _http_error(self, status: int, what: str) -> DicomWebError:
        err = self._http_error_text(status, what)
        err.status = status
        return err

    def _http_error_text(self, status: int, what: str) -> DicomWebError:
        url, code = self.safe_url, f"HTTP {status}, {what}"
        if status == 401:
            if self.auth is None:
                return DicomWebError(
                    f"the DICOMweb server at {url} requires authentication ({code}): "
                    "use --username U --password-env VAR, or --token-env VAR"
                )
            return DicomWebError(
                f"authentication failed at {url} ({code}): the server rejected the "
                f"{self.auth.describe()}"
            )
        if status == 403:
            return DicomWebError(f"access denied by the DICOMweb server at {url} ({code})")
        if status == 404:
            return DicomWebError(
                f"not found at {url} ({code}): is the URL the DICOMweb root "
                "(e.g. http://host:8042/dicom-web for Orthanc), and does the UID exist?"
            )
        if status in (429, 503):
            return DicomWebError(f"the DICOMweb server at {url} is overloaded ({code})")
        return DicomWebError(f"the DICOMweb server at {url} answered an error ({code})")

    def _translate(self, err: BaseException, what: str) -> DicomWebError:
        import requests

        try:
            import retrying
        except ImportError:  # pragma: no cover
            retrying = None
        if retrying is not None and isinstance(err, retrying.RetryError):
            last = getattr(getattr(err, "last_attempt", None), "value", None)
            status = getattr(last, "status_code", None)
            if isinstance(last, tuple) and len(last) == 3:  # exception info
                return self._translate(last[1], what)
            if status is not None:
                return self._http_error(int(status), what)
        if isinstance(err, requests.exceptions.HTTPError):
            status = getattr(err.response, "status_code", None)
            if status is not None:
                return self._http_error(int(status), what)
        if isinstance(err, requests.exceptions.SSLError):
            return DicomWebError(
                f"TLS error talking to the DICOMweb server at {self.safe_url} ({what}): "
                "the certificate could not be verified (set REQUESTS_CA_BUNDLE to your CA bundle)"
            )
        if isinstance(err, requests.exceptions.Timeout):
            return DicomWebError(
                f"the DICOMweb server at {self.safe_url} did not answer within "
                f"{self.timeout:g} s ({what})"
            )
        if isinstance(err, requests.exceptions.ConnectionError):
            text = str(err)
            if "refused" in text.lower():
                why = "connection refused: is the server running and the port right?"
            elif any(
                s in text
                for s in (
                    "NameResolution",
                    "Name or service not known",
                    "nodename nor servname",
                    "getaddrinfo failed",
                    "Temporary failure in name resolution",
                    "No address associated",
                )
            ):
                why = f"host name {urlsplit(self.url).hostname!r} could not be resolved"
            elif "reset" in text.lower() or "aborted" in text.lower():
                why = "the connection was closed by the server"
            elif "unreachable" in text.lower():
                why = "network unreachable"
            else:
                why = "no connection could be made"
            return DicomWebError(f"cannot connect to the DICOMweb server at {self.safe_url}: {why}")
        if isinstance(err, requests.exceptions.RequestException):
            return DicomWebError(
                f"request to the DICOMweb server at {self.safe_url} failed ({what}): "
                f"{type(err).__name__}"
            )
        if isinstance(err, (ValueError, KeyError, TypeError)):
            return DicomWebError(
                f"unexpected answer from {self.safe_url} ({what}): not a DICOMweb response "
                f"({type(err).__name__}: {self._scrub(str(err))})"
            )
        return DicomWebError(
            f"DICOMweb {what} at {self.safe_url} failed: {type(err).__name__}: {self._scrub(str(err))}"
        )

    def _call(self, what: str, fn: Callable, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CasebaseError:
            raise
        except Exception as err:  # noqa: BLE001 - every failure becomes one line
            raise self._translate(err, what) from None

    # -- QIDO-RS ------------------------------------------------------------

    def studies(self) -> list[str]:
        items = self._call(
            "QIDO-RS search for studies",
            self.client.search_for_studies,
            fields=["StudyInstanceUID"],
            get_remaining=True,
        )
        uids = [_tag_value(it, _STUDY_UID) for it in items or []]
        return list(dict.fromkeys(str(u) for u in uids if u))

    def series(self, study: str) -> list[tuple[str, int | None]]:
        items = self._call(
            f"QIDO-RS search for the series of study {study}",
            self.client.search_for_series,
            study_instance_uid=study,
            fields=["SeriesInstanceUID", "SeriesNumber"],
            get_remaining=True,
        )
        out = {}
        for it in items or []:
            uid = _tag_value(it, _SERIES_UID)
            if uid:
                out.setdefault(str(uid), _as_int(_tag_value(it, _SERIES_NUMBER)))
        return sorted(out.items(), key=lambda kv: (kv[1] is None, kv[1] or 0, kv[0]))

    def instances(
        self, study: str, series: str, series_number: int | None = None
    ) -> list[InstanceRef]:
        items = self._call(
            f"QIDO-RS search for the instances of series {series}",
            self.client.search_for_instances,
            study_instance_uid=study,
            series_instance_uid=series,
            fields=["SOPInstanceUID", "InstanceNumber"],
            get_remaining=True,
        )
        refs = {}
        for it in items or []:
            sop = _tag_value(it, _SOP_UID)
            if sop:
                refs.setdefault(
                    str(sop),
                    InstanceRef(
                        study,
                        series,
                        str(sop),
                        series_number,
                        _as_int(_tag_value(it, _INSTANCE_NUMBER)),
                    ),
                )
        return sorted(
            refs.values(), key=lambda r: (r.instance_number is None, r.instance_number or 0, r.sop)
        )

    # -- WADO-RS ------------------------------------------------------------

    def instance_url(self, ref: InstanceRef) -> str:
        return f"{self.url}/studies/{ref.study}/series/{ref.series}/instances/{ref.sop}"

    def retrieve(self, ref: InstanceRef) -> bytes:
        """The instance's DICOM file as stored on the server (no transcoding)."""
        import requests

        url = self.instance_url(ref)
        what = f"WADO-RS retrieve of {ref.where}"
        resp = None
        for attempt in range(self.retries):
            try:
                resp = self.session.get(
                    url, headers={"Accept": _ACCEPT_DICOM}, timeout=self.timeout
                )
            except requests.exceptions.RequestException as err:
                if (
                    attempt + 1 < self.retries
                    and isinstance(
                        err, (requests.exceptions.Timeout, requests.exceptions.ConnectionError)
                    )
                    and "refused" not in str(err).lower()
                ):
                    time.sleep(0.25 * 2**attempt)
                    continue
                raise self._translate(err, what) from None
            if resp.status_code in _RETRY_STATUS and attempt + 1 < self.retries:
                time.sleep(0.25 * 2**attempt)
                continue
            break
        assert resp is not None
        if resp.status_code == 406:  # server cannot send "as stored": accept its default
            resp = self._call(
                what,
                self.session.get,
                url,
                headers={"Accept": 'multipart/related; type="application/dicom"'},
                timeout=self.timeout,
            )
        if resp.status_code >= 400:
            raise self._http_error(resp.status_code, what)
        ctype = resp.headers.get("Content-Type", "")
        body = resp.content
        if ctype.lower().startswith("multipart/"):
            parts = _multipart_parts(body, ctype)
            if not parts:
                raise DicomWebError(f"{what}: the server sent an empty multipart message")
            return parts[0]
        return body


# --------------------------------------------------------------------------- cache


def cache_path_for(cache_dir: str | os.PathLike, sop_uid: str) -> Path:
    """Where an instance lives in the cache: ``CACHE/ab/ab<62 hex>.dcm`` (SHA-256 of the UID)."""
    h = hashlib.sha256(str(sop_uid).strip().encode("utf-8")).hexdigest()
    return Path(cache_dir) / h[:2] / f"{h}.dcm"


def _fetch_to_cache(client: DicomWebClient, ref: InstanceRef, cache_dir: Path) -> tuple[Path, bool]:
    """(path, downloaded?) — download unless already cached; raises on failure."""
    from retrieval import atomic

    path = cache_path_for(cache_dir, ref.sop)
    try:
        if path.is_file() and path.stat().st_size > 0:
            return path, False
    except OSError:
        pass
    data = client.retrieve(ref)
    if not _looks_like_dicom(data):
        raise _NotDicom("the server sent something that is not a DICOM instance")
    try:
        atomic.write_bytes(path, data)
    except OSError as err:
        raise CasebaseError(
            f"cannot write the DICOMweb cache {cache_dir}: {err.strerror or err}"
        ) from None
    return path, True


class _NotDicom(Exception):
    pass


# --------------------------------------------------------------------------- labels


class _UidLabels:
    """``csv:PATH`` with ``label`` and sop/series/study instance UID columns."""

    _COLS = {
        "sop": ("sop_instance_uid", "sopinstanceuid", "sop_uid", "instance_uid"),
        "series": ("series_instance_uid", "seriesinstanceuid", "series_uid"),
        "study": ("study_instance_uid", "studyinstanceuid", "study_uid"),
    }

    def __init__(self, path: Path):
        self.maps: dict[str, dict[str, str]] = {"sop": {}, "series": {}, "study": {}}
        if not path.is_file():
            raise CasebaseError(f"--label-from: mapping file {path} not found")
        try:
            with open(path, newline="", encoding="utf-8-sig") as fh:
                sample = fh.read(4096)
                fh.seek(0)
                delim = "\t" if sample.count("\t") > sample.count(",") else ","
                reader = csv.DictReader(fh, delimiter=delim)
                fields = {(f or "").strip().lower(): f for f in (reader.fieldnames or [])}
                cols = {
                    level: next((fields[c] for c in names if c in fields), None)
                    for level, names in self._COLS.items()
                }
                if "label" not in fields or not any(cols.values()):
                    raise CasebaseError(
                        f"--label-from {path}: the mapping needs a 'label' column and one of "
                        "sop_instance_uid, series_instance_uid, study_instance_uid "
                        f"(found {', '.join(fields) or 'none'})"
                    )
                for row in reader:
                    label = " ".join((row.get(fields["label"]) or "").split())
                    for level, col in cols.items():
                        uid = (row.get(col) or "").strip() if col else ""
                        if uid and label:
                            self.maps[level][uid] = label
        except CasebaseError:
            raise
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            raise CasebaseError(f"--label-from {path}: cannot read the mapping ({err})") from None

    def label(self, ref: InstanceRef) -> str:
        return (
            self.maps["sop"].get(ref.sop)
            or self.maps["series"].get(ref.series)
            or self.maps["study"].get(ref.study)
            or "unknown"
        )


def _label_source(spec: str | None, root: Path):
    """(uid_labels or None, ingest-dicom label source or None)."""
    from retrieval.data.dicom_ingest import _LabelSource

    spec = (spec or DEFAULT_LABEL_KEYWORD).strip()
    if spec == "folder":
        raise CasebaseError(
            "--label-from folder: instances from a DICOMweb server have no folder; use a DICOM "
            "keyword (e.g. StudyDescription, SeriesDescription, BodyPartExamined) or csv:PATH "
            "with columns sop_instance_uid (or series_/study_instance_uid) and label"
        )
    if (
        spec.startswith("csv:")
        or spec.lower().endswith((".csv", ".tsv"))
        or "/" in spec
        or os.sep in spec
    ):
        path = Path(spec[4:] if spec.startswith("csv:") else spec).expanduser()
        return _UidLabels(path), None
    return None, _LabelSource(spec, root)  # validates the keyword, refuses PHI elements


# --------------------------------------------------------------------------- ingest


@dataclass
class DicomWebReport:
    manifest: Path | None
    n_ingested: int = 0
    n_instances: int = 0
    n_downloaded: int = 0
    n_cached: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    missing_studies: list[str] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)
    cache_dir: Path | None = None
    seconds: float = 0.0

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def summary(self) -> str:
        text = (
            f"ingested {self.n_ingested}, skipped {self.n_skipped} "
            f"(of {self.n_instances} instances: {self.n_downloaded} downloaded, "
            f"{self.n_cached} already cached in {self.cache_dir})"
        )
        if self.missing_studies:
            text += f"; {len(self.missing_studies)} requested studies not found"
        return text


def _record(
    path: Path, rel: str, labeler, uid_labels, ref: InstanceRef, used_ids: set[str], out_dir: Path
):
    """The manifest row ``ingest-dicom`` writes for ``path`` (or ``(None, reason)``)."""
    from retrieval.data.dicom_ingest import record_for_file

    def label_for(p, r, ds):
        return uid_labels.label(ref) if uid_labels is not None else labeler.label(p, r, ds)

    row, reason, _ = record_for_file(path, rel, label_for, used_ids, out_dir)
    return row, reason


def _gather(
    client: DicomWebClient, studies: Sequence[str], report: DicomWebReport, say
) -> list[InstanceRef]:
    refs: list[InstanceRef] = []
    if studies:
        wanted = list(dict.fromkeys(s.strip() for s in studies if s.strip()))
        for s in wanted:
            if not _UID_RE.match(s):
                raise CasebaseError(f"--study {s!r}: not a DICOM UID (digits and dots)")
    else:
        wanted = client.studies()
        if not wanted:
            raise CasebaseError(f"the DICOMweb server at {client.safe_url} has no studies")
    for study in wanted:
        try:
            series = client.series(study)
        except DicomWebError as err:
            if err.status != 404 or not studies:  # some servers answer 404 for an unknown study
                raise
            series = []
        if not series:
            report.missing_studies.append(study)
            say(f"study not found: {study} (no series on {client.safe_url})")
            continue
        for se, number in series:
            refs.extend(client.instances(study, se, number))
    seen: set[str] = set()
    unique = []
    for r in refs:
        if r.sop not in seen:
            seen.add(r.sop)
            unique.append(r)
    return unique


def ingest_dicomweb(
    url: str,
    out: str | os.PathLike,
    *,
    studies: Sequence[str] = (),
    label_from: str | None = None,
    cache: str | os.PathLike | None = None,
    auth: DicomWebAuth | None = None,
    strict: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    workers: int = 4,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> DicomWebReport:
    """Search, retrieve and ingest a DICOMweb server's instances; see the module doc."""
    import pandas as pd
    from tqdm import tqdm

    from retrieval.data.dicom_ingest import COLUMNS
    from retrieval.data.manifest import write_manifest
    from retrieval.errors import ManifestError

    t0 = time.perf_counter()
    out_path = Path(out).expanduser()
    if out_path.suffix.lower() not in (".csv", ".parquet", ".pq"):
        raise CasebaseError(f"--out {out_path}: the manifest must end in .csv or .parquet")
    out_dir = out_path.resolve().parent
    cache_dir = Path(cache).expanduser() if cache else out_dir / DEFAULT_CACHE_NAME
    cache_dir = cache_dir.resolve()
    uid_labels, labeler = _label_source(label_from, cache_dir)

    def say(line: str) -> None:
        if log is not None:
            log(line)
        else:
            tqdm.write(line, file=sys.stderr)

    client = DicomWebClient(url, auth, timeout=timeout)
    report = DicomWebReport(manifest=None, cache_dir=cache_dir)
    refs = _gather(client, studies, report, say)
    if studies and report.missing_studies and strict:
        raise CasebaseError(
            f"study {report.missing_studies[0]} not found on {client.safe_url} "
            f"(--strict; {len(report.missing_studies)} of {len(set(studies))} requested studies missing)"
        )
    if not refs:
        raise CasebaseError(
            f"no instances found on {client.safe_url}"
            + (" for the requested studies" if studies else "")
        )
    report.n_instances = len(refs)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CasebaseError(
            f"cannot create the DICOMweb cache {cache_dir}: {err.strerror or err}"
        ) from None

    def fetch(ref: InstanceRef):
        try:
            return _fetch_to_cache(client, ref, cache_dir), None
        except _NotDicom as err:
            return None, str(err)
        except DicomWebError as err:
            # one instance gone or unservable is that instance's problem; the server
            # being unreachable or rejecting our credentials is everyone's
            if err.status in (404, 406, 410, 415, 500):
                return None, str(err)
            raise

    records: list[tuple[Path, str, dict[str, str]]] = []
    used_ids: set[str] = set()
    bar = tqdm(
        total=len(refs),
        desc="ingesting DICOMweb",
        unit="instance",
        disable=not progress,
        leave=False,
    )
    pool = ThreadPoolExecutor(max_workers=max(1, int(workers)))
    try:
        for ref, (got, fail) in zip(refs, pool.map(fetch, refs), strict=True):
            bar.update(1)
            path = None
            if got is not None:
                path, downloaded = got
                if downloaded:
                    report.n_downloaded += 1
                else:
                    report.n_cached += 1
                rel = f"{ref.study}/{ref.series}/{ref.sop}"
                row, fail = _record(path, rel, labeler, uid_labels, ref, used_ids, out_dir)
                if row is not None:
                    records.append((path, rel, row))
                    continue
            where = f"{path} ({ref.where})" if path is not None else ref.where
            if strict:
                raise CasebaseError(
                    f"{where}: {fail} (--strict: stopping at the first unreadable instance)"
                )
            report.skipped.append((where, fail or "cannot decode"))
            say(f"skipped: {where}: {fail}")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    # CT / MR series -> one row each (retrieval.data.series_ingest states the rule)
    from retrieval.data.series_ingest import collapse_series

    rows, broken = collapse_series(records, out_path.resolve(), used_ids)
    for where, fail in broken:
        if strict:
            raise CasebaseError(f"{where}: {fail} (--strict: stopping at the first broken series)")
        report.skipped.append((where, fail))
        say(f"skipped: {where}: {fail}")

    report.n_ingested = len(rows)
    if not rows:
        raise CasebaseError(
            f"no decodable DICOM image among the {report.n_instances} instances on {client.safe_url} "
            f"({report.n_skipped} skipped)"
        )
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    try:
        write_manifest(df, out_path)
    except (OSError, ManifestError) as err:
        raise CasebaseError(f"cannot write {out_path}: {err}") from None
    except Exception as err:  # noqa: BLE001 - pyarrow errors
        raise CasebaseError(f"cannot write {out_path}: {type(err).__name__}: {err}") from None
    report.manifest = out_path
    report.labels = dict(sorted(df["label"].value_counts().to_dict().items()))
    report.splits = dict(sorted(df["split"].value_counts().to_dict().items()))
    report.seconds = time.perf_counter() - t0
    return report


# --------------------------------------------------------------------------- query by URL


def parse_dicomweb_url(url: str) -> tuple[str, str, str | None, str | None]:
    """``dicomweb://HOST:PORT/PATH/studies/S[/series/R[/instances/I]]`` -> (base http URL, S, R, I)."""
    text = _normalise_scheme(str(url).strip())
    try:
        parts = urlsplit(text)
    except ValueError as err:
        raise CasebaseError(f"invalid DICOMweb URL {sanitize_url(url)!r} ({err})") from None
    m = re.match(
        r"^(?P<base>.*?)/studies/(?P<study>[^/]+)(?:/series/(?P<series>[^/]+)"
        r"(?:/instances/(?P<sop>[^/]+))?)?/?$",
        parts.path,
    )
    if parts.scheme not in ("http", "https") or not parts.hostname or not m:
        raise CasebaseError(
            f"invalid DICOMweb URL {sanitize_url(url)!r}: expected "
            "dicomweb://HOST:PORT/PATH/studies/UID[/series/UID[/instances/UID]] "
            "(dicomweb+https:// for TLS)"
        )
    for uid in (m.group("study"), m.group("series"), m.group("sop")):
        if uid is not None and not _UID_RE.match(uid):
            raise CasebaseError(
                f"invalid DICOMweb URL {sanitize_url(url)!r}: {uid!r} is not a DICOM UID"
            )
    base = urlunsplit((parts.scheme, parts.netloc, m.group("base"), "", ""))
    return base, m.group("study"), m.group("series"), m.group("sop")


_TEMP_CACHE: Path | None = None


def _temp_cache() -> Path:
    global _TEMP_CACHE
    if _TEMP_CACHE is None:
        _TEMP_CACHE = Path(tempfile.mkdtemp(prefix="casebase-dicomweb-"))
        os.chmod(_TEMP_CACHE, 0o700)
        atexit.register(shutil.rmtree, _TEMP_CACHE, True)
    return _TEMP_CACHE


def fetch_instance(
    url: str,
    cache_dir: str | os.PathLike | None = None,
    *,
    auth: DicomWebAuth | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> str:
    """Download the instance a ``dicomweb://`` URL names (or its study's / series' first) -> local path."""
    base, study, series, sop = parse_dicomweb_url(url)
    client = DicomWebClient(base, auth if auth is not None else auth_from_env(), timeout=timeout)
    if sop is None:
        if series is None:
            found = client.series(study)
            if not found:
                raise CasebaseError(f"study {study} not found on {client.safe_url}")
            series_list: Iterable = [uid for uid, _n in found]
        else:
            series_list = [series]
        ref = None
        for se in series_list:
            refs = client.instances(study, se)
            if refs:
                ref = refs[0]
                break
        if ref is None:
            what = f"series {series}" if series else f"study {study}"
            raise CasebaseError(f"{what} has no instances on {client.safe_url}")
    else:
        ref = InstanceRef(study, series, sop)
    root = Path(
        cache_dir or os.environ.get("CASEBASE_DICOMWEB_CACHE") or _temp_cache()
    ).expanduser()
    try:
        path, _downloaded = _fetch_to_cache(client, ref, root)
    except _NotDicom as err:
        raise CasebaseError(f"{sanitize_url(url)}: {err}") from None
    return str(path)
