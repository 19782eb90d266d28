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

from retrieval.app.volume_view import ShownVolume, middle, shown_volume
from retrieval.data.imageio import LoadedImage, read_image, to_uint8_rgb, volume_middle_slice
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
    volume: ShownVolume | None = None  # a volume query: what the slice scroller shows

    @property
    def pixels(self) -> np.ndarray:
        """(H, W, 3) uint8 for 2-D display: the image, or a volume's middle axial slice."""
        if self.volume is not None:
            return to_uint8_rgb(self.volume.array[middle(self.volume.shape)])
        return to_uint8_rgb(self.image)


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


@st.cache_data(show_spinner=False, max_entries=64)
def display_volume(path: str) -> ShownVolume | None:
    """An indexed case's volume for the slice scroller; None when unreadable or not a volume."""
    from retrieval.data.volume import is_volume_path, read_volume

    try:
        return shown_volume(read_volume(path)) if is_volume_path(path) else None
    except CasebaseError:
        return None


def upload_suffix(name: str) -> str:
    """The upload's extension as read_image / read_volume want it ('.nii.gz' whole)."""
    low = (name or "").lower()
    return ".nii.gz" if low.endswith(".nii.gz") else Path(low).suffix[:10]


def _upload_volume(data: bytes, suffix: str, volume_model: bool, input_id: str):
    """The uploaded bytes as a volume QueryInput when they are one (NIfTI, 3-D NPY), else None."""
    import tempfile

    from retrieval.data.volume import volume_kind

    if suffix not in (".nii", ".nii.gz", ".npy"):
        return None
    if suffix == ".npy" and data[:6] != b"\x93NUMPY":
        return None
    with tempfile.TemporaryDirectory(prefix="casebase-upload-") as tmp:
        path = Path(tmp) / f"upload{suffix}"  # never the user's file name
        path.write_bytes(data)
        if volume_kind(path) is None:
            return None  # a 2-D .npy
        return _volume_input(path, volume_model, input_id)


def _volume_input(path, volume_model: bool, input_id: str, **kw) -> QueryInput:
    """A volume file as a QueryInput: the whole volume for a volume model (cnn3d), its middle
    axial slice (read_image's, as the index read it) for a 2-D model; the scroller shows the
    volume."""
    from retrieval.data.volume import read_volume

    vol = read_volume(path)  # once: the model's input and the scroller both come from it
    if volume_model:
        from retrieval.model.preprocess import read_volume_image

        image = read_volume_image(vol)
    else:
        image = volume_middle_slice(vol, str(path))
    return QueryInput(image, input_id, volume=shown_volume(vol), **kw)


def read_upload(upload, volume_model: bool = False) -> QueryInput:
    """An uploaded file as a QueryInput (its DICOM patient pseudonymised as on ingest);
    a NIfTI or 3-D NPY upload is a volume. Raises CasebaseError with the reason."""
    from retrieval.data.upload import upload_patient

    if upload.size > MAX_UPLOAD_MB * 1024 * 1024:
        raise CasebaseError(
            f"the file is {upload.size / 2**20:.1f} MB; the limit is {MAX_UPLOAD_MB} MB"
        )
    data = upload.getvalue()
    input_id = f"upload:{hashlib.sha256(data).hexdigest()}"
    # the user's file name may carry a patient's name: keep only its extension
    suffix = upload_suffix(upload.name)
    chosen = _upload_volume(data, suffix, volume_model, input_id)
    if chosen is not None:
        return chosen
    stream = io.BytesIO(data)
    stream.name = "upload" + suffix
    image = read_image(stream, max_pixels=MAX_PIXELS)
    patient = upload_patient(data)
    return QueryInput(
        image,
        input_id,
        patient=patient,
        patient_source="DICOM header" if patient else "",
    )


def read_case(row, origin: str, volume_model: bool = False) -> QueryInput:
    """A picked case (a manifest row) as a QueryInput; raises CasebaseError when unreadable."""
    from retrieval.data.volume import is_volume_path

    patient = str(row.get("patient_id") or "") or None
    kw = dict(
        truth=str(row["label"]),
        patient=patient,
        patient_source="manifest" if patient else "",
        case_id=str(row["case_id"]),
    )
    input_id = f"case:{origin}:{row['case_id']}"
    if is_volume_path(row["image"]):
        return _volume_input(row["image"], volume_model, input_id, **kw)
    return QueryInput(read_image(row["image"], max_pixels=MAX_PIXELS), input_id, **kw)
