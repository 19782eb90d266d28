"""The app's slice scroller for volumes (issue 23): pure slicing helpers, then the Streamlit view.

Axis conventions are :mod:`retrieval.data.volume`'s: a volume is ``(D, H, W)`` (``D`` the
slice axis, ascending inferior -> superior for a standard axial series; ``H`` rows,
anterior -> posterior; ``W`` columns, patient right -> left), its spacing ``(z, y, x)`` mm.
A matched region from a volume model is ``[x0, y0, z0, x1, y1, z1]`` in original voxels,
ends exclusive; a 2-D box ``[x0, y0, x1, y1]`` (a 2-D model that read the middle axial
slice, as ``read_image`` gives it) lies on that slice, ``D // 2``.

The planes as a viewer shows them:

* ``axial``: fixed z, rows y, columns x (``volume[z]``);
* ``coronal``: fixed y, rows z with the highest slice on top, columns x;
* ``sagittal``: fixed x, rows z with the highest slice on top, columns y.

Pixels are drawn square in millimetres when the spacing is known (NIfTI, DICOM), one
voxel a pixel otherwise (``.npy``). The helpers above the ``# --- Streamlit`` line are
pure (numpy / PIL) and unit-tested; the view below them only lays them out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

PLANES = ("axial", "coronal", "sagittal")
AXIS = {"axial": 0, "coronal": 1, "sagittal": 2}  # the (D, H, W) axis a plane holds fixed
AXIS_NAME = {"axial": "z", "coronal": "y", "sagittal": "x"}
FIRST = (0, 255, 0)  # the largest term of the similarity decomposition, as on 2-D images
OTHERS = (255, 200, 0)
REGION = (0, 140, 255)  # the searched box (blue), as on 2-D images (retrieval.app.refine)


@dataclass(frozen=True)
class ShownVolume:
    """A volume as the app shows it: ``array`` (D, H, W) uint8 (the model's window applied),
    ``spacing`` (z, y, x) mm or None when the file does not say (``.npy``)."""

    array: np.ndarray
    spacing: tuple[float, float, float] | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]


def shown_volume(vol) -> ShownVolume:
    """A :class:`retrieval.data.volume.Volume` (or a (D, H, W) array in [0, 1]) for display."""
    arr = np.asarray(getattr(vol, "array", vol), dtype=np.float32)
    if arr.ndim != 3:
        raise ValueError(f"a volume is (D, H, W), got shape {arr.shape}")
    pix = (np.clip(np.nan_to_num(arr), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    spacing = getattr(vol, "spacing", None)
    known = getattr(vol, "meta", {}).get("spacing_known", spacing is not None)
    return ShownVolume(pix, tuple(float(s) for s in spacing) if spacing and known else None)


def _plane(plane: str) -> int:
    if plane not in AXIS:
        raise ValueError(f"unknown plane {plane!r} (one of {', '.join(PLANES)})")
    return AXIS[plane]


def n_slices(shape: Sequence[int], plane: str) -> int:
    """How many slices a plane has through a (D, H, W) volume."""
    return int(shape[_plane(plane)])


def middle(shape: Sequence[int], plane: str = "axial") -> int:
    """The middle slice (``D // 2`` axially: the slice a 2-D model reads)."""
    return n_slices(shape, plane) // 2


def plane_slice(volume: np.ndarray, plane: str, index: int) -> np.ndarray:
    """The 2-D cut of a (D, H, W) array (a volume or a map) as displayed; index clipped."""
    v = np.asarray(volume)
    if v.ndim != 3:
        raise ValueError(f"a volume is (D, H, W), got shape {v.shape}")
    axis = _plane(plane)
    i = int(np.clip(index, 0, v.shape[axis] - 1))
    if plane == "axial":
        return v[i]
    cut = v[:, i, :] if plane == "coronal" else v[:, :, i]
    return cut[::-1]  # the highest slice on top


def pixel_spacing(spacing: Sequence[float] | None, plane: str) -> tuple[float, float]:
    """(row, column) mm of a plane's pixels; (1, 1) when the spacing is unknown."""
    if spacing is None:
        return 1.0, 1.0
    z, y, x = (float(s) for s in spacing)
    return {"axial": (y, x), "coronal": (z, x), "sagittal": (z, y)}[plane]


def aspect(spacing: Sequence[float] | None, plane: str) -> float:
    """Display height / width of one pixel of the plane (row mm / column mm), 1 when unknown."""
    row, col = pixel_spacing(spacing, plane)
    if not (np.isfinite(row) and np.isfinite(col)) or row <= 0 or col <= 0:
        return 1.0
    return row / col


def display_size(
    slice_shape: Sequence[int], spacing: Sequence[float] | None, plane: str, width: int
) -> tuple[int, int]:
    """(height, width) in screen pixels of a (rows, cols) slice drawn ``width`` wide,
    its pixels square in mm."""
    rows, cols = int(slice_shape[0]), int(slice_shape[1])
    height = rows * (width / cols) * aspect(spacing, plane)
    return max(1, round(height)), int(width)


def as_box3d(box: Sequence[int], shape: Sequence[int]) -> list[int]:
    """A 6-box as is; a 2-D box [x0, y0, x1, y1] (a 2-D model's, on the middle axial slice)
    as the 3-D box of that slice."""
    b = [int(round(float(v))) for v in box]
    if len(b) == 6:
        return b
    if len(b) == 4:
        k = middle(shape)
        return [b[0], b[1], k, b[2], b[3], k + 1]
    raise ValueError(f"a box is [x0, y0, x1, y1] or [x0, y0, z0, x1, y1, z1], got {list(box)}")


def _span(box: Sequence[int], axis: int) -> tuple[int, int]:
    """[lo, hi) of a 6-box along a (D, H, W) axis."""
    xyz = {0: 2, 1: 1, 2: 0}[axis]  # D is z, H is y, W is x
    return int(box[xyz]), int(box[xyz + 3])


def jump_index(box: Sequence[int], plane: str, shape: Sequence[int]) -> int:
    """The slice of a plane through the box's centre (its lower middle voxel when the box is
    an even number of slices thick), clipped inside the volume."""
    b = as_box3d(box, shape)
    axis = _plane(plane)
    lo, hi = _span(b, axis)
    centre = (lo + max(hi, lo + 1) - 1) // 2
    return int(np.clip(centre, 0, int(shape[axis]) - 1))


def box_rect(
    box: Sequence[int], plane: str, index: int, shape: Sequence[int]
) -> tuple[int, int, int, int] | None:
    """A box's rectangle [x0, y0, x1, y1) on a plane's slice, in that slice's displayed
    pixels (see :func:`plane_slice`), clipped to it; None when the slice misses the box."""
    b = as_box3d(box, shape)
    d, h, w = (int(s) for s in shape)
    lo, hi = _span(b, _plane(plane))
    if not lo <= index < hi:
        return None
    x0, y0, z0, x1, y1, z1 = b
    if plane == "axial":
        rect, (rows, cols) = (x0, y0, x1, y1), (h, w)
    elif plane == "coronal":
        rect, (rows, cols) = (x0, d - z1, x1, d - z0), (d, w)
    else:
        rect, (rows, cols) = (y0, d - z1, y1, d - z0), (d, h)
    c0, r0 = max(rect[0], 0), max(rect[1], 0)
    c1, r1 = min(rect[2], cols), min(rect[3], rows)
    if c1 <= c0 or r1 <= r0:
        return None
    return c0, r0, c1, r1


def heat_slice(
    heat: np.ndarray | None, plane: str, index: int, shape: Sequence[int]
) -> np.ndarray | None:
    """The map's cut shown with a slice: a (D, H, W) map cut like the volume; a 2-D map
    (a 2-D model's, of the middle axial slice) on that slice only; None elsewhere."""
    if heat is None:
        return None
    h = np.asarray(heat)
    if h.ndim == 3:
        return plane_slice(h, plane, index)
    if h.ndim == 2 and plane == "axial" and index == middle(shape):
        return h
    return None


def render_slice(
    vol: ShownVolume,
    plane: str,
    index: int,
    heat: np.ndarray | None = None,
    boxes: Sequence[Sequence[int]] = (),
    width: int = 240,
    region: Sequence[int] | None = None,
) -> np.ndarray:
    """(h, width, 3) uint8: the slice (map overlaid when it has one here), pixels square in mm,
    the boxes the slice cuts drawn (the first green, the others orange, as on 2-D images) over
    the searched region (blue)."""
    from retrieval.explain.overlay import overlay

    cut = plane_slice(vol.array, plane, index)
    rgb = np.repeat(cut[..., None], 3, axis=2)
    hs = heat_slice(heat, plane, index, vol.shape)
    if hs is not None:
        rgb = overlay(rgb, hs)
    out_h, out_w = display_size(cut.shape, vol.spacing, plane, width)
    img = Image.fromarray(np.ascontiguousarray(rgb)).resize((out_w, out_h), Image.NEAREST)
    sx, sy = out_w / cut.shape[1], out_h / cut.shape[0]
    from PIL import ImageDraw

    draw = ImageDraw.Draw(img)
    line = max(2, round(min(out_w, out_h) / 120))
    shapes = [(box, FIRST if i == 0 else OTHERS) for i, box in enumerate(boxes)]
    if region is not None:
        shapes.append((region, REGION))
    for box, colour in reversed(shapes):  # the first drawn last, on top
        r = box_rect(box, plane, index, vol.shape)
        if r is None:
            continue
        xy = [
            round(r[0] * sx),
            round(r[1] * sy),
            max(round(r[2] * sx) - 1, round(r[0] * sx)),
            max(round(r[3] * sy) - 1, round(r[1] * sy)),
        ]
        draw.rectangle(xy, outline=colour, width=line)
    return np.asarray(img)


def slice_caption(vol: ShownVolume, plane: str, index: int) -> str:
    """'axial z 3 of 0–7 · 8×32×32 voxels · 7.5×5×5 mm' (or 'spacing unknown')."""
    n = n_slices(vol.shape, plane)
    d, h, w = vol.shape
    sp = (
        "×".join(f"{s:g}" for s in vol.spacing) + " mm"
        if vol.spacing is not None
        else "spacing unknown: 1 voxel = 1 pixel"
    )
    return f"{plane} {AXIS_NAME[plane]} {index} of 0–{n - 1} · {d}×{h}×{w} voxels · {sp}"


# --------------------------------------------------------------------------- Streamlit


def plane_key(key: str) -> str:
    return f"vv_{key}_plane"


def slice_key(key: str, plane: str) -> str:
    return f"vv_{key}_{plane}"


def controls(key: str, shape: Sequence[int], label: str = "") -> tuple[str, int]:
    """The plane radio and the slice slider of panel ``key`` (session keys ``vv_<key>_...``,
    so several scrollers coexist); returns the (plane, slice) shown."""
    import streamlit as st

    plane = st.radio(
        f"plane{f' ({label})' if label else ''}",
        PLANES,
        horizontal=True,
        key=plane_key(key),
        label_visibility="collapsed",
    )
    n = n_slices(shape, plane)
    sk = slice_key(key, plane)
    if n < 2:
        st.session_state.pop(sk, None)
        return plane, 0
    # set before the slider exists (no default value beside a session value), clipped to this
    # volume: the panel may have shown a taller one before
    st.session_state[sk] = int(np.clip(st.session_state.get(sk, n // 2), 0, n - 1))
    index = st.slider(f"{plane} slice ({AXIS_NAME[plane]})", 0, n - 1, key=sk)
    return plane, int(index)


def current(key: str, shape: Sequence[int]) -> tuple[str, int]:
    """The (plane, slice) panel ``key`` shows (after its controls ran this script run)."""
    import streamlit as st

    plane = st.session_state.get(plane_key(key), PLANES[0])
    n = n_slices(shape, plane)
    return plane, int(np.clip(st.session_state.get(slice_key(key, plane), n // 2), 0, n - 1))


def jump(targets: Sequence[tuple[str, Sequence[int], Sequence[int]]]) -> None:
    """Button callback: each (panel key, box, volume shape) moves that panel's slider, in its
    current plane, to the box's centre slice."""
    import streamlit as st

    for key, box, shape in targets:
        plane = st.session_state.get(plane_key(key), PLANES[0])
        if n_slices(shape, plane) >= 2:
            st.session_state[slice_key(key, plane)] = jump_index(box, plane, shape)


def jump_button(
    targets: Sequence[tuple[str, Sequence[int], Sequence[int]]],
    key: str,
    label: str = "Jump to the matched region",
) -> None:
    import streamlit as st

    st.button(
        label,
        key=key,
        on_click=jump,
        args=(list(targets),),
        disabled=not targets,
        help="Move the sliders to the slice through the centre of the first (green) region",
    )


def show(
    key: str,
    vol: ShownVolume,
    heat: np.ndarray | None = None,
    boxes: Sequence[Sequence[int]] = (),
    caption: str = "",
    width: int = 240,
    region: Sequence[int] | None = None,
) -> tuple[str, int]:
    """One scroller: plane radio, slice slider, the slice with the map and the boxes (and the
    searched region in blue)."""
    import streamlit as st

    with st.container(key=f"vv_{key}"):
        plane, index = controls(key, vol.shape, caption)
        st.image(render_slice(vol, plane, index, heat, boxes, width, region), width=width)
        st.caption((f"{caption} · " if caption else "") + slice_caption(vol, plane, index))
    return plane, index
