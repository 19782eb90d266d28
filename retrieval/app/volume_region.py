"""Drawing a region on a volume query: the in-plane box dragged on an axial slice (the 2-D
picker's component, retrieval.app.refine), a range of slices, or the six numbers typed.

The box is ``[x0, y0, z0, x1, y1, z1]`` in the volume's original voxels, ends exclusive, as
CaseRetriever.query(region=...) and ``casebase query --region X0,Y0,Z0,X1,Y1,Z1`` take it; the
range slider shows its slices inclusive (first, last = z1 - 1). The helpers above the
``# --- Streamlit`` line are pure and unit-tested; the service checks the box against the volume
and its feature cells.
"""

from __future__ import annotations

import numpy as np
import streamlit as st

from retrieval.app import refine
from retrieval.app import volume_view as vv
from retrieval.app.trail import Box

HALF = 2  # a box drawn without a slice range spans this many slices either side of the slice
KEY = "preview"  # the query's scroller (volume_view panel key)


def slices_around(index: int, depth: int, half: int = HALF) -> tuple[int, int]:
    """The slices (first, last) ``half`` either side of ``index``, inside a volume ``depth`` deep."""
    i = int(np.clip(index, 0, depth - 1))
    return max(0, i - half), min(depth - 1, i + half)


def volume_box(xy: Box, slices: tuple[int, int]) -> Box:
    """An in-plane box (x0, y0, x1, y1) and the slices (first, last) it spans, inclusive, as the
    volume's box (x0, y0, z0, x1, y1, z1), ends exclusive."""
    first, last = sorted(int(s) for s in slices)
    return (xy[0], xy[1], first, xy[2], xy[3], last + 1)


def box_slices(box: Box, depth: int) -> tuple[int, int]:
    """A volume box's slices (first, last) for the range slider, clipped inside the volume (a
    typed box may run past it: the service says so when it is searched)."""
    first = int(np.clip(box[2], 0, depth - 1))
    return first, int(np.clip(box[5] - 1, first, depth - 1))


def with_slices(box: Box, slices: tuple[int, int]) -> Box:
    """The box over other slices, the same in-plane."""
    return volume_box((box[0], box[1], box[3], box[4]), slices)


def drawn_box(
    value: dict, shape: tuple[int, int, int], slices: tuple[int, int], index: int
) -> Box | None:
    """A drag on axial slice ``index`` of a (D, H, W) volume (the component's display pixels)
    as the volume's box in original voxels: in-plane clamped to the slice (drag_to_box), over
    the chosen slices, or those around ``index`` when they miss the slice drawn on; None for
    a click without a drag."""
    d, h, w = shape
    xy = refine.drag_to_box(value, (h, w))
    if xy is None:
        return None
    if not slices[0] <= index <= slices[1]:
        slices = slices_around(index, d)
    return volume_box(xy, slices)


# --------------------------------------------------------------------------- Streamlit

SLICES = "region_slices"  # session key of the slice-range slider (first, last)
SLICES_SET = "region_slices_set"  # the input whose slice range the user has set


def _axial(shape) -> int:
    """The preview's axial slice (the one a box is drawn on)."""
    d = int(shape[0])
    return int(np.clip(st.session_state.get(vv.slice_key(KEY, "axial"), d // 2), 0, d - 1))


def _slices(shape, box: Box | None, input_id: str) -> tuple[int, int]:
    """The slice range to show (set before its slider exists): the box's; without one, the
    range the user set, else the slices around the axial slice shown."""
    d = int(shape[0])
    if box is not None:
        r = box_slices(box, d)
    elif st.session_state.get(SLICES_SET) == input_id and SLICES in st.session_state:
        r = tuple(int(np.clip(v, 0, d - 1)) for v in st.session_state[SLICES])
    else:
        r = slices_around(_axial(shape), d)
    st.session_state[SLICES] = r
    return r


def _slices_moved(input_id: str) -> None:
    """Range slider callback: remember the user set it; a box in the text takes the slices."""
    st.session_state[SLICES_SET] = input_id
    box, _ = refine.check_box(st.session_state.get(refine.BOX_TEXT, ""), 3)
    if box is not None:
        st.session_state[refine.BOX_TEXT] = refine.box_value(
            with_slices(box, st.session_state[SLICES])
        )


def _slice(vol: vv.ShownVolume, plane: str, index: int, box, slices) -> None:
    """The slice shown: on the axial plane the drag component (a drag sets the box), on the
    others a picture; the box drawn in blue where the slice cuts it."""
    picture = vv.render_slice(vol, plane, index, width=refine.IMAGE_PX, region=box)
    if plane != "axial" or not refine.can_drag():
        st.image(picture, width=refine.IMAGE_PX)
        how = "type a box below" if plane == "axial" else "draw a box on the axial plane"
        st.caption(f"query volume · {how} · {vv.slice_caption(vol, plane, index)}")
        return
    value = refine.new_drag(picture)
    st.caption(
        f"query volume · drag on the slice to draw a box · {vv.slice_caption(vol, plane, index)}"
    )
    drawn = drawn_box(value, vol.shape, slices, index) if value else None
    if drawn is not None:
        refine.set_box(drawn)


def picker(vol: vv.ShownVolume, input_id: str) -> Box | None:
    """The query volume's scroller to draw a box on (drag on an axial slice), the box's slice
    range and the box as text; the current box (or None)."""
    box, problem = refine.check_box(refine.box_text_of(input_id), 3)
    d, h, w = vol.shape
    with st.container(key=f"vv_{KEY}"):
        plane, index = vv.controls(KEY, vol.shape, "query volume")
        slices = _slices(vol.shape, box, input_id)
        _slice(vol, plane, index, box, slices)
    if d >= 2:
        st.slider(
            "Slices of the box (z, first–last)",
            0,
            d - 1,
            key=SLICES,
            on_change=_slices_moved,
            args=(input_id,),
            help="A box drawn on an axial slice spans these slices; the box's Z1 is the last + 1",
        )
    st.text_input(
        f"Box in voxels {refine.box_form(3)} (volume {w}×{h}×{d}, x×y×z)",
        key=refine.BOX_TEXT,
        placeholder="drag on an axial slice, or type e.g. 4,4,2,20,20,6",
    )
    if problem:
        st.caption(problem)
    if box is not None and vv.box_rect(box, plane, index, vol.shape) is None:
        vv.jump_button([(KEY, box, vol.shape)], key="region_jump", label="Jump to the box")
    return box
