"""One retrieved case: both images with the matched regions, what it is, and its pair maps."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import streamlit as st

from retrieval.app.state import IMAGE_PX, display_pixels, expensive_methods
from retrieval.explain.overlay import draw_boxes, overlay


def similarity_text(nb) -> tuple[str, str]:
    """(short, long) similarity wording: the calibrated 0–1 score when the service gives one,
    else the raw cosine."""
    score = getattr(nb, "similarity_score", None)
    if score is not None:
        return f"sim {score:.2f}", f"similarity score {score:.2f} (cosine {nb.similarity:.4f})"
    return f"sim {nb.similarity:.3f}", f"cosine similarity {nb.similarity:.3f}"


def show_all(
    result,
    pixels: np.ndarray,
    methods: list[str],
    thumbs: Callable[[str], str] | None = None,
    liked: set[str] | frozenset[str] = frozenset(),
) -> None:
    """thumbs: case id -> the session key of that card's 👍 / 👎 (none shown without it);
    liked: cases liked in an earlier step of the refinement trail."""
    st.subheader("Nearest cases")
    if not result.neighbors:
        st.caption("No indexed case matches the filters.")
        return
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
    for rank, nb in enumerate(result.neighbors, 1):
        card(rank, nb, pixels, methods, thumbs(nb.case_id) if thumbs else None, nb.case_id in liked)


def card(
    rank: int,
    nb,
    pixels: np.ndarray,
    methods: list[str],
    thumbs_key: str | None = None,
    was_liked: bool = False,
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
            for i, g in enumerate(regions, 1):
                q, c = g.query_box, g.case_box
                st.caption(
                    f"region {i}: query x {q[0]}–{q[2]}, y {q[1]}–{q[3]} ↔ case x "
                    f"{c[0]}–{c[2]}, y {c[1]}–{c[3]} ({g.share:.1%} of the similarity)"
                )
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
