"""The query tab: choose an image (a test case or an upload), run the query, lay out the answer."""

from __future__ import annotations

import traceback
from pathlib import Path

import streamlit as st

from retrieval.app import maps, neighbor_card, prediction, refine, volume_region, volume_view
from retrieval.app.sidebar import Settings
from retrieval.app.state import (
    MAX_PIXELS,
    MAX_UPLOAD_MB,
    QueryInput,
    mtime,
    pickable_cases,
    query_lock,
    read_case,
    read_upload,
)
from retrieval.app.trail import Box, Refinement, Trail
from retrieval.data.imageio import load_note
from retrieval.errors import CasebaseError

UPLOAD = "Upload an image"
UPLOAD_TYPES = (
    "DICOM, PNG, JPEG, TIFF or NPY images; NIfTI (.nii, .nii.gz) or 3-D NPY (D, H, W) volumes"
)
FLAT_MODEL_NO_REGION = (
    "Drawing a region of a volume needs a 3-D model: this index's model is 2-D and reads the "
    "volume's middle axial slice only."
)


def _cases(r, index_dir: Path, manifest: Path | None, index_stamp: float):
    try:
        return pickable_cases(
            str(manifest) if manifest else None,
            mtime(manifest) if manifest else 0.0,
            str(index_dir.resolve()),
            index_stamp,
        )
    except CasebaseError as err:
        st.warning(f"Cannot read the manifest's test cases ({err}); offering indexed cases.")
        return r.cases.copy(), "index"


def _reason(err: CasebaseError) -> str:
    return getattr(err, "reason", None) or str(err)


def choose_input(r, index_dir: Path, manifest: Path | None, index_stamp: float):
    """The picker / uploader; (QueryInput or None, exclude-the-patient ticked)."""
    cases, origin = _cases(r, index_dir, manifest, index_stamp)
    pick_label = "Pick a test case" if origin == "test" else "Pick an indexed case"
    source = st.radio("Query image", [pick_label, UPLOAD], horizontal=True, key="source")
    chosen: QueryInput | None = None
    if source == UPLOAD:
        upload = st.file_uploader(
            f"{UPLOAD_TYPES} (up to {MAX_UPLOAD_MB} MB, "
            f"{MAX_PIXELS // 1_000_000} megapixels a slice)",
            type=None,
            key="upload",
            max_upload_size=MAX_UPLOAD_MB,
        )
        if upload is not None:
            try:
                chosen = read_upload(upload, r.model.is_volume)
            except CasebaseError as err:
                st.error(f"Cannot use this file: {_reason(err)}")
    else:
        # the case id only: its label is the answer, shown after the query
        case_id = st.selectbox(pick_label, cases["case_id"].tolist(), key="case")
        row = cases[cases["case_id"] == case_id].iloc[0]
        try:
            chosen = read_case(row, origin, r.model.is_volume)
        except CasebaseError as err:
            st.error(f"Cannot read {case_id}'s image: {_reason(err)}")
    patient = chosen.patient if chosen else None
    exclude = st.checkbox(
        f"Exclude this patient's cases from the neighbours (patient id from the "
        f"{chosen.patient_source}, pseudonymised)"
        if patient
        else "Exclude this patient's cases (needs a case or a DICOM file with a patient id)",
        value=bool(patient),
        disabled=not patient,
        key=f"exclude_{patient}",
    )
    return chosen, bool(exclude and patient)


def run(
    r,
    chosen: QueryInput,
    s: Settings,
    exclude_patient: bool,
    refinement: Refinement | None = None,
    extend: bool = False,
) -> bool:
    """Query the service; the answer goes to the session (or an error on the page).

    refinement: the region / liked / unliked cases to ask as well; extend: add the answer as
    the next step of the stored result's trail instead of starting a new trail. True on success.
    """
    refinement = refinement or Refinement()
    with (
        st.spinner(
            f"Searching {len(r.cases)} cases and computing {', '.join(s.methods) or 'no'} maps…"
        ),
        query_lock(),
    ):
        try:
            res = r.query(
                chosen.image,
                k=s.k,
                explain=s.methods,
                exclude_patient=chosen.patient if exclude_patient else None,
                filters=s.filters or None,
                case_id=chosen.case_id,
                exclude_self=s.exclude_self,
                concepts=s.concepts or None,
                **refinement.query_kwargs(),
            )
        except CasebaseError as err:
            st.error(f"The query failed: {err}")
            return False
        except Exception as err:  # noqa: BLE001 - a message for the user, the traceback for the log
            traceback.print_exc()
            st.error(
                f"Internal error while querying ({type(err).__name__}: {err}). "
                "The details are in the server's log."
            )
            return False
    st.session_state["show_anyway"] = False  # a new answer starts hidden again when OOD
    stored = st.session_state.get("result")
    if extend and stored is not None:
        trail = stored["trail"]
    else:
        volume = chosen.volume is not None and r.model.is_volume
        trail = Trail(whole="whole volume" if volume else "whole image")
    trail.push(refinement, res)
    st.session_state["result"] = {
        "input": chosen.input_id,
        "settings": s.key(exclude_patient),
        "res": res,
        "trail": trail,
        "methods": list(s.methods),
        "truth": chosen.truth,
    }
    return True


def answer(stored: dict, pixels, act, volume=None) -> None:
    """The answer page: notices, the refinement trail, then the prediction, maps and
    neighbours (gated when OOD). act(refinement) runs the trail's next step. volume: the
    query's ShownVolume (then the query and the neighbours get slice scrollers)."""
    trail = stored["trail"]
    res = trail.current.result
    ids = [nb.case_id for nb in res.neighbors]
    action, marks = refine.trail_bar(trail, ids)
    if action == "whole":
        act(trail.refinement.with_region(None))
    elif action in ("undo", "reset"):
        if action == "undo":
            trail.undo()
        else:
            trail.reset()
        stored["res"] = trail.current.result
        st.rerun()
    prediction.self_match_notice(res)
    if not prediction.ood_gate(res):
        if stored["truth"]:
            st.caption(f"Ground truth from the manifest: **{stored['truth']}**")
        return
    with prediction.greyed() if res.ood.flag else st.container():
        refine.region_notes(res)
        prediction.show(res, stored["truth"])
        if volume is not None:
            maps.show_volume(res, volume, stored["methods"])
            neighbor_card.show_all_volumes(
                res,
                volume,
                stored["methods"],
                thumbs=lambda cid: refine.thumbs_key(trail, cid),
                liked=set(trail.refinement.like),
                region=trail.refinement.region,
            )
        else:
            maps.show(res, pixels, stored["methods"])
            region = trail.refinement.region
            neighbor_card.show_all(
                res,
                refine.with_region(pixels, region),
                stored["methods"],
                thumbs=lambda cid: refine.thumbs_key(trail, cid),
                liked=set(trail.refinement.like),
            )
    marks = refine.refine_button(trail, ids, key="refine_bottom") or marks
    st.caption(" · ".join(f"{k} {v:.2f} s" for k, v in res.timings.items()))
    if marks is not None:
        act(trail.refinement.with_feedback(*marks))


def preview(r, chosen: QueryInput) -> tuple[Box | None, bool]:
    """The query shown, to draw a region on: (the box, "Search this region" clicked)."""
    if chosen.volume is not None and not r.model.is_volume:
        volume_view.show("preview", chosen.volume, caption="query volume")
        st.caption(FLAT_MODEL_NO_REGION)
        return None, False
    if chosen.volume is not None:
        box = volume_region.picker(chosen.volume, chosen.input_id)
    else:
        size = tuple(chosen.image.original_size)
        box = refine.region_picker(chosen.pixels, size, chosen.input_id)
    clicked = st.button(
        "Search this region",
        disabled=box is None,
        key="search_region",
        help="Rank the cases by how well a region of theirs matches this box",
    )
    return box, clicked


def show_load_note(chosen: QueryInput | None) -> None:
    """How the query image was read when only part of it was (a multi-frame DICOM's middle
    frame, a multi-page TIFF's first page). A volume's middle slice is captioned by the preview."""
    note = load_note(chosen.image) if chosen is not None and chosen.volume is None else None
    if note:
        st.info(f"Query image: {note}")


def page(r, index_dir: Path, manifest: Path | None, index_stamp: float, s: Settings) -> None:
    c_in, c_preview = st.columns([2, 1])
    with c_in:
        chosen, exclude_patient = choose_input(r, index_dir, manifest, index_stamp)
        show_load_note(chosen)
        clicked = st.button("Run query", type="primary", disabled=chosen is None)
    pixels = chosen.pixels if chosen is not None else None
    volume = chosen.volume if chosen is not None else None
    stored = st.session_state.get("result")
    current = stored is not None and chosen is not None and stored["input"] == chosen.input_id
    box, search_region = None, False
    with c_preview:
        if chosen is not None:
            box, search_region = preview(r, chosen)
    if clicked and chosen is not None:
        run(r, chosen, s, exclude_patient)
    elif search_region and chosen is not None and box is not None:
        base = stored["trail"].refinement if current else Refinement()
        run(r, chosen, s, exclude_patient, base.with_region(box), extend=current)
    stored = st.session_state.get("result")
    if stored is None or chosen is None or stored["input"] != chosen.input_id:
        if chosen is not None:
            st.caption("Press **Run query** to search the index.")
        return
    if stored["settings"] != s.key(exclude_patient):
        st.caption("The settings changed since this result: press **Run query** to refresh it.")

    def act(step: Refinement) -> None:
        if run(r, chosen, s, exclude_patient, step, extend=True):
            st.rerun()

    answer(stored, pixels, act, volume)
