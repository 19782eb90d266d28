"""The explanation maps of the query, each with its measured trust."""

from __future__ import annotations

import numpy as np
import streamlit as st

from retrieval.app.state import IMAGE_PX
from retrieval.explain.overlay import overlay

PER_ROW = 4


def trust_caption(result, method: str) -> str:
    if result.ood.flag:
        return (
            "No trust figure: it was measured on cases like the index's, and this image is not one."
        )
    t = (result.trust or {}).get(method)
    if isinstance(t, dict) and t.get("summary"):
        n = t.get("n_cases")
        on = f" (measured on {n} {t.get('split', 'test')} cases)" if n else ""
        return f"Measured trust{on}: {t['summary']}."
    return "Trust not measured yet — run `casebase explain-eval INDEX MANIFEST`."


def show(result, pixels: np.ndarray, methods: list[str]) -> None:
    st.subheader("Explanation maps")
    shown = [m for m in methods if m in result.maps]
    if not shown:
        st.caption("No map asked for: choose methods in the sidebar.")
        return
    items = [("query", None), *[(m, result.maps[m]) for m in shown]]
    for start in range(0, len(items), PER_ROW):
        cols = st.columns(PER_ROW)
        for col, (name, heat) in zip(cols, items[start : start + PER_ROW], strict=False):
            with col:
                if heat is None:
                    st.image(pixels, caption="query image", width=IMAGE_PX)
                    st.caption(f"{pixels.shape[1]}×{pixels.shape[0]} px")
                else:
                    st.image(overlay(pixels, heat), caption=name, width=IMAGE_PX)
                    st.caption(trust_caption(result, name))
