"""The explanation maps of the query, grouped by family, each with its measured trust."""

from __future__ import annotations

import numpy as np
import streamlit as st

from retrieval.app.state import IMAGE_PX
from retrieval.explain.overlay import overlay

PER_ROW = 4

# one line per family: what its maps are, so a user knows what to compare
FAMILY_NOTES = {
    "CAM family": "coarse maps from a late block's activations and gradients",
    "gradients": "pixel-level maps from (modified) gradients",
    "perturbation": "what changes the answer when regions are hidden",
    "Shapley": "Shapley-value estimates: each region's share of the score",
    "relevance": "layer-wise relevance propagation (rules per layer)",
    "other": "",
}


def grouped(methods: list[str]) -> list[tuple[str, list[str]]]:
    """Methods in the registry's family order, families with none left out."""
    from retrieval.explain.methods import FAMILIES, family_of

    order = list(FAMILIES) + ["other"]
    groups: dict[str, list[str]] = {}
    for m in methods:
        groups.setdefault(family_of(m), []).append(m)
    return [(f, groups[f]) for f in order if f in groups]


def verdict_line(t: dict) -> str:
    """'sanity pass · faithful · 24 cases': the measured verdicts at a glance."""
    parts = []
    if t.get("sanity_check") in ("pass", "fail"):
        parts.append("sanity " + ("pass" if t["sanity_check"] == "pass" else "FAIL"))
    if t.get("faithfulness"):
        parts.append(t["faithfulness"])
    if t.get("n_cases"):
        parts.append(f"{t['n_cases']} cases")
    return " · ".join(parts)


def flat_note(heat) -> str:
    """A caption for a map with nothing to draw (every value the same after the display's
    scaling): it shows as the bare image, which would read as a missing overlay."""
    from retrieval.explain.overlay import normalize_map

    if float(normalize_map(heat).max()) > 0:
        return ""
    return (
        "Flat map: every pixel scores the same here (for a CAM map: no positive evidence for "
        "the class at its block), so nothing is overlaid."
    )


def trust_caption(result, method: str) -> str:
    if result.ood.flag:
        return (
            "No trust figure: it was measured on cases like the index's, and this image is not one."
        )
    t = (result.trust or {}).get(method)
    if isinstance(t, dict) and t.get("summary"):
        n = t.get("n_cases")
        on = f" (measured on {n} {t.get('split', 'test')} cases)" if n else ""
        head = verdict_line(t)
        head = f"**{head}**. " if head else ""
        return f"{head}Measured trust{on}: {t['summary']}."
    return "Trust not measured yet — run `casebase explain-eval INDEX MANIFEST`."


def show(result, pixels: np.ndarray, methods: list[str]) -> None:
    st.subheader("Explanation maps")
    shown = [m for m in methods if m in result.maps]
    if not shown:
        st.caption("No map asked for: choose methods in the sidebar.")
        return
    st.image(pixels, caption="query image", width=IMAGE_PX)
    st.caption(f"{pixels.shape[1]}×{pixels.shape[0]} px")
    _grid(result, shown, lambda name: overlay(pixels, result.maps[name]))


def _grid(result, shown: list[str], picture) -> None:
    """The maps by family, PER_ROW to a row, each with its trust caption and sanity panel;
    picture(name) draws one map."""
    for family, names in grouped(shown):
        note = FAMILY_NOTES.get(family, "")
        st.markdown(f"##### {family}" + (f" — {note}" if note else ""))
        for start in range(0, len(names), PER_ROW):
            cols = st.columns(PER_ROW)
            for col, name in zip(cols, names[start : start + PER_ROW], strict=False):
                with col:
                    st.image(picture(name), caption=name, width=IMAGE_PX)
                    if note := flat_note(result.maps[name]):
                        st.caption(note)
                    st.caption(trust_caption(result, name))
                    sanity_panel(result, name)


def show_volume(result, volume, methods: list[str]) -> None:
    """A volume query's maps: one plane / slice control for the query and every map (the
    same voxels side by side). A 2-D model's maps (it read the middle axial slice) are drawn
    on that slice only, and the caption says so."""
    from retrieval.app import volume_view as vv

    st.subheader("Explanation maps")
    shown = [m for m in methods if m in result.maps]
    if not shown:
        st.caption("No map asked for: choose methods in the sidebar.")
        return
    flat = [m for m in shown if np.ndim(result.maps[m]) == 2]
    if flat:
        k = vv.middle(volume.shape)
        st.caption(
            f"This index's model is 2-D: it read the volume's middle axial slice (z {k}), so "
            f"{', '.join(flat)} {'is a map' if len(flat) == 1 else 'are maps'} of that slice, "
            "drawn on it only; scroll to it (axial) to see the overlay."
        )
    with st.container(key="vv_maps"):
        plane, index = vv.controls("maps", volume.shape, "explanation maps")
        st.caption(vv.slice_caption(volume, plane, index))
    st.image(vv.render_slice(volume, plane, index), caption="query volume", width=IMAGE_PX)
    _grid(result, shown, lambda name: vv.render_slice(volume, plane, index, result.maps[name]))


def sanity_panel(result, method: str) -> None:
    """The method's measured randomisation curves (Adebayo et al.'s Fig. 2) under its map,
    folded: the verdict in the caption rests on them. Nothing for an OOD query or an
    unmeasured method."""
    from retrieval.explain import sanity

    t = (result.trust or {}).get(method)
    if result.ood.flag or not sanity.has_curves(t):
        return
    import matplotlib.pyplot as plt

    with st.expander(f"sanity check: {t['sanity'].get('verdict', t.get('sanity_check'))}"):
        # a small panel, so that its text stays legible at the column's width
        fig = sanity.curves_figure({method: t}, suptitle=False, panel=(2.6, 2.6))
        st.pyplot(fig)
        plt.close(fig)
        st.caption(
            "Similarity of the map to the trained model's as blocks are randomised from the "
            "top (solid) or one at a time (dashed); a map that stays alike (|ρ| above the "
            "dotted line) shows the network, not what it learnt."
        )
