"""casebase — the Streamlit app: what does the model think, and which past cases does this look like?

    streamlit run app.py -- --index INDEX_DIR [--manifest MANIFEST]

(``CASEBASE_INDEX`` / ``CASEBASE_MANIFEST`` in the environment work too.)
Without an index it offers the demo's (``casebase-demo/index``, made by
``casebase demo``) when present, else says how to make one.

The app is a thin view over :class:`retrieval.service.retriever.CaseRetriever`: every
number and map on the page comes from ``CaseRetriever.query``; the app only
reads images for display (``retrieval.data.imageio``) and draws overlays and boxes
(``retrieval.explain.overlay``). It shows case ids, pseudonymised patient ids and
case attributes only, never file names, paths or DICOM header fields.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import threading
import traceback
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from retrieval.data.imageio import read_image, to_uint8_rgb
from retrieval.errors import CasebaseError
from retrieval.explain.overlay import draw_boxes, overlay

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
HERE = Path(__file__).resolve().parent
DEMO_INDEX = Path("casebase-demo") / "index"
AUDIT_REPORT = Path("audit") / "report.html"
IMAGE_PX = 240  # display width of one image in the gallery
PICK, UPLOAD = "Pick a case", "Upload an image"


# ----------------------------------------------------------------- configuration
def cli_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="streamlit run app.py --", add_help=False, allow_abbrev=False)
    p.add_argument("--index", default=os.environ.get("CASEBASE_INDEX"))
    p.add_argument("--manifest", default=os.environ.get("CASEBASE_MANIFEST"))
    args, _ = p.parse_known_args(argv)
    return args


def demo_index() -> Path | None:
    for base in (Path.cwd(), HERE):
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


# ----------------------------------------------------------------- cached resources
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


def mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


# ----------------------------------------------------------------- pieces of the page
def how_to_make_an_index() -> None:
    st.info(
        "No index is open. Make one and start the app on it:\n\n"
        "* the demo (synthetic chest films, about 10 minutes on a laptop CPU): `make demo` "
        "or `casebase demo` (it opens this app when it is done)\n"
        "* your own data: `casebase train MANIFEST --out MODEL` then "
        "`casebase index build MODEL MANIFEST --out INDEX`, then "
        "`streamlit run app.py -- --index INDEX --manifest MANIFEST`"
    )


def trust_caption(result, method: str) -> str:
    t = (result.trust or {}).get(method)
    if isinstance(t, dict) and t.get("summary"):
        n = t.get("n_cases")
        on = f" (measured on {n} {t.get('split', 'test')} cases)" if n else ""
        return f"Measured trust{on}: {t['summary']}."
    return "Trust not measured yet — run `casebase explain-eval INDEX MANIFEST`."


def read_upload(upload) -> tuple:
    """Read an upload into (LoadedImage, sha256 of the bytes); raises CasebaseError with the reason."""
    if upload.size > MAX_UPLOAD_MB * 1024 * 1024:
        raise CasebaseError(
            f"the file is {upload.size / 2**20:.1f} MB; the limit is {MAX_UPLOAD_MB} MB"
        )
    data = upload.getvalue()
    stream = io.BytesIO(data)
    # the user's file name may carry a patient's name: keep only its extension
    stream.name = "upload" + Path(upload.name or "").suffix.lower()[:10]
    return read_image(stream, max_pixels=MAX_PIXELS), hashlib.sha256(data).hexdigest()


def sidebar_filters(r) -> dict:
    st.sidebar.subheader("Filter the neighbours")
    filters: dict = {}
    for name in ["label", *r.attribute_names]:
        values = sorted(v for v in r.cases[name].astype(str).unique() if v != "")
        if len(values) < 2:
            continue
        numeric = pd.to_numeric(pd.Series(values), errors="coerce")
        if numeric.notna().all() and len(values) > 12:
            lo, hi = float(numeric.min()), float(numeric.max())
            if (numeric % 1 == 0).all():
                lo, hi = int(lo), int(hi)
            chosen = st.sidebar.slider(name, lo, hi, (lo, hi), key=f"filter_{name}")
            if chosen != (lo, hi):
                filters[name] = [
                    v for v, x in zip(values, numeric, strict=True) if chosen[0] <= x <= chosen[1]
                ]
        else:
            chosen = st.sidebar.multiselect(name, values, key=f"filter_{name}", placeholder="any")
            if chosen:
                filters[name] = chosen
    if filters:
        st.sidebar.caption(
            "Only cases matching every filter are searched (the neighbour vote "
            "changes with them; the model's prediction does not)."
        )
    return filters


def show_prediction(result, truth: str | None) -> None:
    p = result.prediction
    if result.ood.flag:
        st.warning(
            f"### ⚠️ I don't know\nThis image is unlike the indexed cases (OOD score "
            f"{result.ood.score:.4g}, above the calibrated threshold {result.ood.threshold:.4g}). "
            f"Treat the prediction ({p.label}, {p.confidence:.0%}) and the neighbours as unreliable.",
        )
    st.subheader("Prediction")
    c1, c2 = st.columns([1, 2])
    with c1:
        st.metric(
            "Model prediction",
            p.label,
            f"{p.confidence:.0%} confidence",
            delta_color="off",
            delta_arrow="off",
        )
        vote = max(result.knn_vote, key=result.knn_vote.get) if result.knn_vote else "—"
        st.metric(
            "Neighbour vote",
            vote,
            f"{result.knn_vote.get(vote, 0):.0%} of the similarity" if result.knn_vote else None,
            delta_color="off",
            delta_arrow="off",
        )
        if truth:
            verdict = "the model is right" if truth == p.label else "the model is wrong"
            st.caption(f"Ground truth from the manifest: **{truth}** ({verdict})")
        st.caption(
            f"OOD score {result.ood.score:.4g} (threshold {result.ood.threshold:.4g}): "
            + ("out of distribution" if result.ood.flag else "in distribution")
        )
    with c2:
        probs = pd.DataFrame(
            {
                "model probability": result.prediction.probabilities,
                "neighbour vote": result.knn_vote,
            }
        )
        st.bar_chart(probs, stack=False, horizontal=True, height=220)
    st.info(result.explanation_text)


def show_maps(result, pixels: np.ndarray, methods: list[str]) -> None:
    st.subheader("Explanation maps")
    shown = [m for m in methods if m in result.maps]
    if not shown:
        st.caption("No map asked for: choose methods in the sidebar.")
        return
    per_row = 4
    items = [("query", None), *[(m, result.maps[m]) for m in shown]]
    for start in range(0, len(items), per_row):
        cols = st.columns(per_row)
        for col, (name, heat) in zip(cols, items[start : start + per_row], strict=False):
            with col:
                if heat is None:
                    st.image(pixels, caption="query image", width=IMAGE_PX)
                    st.caption(f"{pixels.shape[1]}×{pixels.shape[0]} px")
                else:
                    st.image(overlay(pixels, heat), caption=name, width=IMAGE_PX)
                    st.caption(trust_caption(result, name))


def show_neighbors(result, pixels: np.ndarray, methods: list[str]) -> None:
    st.subheader("Nearest cases")
    if not result.neighbors:
        st.caption("No indexed case matches the filters.")
        return
    st.caption(
        "Boxes: the matched regions (green: the largest term of the similarity "
        "decomposition, orange: the next ones), in the same order on both images."
    )
    expensive = expensive_methods()
    for rank, nb in enumerate(result.neighbors, 1):
        with st.container(border=True):
            c_query, c_case, c_info = st.columns([1, 1, 1.4])
            regions = nb.matched_regions
            with c_query:
                st.image(
                    draw_boxes(pixels, [g.query_box for g in regions]),
                    caption=f"query · match #{rank}",
                    width=IMAGE_PX,
                )
            with c_case:
                case_px = display_pixels(nb.image)
                if case_px is None:
                    st.caption("(image unavailable)")
                else:
                    st.image(draw_boxes(case_px, [g.case_box for g in regions]), width=IMAGE_PX)
                st.caption(f"{nb.case_id} · {nb.label} · sim {nb.similarity:.3f}")
            with c_info:
                st.markdown(
                    f"**#{rank} {nb.case_id}** — {nb.label}, similarity {nb.similarity:.3f}"
                )
                attrs = " · ".join(f"{k}: {v}" for k, v in nb.attributes.items() if str(v) != "")
                if attrs:
                    st.caption(attrs)
                st.caption(f"patient {nb.patient_id or '—'} (pseudonymised)")
                for i, g in enumerate(regions, 1):
                    q, c = g.query_box, g.case_box
                    st.caption(
                        f"region {i}: query x {q[0]}–{q[2]}, y {q[1]}–{q[3]} ↔ case x "
                        f"{c[0]}–{c[2]}, y {c[1]}–{c[3]} ({g.share:.1%} of the similarity)"
                    )
            pair = [m for m in methods if m in nb.maps]
            skipped = [m for m in methods if m not in nb.maps and m in expensive]
            if pair or skipped:
                with st.expander(f"Maps of this pair: {', '.join(pair) or 'none'}"):
                    st.caption(
                        "Each map explains the similarity score: on the query with this "
                        "case held fixed, and on the case with the query held fixed."
                    )
                    for m in pair:
                        a, b = st.columns(2)
                        a.image(
                            overlay(pixels, nb.maps[m]["query"]),
                            caption=f"{m} · query",
                            width=IMAGE_PX,
                        )
                        if case_px is not None:
                            b.image(
                                overlay(case_px, nb.maps[m]["case"]),
                                caption=f"{m} · {nb.case_id}",
                                width=IMAGE_PX,
                            )
                    if skipped:
                        st.caption(
                            f"{', '.join(skipped)}: expensive, computed for the top neighbour only."
                        )


def show_audit(index_dir: Path, manifest: Path | None) -> None:
    report = index_dir / AUDIT_REPORT
    if report.is_file():
        html = report.read_text(encoding="utf-8", errors="replace")
        st.caption(f"Shortcut audit of this index ({AUDIT_REPORT}, written by `casebase audit`).")
        st.download_button(
            "Download the report", html, file_name="casebase-audit.html", mime="text/html"
        )
        import streamlit.components.v1 as components

        components.html(html, height=1000, scrolling=True)
    else:
        m = str(manifest) if manifest else "MANIFEST"
        st.info(
            "No audit report in this bundle yet. The audit asks whether retrieval matches on "
            "the lesion or on site, scanner, burned-in markers or patient identity. Make it "
            f"with:\n\n`casebase audit {index_dir} {m}`\n\nthen reload this page."
        )


# ----------------------------------------------------------------- the page
def main() -> None:
    st.set_page_config(page_title="casebase", page_icon="🩻", layout="wide")
    args = cli_args(sys.argv[1:])
    st.title("casebase")
    st.caption(
        "Case-based retrieval explainer: what the model thinks, which labelled past cases "
        "this looks like, and in which regions."
    )

    index_arg = args.index or st.session_state.get("index_dir")
    if not index_arg:
        demo = demo_index()
        if demo is not None:
            st.info(f"No index given (`--index`). The demo's index is here: `{demo}`.")
            if st.button("Open the demo index", type="primary"):
                st.session_state["index_dir"] = str(demo)
                st.rerun()
        how_to_make_an_index()
        st.stop()
    index_dir = Path(index_arg)
    if not (index_dir / "bundle.json").is_file():
        st.error(f"`{index_dir}` is not an index bundle (no bundle.json).")
        how_to_make_an_index()
        st.stop()
    try:
        r = load_retriever(str(index_dir.resolve()), mtime(index_dir / "bundle.json"))
    except CasebaseError as err:
        st.error(f"Cannot open the index: {err}")
        st.stop()
    index_stamp = mtime(index_dir / "bundle.json")
    manifest = Path(args.manifest) if args.manifest else default_manifest(index_dir, r.meta)

    # ------------------------------------------------------------- sidebar
    sb = st.sidebar
    sb.header("Query settings")
    k = sb.slider("Neighbours (k)", 1, 20, 5)
    available = methods_available()
    methods = sb.multiselect(
        "Explanation maps",
        available,
        default=[m for m in DEFAULT_METHODS if m in available],
        help="For the query: the predicted class. For each neighbour: the similarity, on both "
        "images. " + ", ".join(sorted(expensive_methods())) + " cost tens to hundreds of "
        "forward passes: expect seconds to a minute on a CPU.",
    )
    filters = sidebar_filters(r)
    with sb.expander("About this index"):
        cfg = r.meta.get("model", {})
        st.caption(
            f"{len(r.cases)} cases · classes {', '.join(r.classes)} · backbone "
            f"{cfg.get('backbone', '?')} · {cfg.get('image_size', '?')} px · "
            f"{r.weighting} weighting · FAISS {r.meta.get('faiss', {}).get('factory', '?')}"
        )
        st.caption(f"Index: `{index_dir}`" + (f" · manifest: `{manifest}`" if manifest else ""))

    tab_query, tab_audit = st.tabs(["Query", "Audit"])
    with tab_audit:
        show_audit(index_dir, manifest)

    with tab_query:
        try:
            cases, origin = pickable_cases(
                str(manifest) if manifest else None,
                mtime(manifest) if manifest else 0.0,
                str(index_dir.resolve()),
                index_stamp,
            )
        except CasebaseError as err:
            st.warning(f"Cannot read the manifest's test cases ({err}); offering indexed cases.")
            cases, origin = r.cases.copy(), "index"
        pick_label = "Pick a test case" if origin == "test" else "Pick an indexed case"
        c_in, c_preview = st.columns([2, 1])
        with c_in:
            source = st.radio("Query image", [pick_label, UPLOAD], horizontal=True, key="source")
            image, input_id, truth, patient = None, None, None, None
            if source == UPLOAD:
                upload = st.file_uploader(
                    f"DICOM, PNG, JPEG, TIFF or NPY (up to {MAX_UPLOAD_MB} MB, "
                    f"{MAX_PIXELS // 1_000_000} megapixels)",
                    type=None,
                    key="upload",
                    max_upload_size=MAX_UPLOAD_MB,
                )
                if upload is not None:
                    try:
                        image, digest = read_upload(upload)
                        input_id = f"upload:{digest}"
                    except CasebaseError as err:
                        reason = getattr(err, "reason", None) or str(err)
                        st.error(f"Cannot use this file: {reason}")
            else:
                ids = cases["case_id"].tolist()
                labels = dict(zip(cases["case_id"], cases["label"], strict=True))
                case_id = st.selectbox(
                    pick_label, ids, key="case", format_func=lambda c: f"{c} · {labels[c]}"
                )
                row = cases[cases["case_id"] == case_id].iloc[0]
                try:
                    image = read_image(row["image"], max_pixels=MAX_PIXELS)
                    input_id = f"case:{origin}:{case_id}"
                    truth = row["label"]
                    patient = row.get("patient_id") or None
                except CasebaseError as err:
                    st.error(
                        f"Cannot read {case_id}'s image: {err.reason if hasattr(err, 'reason') else err}"
                    )
            exclude = st.checkbox(
                "Exclude this patient's cases from the neighbours"
                if patient
                else "Exclude this patient's cases (needs a case with a patient id)",
                value=bool(patient),
                disabled=not patient,
                key=f"exclude_{patient}",
            )
            run = st.button("Run query", type="primary", disabled=image is None)
        pixels = to_uint8_rgb(image) if image is not None else None
        with c_preview:
            if pixels is not None:
                st.image(pixels, caption="query", width=IMAGE_PX)

        settings = (
            k,
            tuple(methods),
            bool(exclude and patient),
            tuple(sorted((n, tuple(v)) for n, v in filters.items())),
        )
        if run and image is not None:
            with (
                st.spinner(
                    f"Searching {len(r.cases)} cases and computing "
                    f"{', '.join(methods) or 'no'} maps…"
                ),
                query_lock(),
            ):
                try:
                    res = r.query(
                        image,
                        k=k,
                        explain=methods,
                        exclude_patient=patient if exclude and patient else None,
                        filters=filters or None,
                    )
                    st.session_state["result"] = {
                        "input": input_id,
                        "settings": settings,
                        "res": res,
                        "methods": list(methods),
                        "truth": truth,
                    }
                except CasebaseError as err:
                    st.error(f"The query failed: {err}")
                except Exception as err:  # noqa: BLE001 - a message for the user, the traceback for the log
                    traceback.print_exc()
                    st.error(
                        f"Internal error while querying ({type(err).__name__}: {err}). "
                        "The details are in the server's log."
                    )
        stored = st.session_state.get("result")
        if stored is None or pixels is None or stored["input"] != input_id:
            if image is not None:
                st.caption("Press **Run query** to search the index.")
            return
        if stored["settings"] != settings:
            st.caption("The settings changed since this result: press **Run query** to refresh it.")
        res = stored["res"]
        show_prediction(res, stored["truth"])
        show_maps(res, pixels, stored["methods"])
        show_neighbors(res, pixels, stored["methods"])
        st.caption(" · ".join(f"{k} {v:.2f} s" for k, v in res.timings.items()))


main()
