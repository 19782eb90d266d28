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
from retrieval.app.volume_view import REGION
from retrieval.errors import CasebaseError
from retrieval.explain.overlay import draw_boxes

REGION_COLOR = REGION  # the searched box (blue); matched regions stay green / orange
BOX_TEXT = "region_text"  # session key of the typed / drawn box "X0,Y0,X1,Y1" (volume: 6)
BOX_FOR = "region_for"  # which query input the box belongs to
DRAG_SEEN = "region_drag_seen"  # the component's last drag already taken into the box
THUMB = "thumb"  # session keys f"{THUMB}_{step uid}_{case id}": 1 👍, 0 👎


def parse_box(text: str) -> Box:
    """'X0,Y0,X1,Y1' in the query's pixels (or 'X0,Y0,Z0,X1,Y1,Z1' in a volume's voxels) -> a
    box; CasebaseError with the reason otherwise.

    The service checks the box against the image and its feature cells; this only reads it."""
    from retrieval.service.refine import parse_box as parse

    return tuple(int(round(v)) for v in parse(text))


def box_form(axes: int) -> str:
    """How a box of 2 (an image) or 3 (a volume) axes is typed."""
    return "X0,Y0,Z0,X1,Y1,Z1" if axes == 3 else "X0,Y0,X1,Y1"


def check_box(text: str, axes: int = 2) -> tuple[Box | None, str]:
    """A typed box of `axes` axes -> (box, ''), or (None, what is wrong with it); (None, '')
    without text. Its form and order only: the service checks it against the query."""
    if not text.strip():
        return None, ""
    try:
        box = parse_box(text)
    except CasebaseError:
        box = ()
    if len(box) != 2 * axes:
        return None, f"'{text}' is not a box: use {box_form(axes)}"
    if any(box[axes + a] <= box[a] for a in range(axes)):
        order = [f"{c}0 < {c}1" for c in "XYZ"[:axes]]
        order = f"{', '.join(order[:-1])} and {order[-1]}"
        return None, f"'{text}' is an empty or inverted box: {order}"
    return box, ""


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


def box_text_of(input_id: str) -> str:
    """The typed / drawn box of this query input ('' for a new input: no box yet)."""
    if st.session_state.get(BOX_FOR) != input_id:
        st.session_state[BOX_FOR] = input_id
        st.session_state[BOX_TEXT] = ""
    return st.session_state.get(BOX_TEXT, "")


def box_value(box: Box) -> str:
    """A box as the text field holds it: 'X0,Y0,X1,Y1' (or six numbers)."""
    return ",".join(str(v) for v in box)


def set_box(box: Box) -> None:
    """Take a drawn box into the text and redraw the picker with it."""
    st.session_state[BOX_TEXT] = box_value(box)
    st.rerun()


def can_drag() -> bool:
    """Whether the drag component (streamlit-image-coordinates) is installed; without it the
    app still works: type the box."""
    try:
        import streamlit_image_coordinates  # noqa: F401
    except ImportError:
        return False
    return True


def new_drag(image: np.ndarray) -> dict | None:
    """The drag component showing `image` (display pixels); a drag not taken yet, else None."""
    from streamlit_image_coordinates import streamlit_image_coordinates

    value = streamlit_image_coordinates(
        image, width=IMAGE_PX, key="region_drag", click_and_drag=True, cursor="crosshair"
    )
    if not value or value.get("unix_time") == st.session_state.get(DRAG_SEEN):
        return None
    st.session_state[DRAG_SEEN] = value.get("unix_time")
    return value


def region_picker(pixels: np.ndarray, size: tuple[int, int], input_id: str) -> Box | None:
    """The query image to drag a box on, and the box as text; the current box (or None)."""
    current, problem = check_box(box_text_of(input_id))
    if not can_drag():
        st.image(with_region(pixels, current), caption="query", width=IMAGE_PX)
        st.caption("Type a box below to search with a part of the image.")
    else:
        value = new_drag(_display(pixels, current))
        st.caption("query · drag on it to draw a box")
        box = drag_to_box(value, size) if value else None
        if box is not None:
            set_box(box)
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
                trail.whole.capitalize(),
                key="trail_whole",
                help=f"Search with the {trail.whole} again, keeping the 👍 / 👎 given so far",
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
