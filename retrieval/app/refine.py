"""Refining a query in the app, as SMILY let pathologists do: draw a box on the query and
search with that region; mark neighbours 👍 / 👎 and refine; walk back along the trail.

Every answer still comes from CaseRetriever.query (region=, like=, unlike=); this module only
turns clicks into those arguments and keeps the trail (trail.py) in the session state.
"""

from __future__ import annotations

import numpy as np
import streamlit as st
from PIL import Image

from retrieval.app.state import IMAGE_PX
from retrieval.app.trail import Box, Trail, box_text
from retrieval.errors import CasebaseError
from retrieval.explain.overlay import draw_boxes

REGION_COLOR = (0, 140, 255)  # the searched box (blue); matched regions stay green / orange
BOX_TEXT = "region_text"  # session key of the typed / drawn box "X0,Y0,X1,Y1"
BOX_FOR = "region_for"  # which query input the box belongs to
DRAG_SEEN = "region_drag_seen"  # the component's last drag already taken into the box
THUMB = "thumb"  # session keys f"{THUMB}_{step uid}_{case id}": 1 👍, 0 👎


def parse_box(text: str) -> Box:
    """'X0,Y0,X1,Y1' in the query's pixels -> a box; CasebaseError with the reason otherwise.

    The service checks the box against the image and its feature cells; this only reads it."""
    from retrieval.service.refine import parse_box as parse

    return tuple(int(round(v)) for v in parse(text))


def drag_to_box(value: dict, size: tuple[int, int]) -> Box | None:
    """The component's drag (display pixels; the release may lie outside the image) as a box
    in the original pixels, clamped to the image; None for a click without a drag."""
    h, w = size
    sx, sy = w / max(1, value["width"]), h / max(1, value["height"])
    xs = sorted(min(max(value[k] * sx, 0), w) for k in ("x1", "x2"))
    ys = sorted(min(max(value[k] * sy, 0), h) for k in ("y1", "y2"))
    box = (int(xs[0]), int(ys[0]), int(np.ceil(xs[1])), int(np.ceil(ys[1])))
    if box[2] - box[0] < 1 or box[3] - box[1] < 1:
        return None
    return box


def with_region(pixels: np.ndarray, box: Box | None) -> np.ndarray:
    """The image with the region drawn in blue (unchanged without a box)."""
    return pixels if box is None else draw_boxes(pixels, [list(box)], color=REGION_COLOR)


def _display(pixels: np.ndarray, box: Box | None) -> np.ndarray:
    """The picker's image at display size (a big scan is not sent whole), box drawn on it."""
    h, w = pixels.shape[:2]
    scale = IMAGE_PX / w
    img = Image.fromarray(pixels).resize((IMAGE_PX, max(1, round(h * scale))), Image.BILINEAR)
    shown = np.asarray(img)
    if box is None:
        return shown
    b = [round(box[0] * scale), round(box[1] * scale), round(box[2] * scale), round(box[3] * scale)]
    return draw_boxes(shown, [b], color=REGION_COLOR, width=2)


def region_picker(pixels: np.ndarray, size: tuple[int, int], input_id: str) -> Box | None:
    """The query image to drag a box on, and the box as text; the current box (or None)."""
    if st.session_state.get(BOX_FOR) != input_id:  # a new image: no box yet
        st.session_state[BOX_FOR] = input_id
        st.session_state[BOX_TEXT] = ""
    text = st.session_state.get(BOX_TEXT, "")
    current, problem = None, ""
    if text.strip():
        try:
            current = parse_box(text)
        except CasebaseError:
            problem = f"'{text}' is not a box: use X0,Y0,X1,Y1"
        if current is not None and (current[2] <= current[0] or current[3] <= current[1]):
            problem = f"'{text}' is an empty or inverted box: X0 < X1 and Y0 < Y1"
            current = None
    try:
        from streamlit_image_coordinates import streamlit_image_coordinates
    except ImportError:  # the app still works: type the box
        streamlit_image_coordinates = None
    if streamlit_image_coordinates is None:
        st.image(with_region(pixels, current), caption="query", width=IMAGE_PX)
        st.caption("Type a box below to search with a part of the image.")
    else:
        value = streamlit_image_coordinates(
            _display(pixels, current),
            width=IMAGE_PX,
            key="region_drag",
            click_and_drag=True,
            cursor="crosshair",
        )
        st.caption("query · drag on it to draw a box")
        if value and value.get("unix_time") != st.session_state.get(DRAG_SEEN):
            st.session_state[DRAG_SEEN] = value.get("unix_time")
            box = drag_to_box(value, size)
            if box is not None:
                st.session_state[BOX_TEXT] = ",".join(str(v) for v in box)
                st.rerun()  # redraw the picker with the new box on it
    h, w = size
    st.text_input(
        f"Box in image pixels X0,Y0,X1,Y1 (image {w}×{h})",
        key=BOX_TEXT,
        placeholder="drag on the image, or type e.g. 10,10,40,40",
    )
    if problem:
        st.caption(problem)
    return current


def trail_bar(trail: Trail, case_ids: list[str]) -> tuple[str | None, tuple | None]:
    """The trail (first step → current) with Undo / Reset / Refine: (action clicked or None,
    (liked, unliked) when Refine was clicked)."""
    with st.container(key="trail"):
        labels = trail.labels()
        shown = [f"**{lab}**" if i == len(labels) - 1 else lab for i, lab in enumerate(labels)]
        st.markdown("Search trail: " + " → ".join(shown))
        with st.container(horizontal=True):
            many = len(labels) > 1
            if st.button("Undo last step", disabled=not many, key="trail_undo"):
                return "undo", None
            if st.button(
                "Reset", disabled=not many, key="trail_reset", help="Back to the first search"
            ):
                return "reset", None
            if trail.refinement.region is not None and st.button(
                "Whole image",
                key="trail_whole",
                help="Search with the whole image again, keeping the 👍 / 👎 given so far",
            ):
                return "whole", None
            marks = refine_button(trail, case_ids, key="refine_top")
    return None, marks


def thumbs_key(trail: Trail, case_id: str) -> str:
    return f"{THUMB}_{trail.current.uid}_{case_id}"


def marked(trail: Trail, case_ids: list[str]) -> tuple[list[str], list[str]]:
    """(liked, unliked) case ids among the current step's neighbours."""
    like, unlike = [], []
    for cid in case_ids:
        v = st.session_state.get(thumbs_key(trail, cid))
        if v == 1:
            like.append(cid)
        elif v == 0:
            unlike.append(cid)
    return like, unlike


def refine_button(
    trail: Trail, case_ids: list[str], key: str
) -> tuple[list[str], list[str]] | None:
    """'Refine' with the neighbours marked on this step; (liked, unliked) when clicked."""
    like, unlike = marked(trail, case_ids)
    n = len(like) + len(unlike)
    label = f"Refine with {n} marked case{'s' if n != 1 else ''}" if n else "Refine"
    clicked = st.button(
        label,
        key=key,
        disabled=not n,
        type="primary" if n else "secondary",
        help="Mark neighbours 👍 (like this) or 👎 (not like this) first. Liked cases pull the "
        "search toward them, an unliked one never comes back.",
    )
    return (like, unlike) if clicked else None


def region_notes(result) -> None:
    """What the service says about the region and the feedback it applied."""
    region = getattr(result, "region", None)
    if region is not None:
        searched = getattr(result, "region_searched", None) or region
        st.caption(
            f"Searched with the region {box_text(tuple(region))} (blue); feature cells "
            f"{box_text(tuple(searched))}. Cases are ranked by how well a region of theirs "
            "matches it; the matched regions start inside it."
        )
    note = getattr(result, "region_note", "")
    if note:
        with st.container(key="region_note"):
            st.info(f"Region: {note}")
    fb = getattr(result, "feedback", None)
    if fb:
        st.caption(
            f"Feedback applied: liked {', '.join(fb.get('like') or []) or '—'}; unliked "
            f"{', '.join(fb.get('unlike') or []) or '—'} ({fb.get('method', '')})"
        )
