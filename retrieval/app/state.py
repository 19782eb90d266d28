"""Configuration and cached resources of the app: which index, the retriever, the cases
offered for picking, display pixels, and reading an upload."""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import streamlit as st

from retrieval.data.imageio import LoadedImage, read_image, to_uint8_rgb
from retrieval.errors import CasebaseError

MAX_UPLOAD_MB = 50  # also server.maxUploadSize in .streamlit/config.toml
MAX_PIXELS = 40_000_000
DEFAULT_METHODS = ("gradcam", "similarity")
ALL_METHODS = (
    "gradcam",
    "gradient",
    "smoothgrad",
    "integrated_gradients",
    "occlusion",
    "lime",
    "similarity",
)
REPO = Path(__file__).resolve().parents[2]
DEMO_INDEX = Path("casebase-demo") / "index"
IMAGE_PX = 240  # display width of one image in the gallery


@dataclass
class QueryInput:
    """What the user chose to query, before the query runs."""

    image: LoadedImage
    input_id: str  # identifies the input across reruns ("case:test:ID" / "upload:SHA256")
    truth: str | None = None  # ground-truth label from the manifest (shown after the query)
    patient: str | None = None  # pseudonymised patient id, when known
    patient_source: str = ""  # "manifest" / "DICOM header"
    case_id: str | None = None  # the picked case's id (an indexed one is a self-match)


def cli_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="streamlit run app.py --", add_help=False, allow_abbrev=False)
    p.add_argument("--index", default=os.environ.get("CASEBASE_INDEX"))
    p.add_argument("--manifest", default=os.environ.get("CASEBASE_MANIFEST"))
    args, _ = p.parse_known_args(argv)
    return args


def demo_index() -> Path | None:
    for base in (Path.cwd(), REPO):
        if (base / DEMO_INDEX / "bundle.json").is_file():
            return base / DEMO_INDEX
    return None


def default_manifest(index_dir: Path, meta: dict) -> Path | None:
    """The manifest the bundle was built from, when it can be found (the demo's layout, or meta)."""
    for cand in (meta.get("manifest"), index_dir.parent / "phantom" / "manifest.csv"):
        if cand and Path(cand).is_file():
            return Path(cand)
    return None


def methods_available() -> tuple[str, ...]:
    try:
        from retrieval.explain import registry

        return tuple(registry.METHODS)
    except ImportError:
        return ALL_METHODS


def expensive_methods() -> frozenset[str]:
    try:
        from retrieval.explain import registry

        return frozenset(registry.EXPENSIVE)
    except (ImportError, AttributeError):
        return frozenset({"smoothgrad", "integrated_gradients", "occlusion", "lime"})


def mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


@st.cache_resource(show_spinner="Loading the index and the model…")
def load_retriever(index_dir: str, stamp: float):
    """One CaseRetriever per bundle (and per bundle.json version: explain-eval updates it)."""
    from retrieval.service.retriever import CaseRetriever

    return CaseRetriever.load(index_dir)


@st.cache_resource
def query_lock() -> threading.Lock:
    """One query at a time: the model shares a few CPU cores between every session."""
    return threading.Lock()


@st.cache_data(show_spinner=False, max_entries=8)
def pickable_cases(manifest: str | None, stamp: float, index_dir: str, index_stamp: float) -> tuple:
    """(cases table, where they come from): the manifest's test split, else the indexed cases."""
    if manifest:
        from index.builder import case_table
        from retrieval.data.manifest import load_manifest

        m = load_manifest(manifest)
        test = m.select(["test"])
        if len(test):
            return case_table(m, test), "test"
    r = load_retriever(index_dir, index_stamp)
    return r.cases.copy(), "index"


@st.cache_data(show_spinner=False, max_entries=512)
def display_pixels(path: str) -> np.ndarray | None:
    """(H, W, 3) uint8 of an indexed case's image for display; None when unreadable."""
    try:
        return to_uint8_rgb(read_image(path, max_pixels=MAX_PIXELS))
    except CasebaseError:
        return None


def read_upload(upload) -> QueryInput:
    """An uploaded file as a QueryInput (its DICOM patient pseudonymised as on ingest);
    raises CasebaseError with the reason."""
    from retrieval.data.upload import upload_patient

    if upload.size > MAX_UPLOAD_MB * 1024 * 1024:
        raise CasebaseError(
            f"the file is {upload.size / 2**20:.1f} MB; the limit is {MAX_UPLOAD_MB} MB"
        )
    data = upload.getvalue()
    stream = io.BytesIO(data)
    # the user's file name may carry a patient's name: keep only its extension
    stream.name = "upload" + Path(upload.name or "").suffix.lower()[:10]
    image = read_image(stream, max_pixels=MAX_PIXELS)
    patient = upload_patient(data)
    return QueryInput(
        image,
        f"upload:{hashlib.sha256(data).hexdigest()}",
        patient=patient,
        patient_source="DICOM header" if patient else "",
    )


def read_case(row, origin: str) -> QueryInput:
    """A picked case (a manifest row) as a QueryInput; raises CasebaseError when unreadable."""
    image = read_image(row["image"], max_pixels=MAX_PIXELS)
    patient = str(row.get("patient_id") or "") or None
    return QueryInput(
        image,
        f"case:{origin}:{row['case_id']}",
        truth=str(row["label"]),
        patient=patient,
        patient_source="manifest" if patient else "",
        case_id=str(row["case_id"]),
    )
