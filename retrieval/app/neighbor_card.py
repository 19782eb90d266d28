"""One retrieved case: both images with the matched regions, what it is, and its pair maps."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import streamlit as st

from retrieval.app import volume_view as vv
from retrieval.app.state import IMAGE_PX, display_pixels, display_volume, expensive_methods
from retrieval.explain.overlay import draw_boxes, overlay
from retrieval.service.results import box_ranges


def similarity_text(nb) -> tuple[str, str]:
    """(short, long) similarity wording: the calibrated 0–1 score when the service gives one,
    else the raw cosine."""
    score = getattr(nb, "similarity_score", None)
    if score is not None:
        return f"sim {score:.2f}", f"similarity score {score:.2f} (cosine {nb.similarity:.4f})"
    return f"sim {nb.similarity:.3f}", f"cosine similarity {nb.similarity:.3f}"


def _header(result, thumbs) -> bool:
    """The gallery's heading and captions; False when there is no neighbour."""
    st.subheader("Nearest cases")
    if not result.neighbors:
        st.caption("No indexed case matches the filters.")
        return False
    st.caption(
        "Boxes: the matched regions (green: the largest term of the similarity "
        "decomposition, orange: the next ones), in the same order on both images."
    )
    scale = getattr(result, "similarity_scale", None) or {}
    if scale.get("method"):
        st.caption(f"Similarity score: {scale['method']}.")
    if thumbs is not None:
        st.caption(
            "👍 / 👎 on a card marks it as like / not like what you are looking for; "
            "**Refine** searches again with the marks."
        )
    return True


def region_text(i: int, g) -> str:
    """'region 1: query x 0–7, y 8–15[, z 2–4] ↔ case ... (12.0% of the similarity)': ranges
    inclusive (the box [0, 8, 8, 16] covers x 0–7), see results.box_ranges."""
    return (
        f"region {i}: query {box_ranges(g.query_box)} ↔ case {box_ranges(g.case_box)} "
        f"({g.share:.1%} of the similarity)"
    )


def _info(
    rank: int, nb, thumbs_key: str | None, was_liked: bool, query_area: float | None = None
) -> None:
    """The card's text column: what the case is, its scores, 👍 / 👎 and its regions."""
    _, long = similarity_text(nb)
    st.markdown(f"**#{rank} {nb.case_id}** — {nb.label}, {long}")
    attrs = " · ".join(f"{k}: {v}" for k, v in nb.attributes.items() if str(v) != "")
    if attrs:
        st.caption(attrs)
    st.caption(f"patient {nb.patient_id or '—'} (pseudonymised)")
    region_score = getattr(nb, "region_score", None)
    if region_score is not None:
        st.caption(
            f"region match {region_score:.3f} (mean over the box's cells of the best "
            "matching cell of this case)"
        )
    if thumbs_key is not None:
        with st.container(key=f"thumbs_{nb.case_id}", horizontal=True):
            st.feedback("thumbs", key=thumbs_key)
            if was_liked:
                st.caption("liked in an earlier step")
    for i, g in enumerate(nb.matched_regions, 1):
        st.caption(region_text(i, g))
    size = lesion_size_text(nb, query_area)
    if size:
        st.caption(size)


def lesion_size_text(nb, query_area: float | None) -> str:
    """'lesion ≈ 3.4% of the image (query 3.1%): size agreement is 28% of the similarity', for
    models with a lesion-extent head ("" otherwise)."""
    area = getattr(nb, "lesion_area", None)
    if area is None or query_area is None:
        return ""
    share = getattr(nb, "lesion_size_share", None) or 0.0
    return (
        f"lesion ≈ {area:.1%} of the image (query {query_area:.1%}): agreement in lesion size "
        f"is {share:.0%} of the similarity"
    )


def show_all_volumes(
    result,
    volume: vv.ShownVolume,
    methods: list[str],
    thumbs: Callable[[str], str] | None = None,
    liked: set[str] | frozenset[str] = frozenset(),
    region: Sequence[int] | None = None,
) -> None:
    """The gallery of a volume query: per card, a slice scroller for the query and one for
    the case, and a button moving both to the matched region's slice. region: the searched
    box, drawn in blue on the query's slices it spans."""
    if not _header(result, thumbs):
        return
    st.caption(
        "Each card scrolls on its own: pick the plane and the slice, or jump to the slice "
        "through the centre of the green region."
    )
    for rank, nb in enumerate(result.neighbors, 1):
        volume_card(
            rank,
            nb,
            volume,
            methods,
            thumbs(nb.case_id) if thumbs else None,
            nb.case_id in liked,
            region,
        )


def volume_card(
    rank: int,
    nb,
    volume: vv.ShownVolume,
    methods: list[str],
    thumbs_key: str | None = None,
    was_liked: bool = False,
    region: Sequence[int] | None = None,
) -> None:
    short, _ = similarity_text(nb)
    regions = nb.matched_regions
    q_key, c_key = f"nb{rank}_query", f"nb{rank}_case"
    case_vol = display_volume(str(nb.image))
    with st.container(border=True, key=f"volume_card_{rank}"):
        c_query, c_case, c_info = st.columns([1, 1, 1.4])
        with c_query:
            boxes = [g.query_box for g in regions]
            vv.show(q_key, volume, boxes=boxes, caption=f"query · #{rank}", region=region)
        with c_case:
            if case_vol is not None:
                vv.show(c_key, case_vol, boxes=[g.case_box for g in regions])
            else:
                case_px = display_pixels(nb.image)
                if case_px is None:
                    st.caption("(image unavailable)")
                else:
                    st.image(draw_boxes(case_px, [g.case_box for g in regions]), width=IMAGE_PX)
            st.caption(f"{nb.case_id} · {nb.label} · {short}")
        with c_info:
            _info(rank, nb, thumbs_key, was_liked)
            targets = []
            if regions:
                targets.append((q_key, regions[0].query_box, volume.shape))
                if case_vol is not None:
                    targets.append((c_key, regions[0].case_box, case_vol.shape))
            vv.jump_button(targets, key=f"jump_{rank}")
        volume_pair_maps(nb, volume, case_vol, methods, q_key, c_key)


def volume_pair_maps(nb, volume, case_vol, methods, q_key: str, c_key: str) -> None:
    """The pair's maps on the slices the card's two scrollers show."""
    pair = [m for m in methods if m in nb.maps]
    skipped = [m for m in methods if m not in nb.maps and m in expensive_methods()]
    if not (pair or skipped):
        return
    with st.expander(f"Maps of this pair: {', '.join(pair) or 'none'}"):
        st.caption(
            "Each map explains the similarity score: on the query with this case held fixed, "
            "and on the case with the query held fixed; on the slices the card shows."
        )
        qp, qi = vv.current(q_key, volume.shape)
        for m in pair:
            a, b = st.columns(2)
            a.image(
                vv.render_slice(volume, qp, qi, nb.maps[m]["query"]),
                caption=f"{m} · query · {qp} {qi}",
                width=IMAGE_PX,
            )
            if case_vol is not None:
                cp, ci = vv.current(c_key, case_vol.shape)
                b.image(
                    vv.render_slice(case_vol, cp, ci, nb.maps[m]["case"]),
                    caption=f"{m} · {nb.case_id} · {cp} {ci}",
                    width=IMAGE_PX,
                )
        if skipped:
            st.caption(f"{', '.join(skipped)}: expensive, computed for the top neighbour only.")


def show_all(
    result,
    pixels: np.ndarray,
    methods: list[str],
    thumbs: Callable[[str], str] | None = None,
    liked: set[str] | frozenset[str] = frozenset(),
) -> None:
    """thumbs: case id -> the session key of that card's 👍 / 👎 (none shown without it);
    liked: cases liked in an earlier step of the refinement trail."""
    if not _header(result, thumbs):
        return
    area = getattr(result, "lesion_area", None)
    for rank, nb in enumerate(result.neighbors, 1):
        card(
            rank,
            nb,
            pixels,
            methods,
            thumbs(nb.case_id) if thumbs else None,
            nb.case_id in liked,
            area,
        )


def card(
    rank: int,
    nb,
    pixels: np.ndarray,
    methods: list[str],
    thumbs_key: str | None = None,
    was_liked: bool = False,
    query_area: float | None = None,
) -> None:
    short, long = similarity_text(nb)
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
            st.caption(f"{nb.case_id} · {nb.label} · {short}")
        with c_info:
            _info(rank, nb, thumbs_key, was_liked, query_area)
        pair_maps(nb, pixels, case_px, methods)


def pair_maps(nb, pixels: np.ndarray, case_px: np.ndarray | None, methods: list[str]) -> None:
    pair = [m for m in methods if m in nb.maps]
    skipped = [m for m in methods if m not in nb.maps and m in expensive_methods()]
    if not (pair or skipped):
        return
    with st.expander(f"Maps of this pair: {', '.join(pair) or 'none'}"):
        st.caption(
            "Each map explains the similarity score: on the query with this "
            "case held fixed, and on the case with the query held fixed."
        )
        for m in pair:
            a, b = st.columns(2)
            a.image(overlay(pixels, nb.maps[m]["query"]), caption=f"{m} · query", width=IMAGE_PX)
            if case_px is not None:
                b.image(
                    overlay(case_px, nb.maps[m]["case"]),
                    caption=f"{m} · {nb.case_id}",
                    width=IMAGE_PX,
                )
        if skipped:
            st.caption(f"{', '.join(skipped)}: expensive, computed for the top neighbour only.")
