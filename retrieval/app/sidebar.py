"""The sidebar: how many neighbours, which maps, which cases may be retrieved."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import streamlit as st

from retrieval.app.state import DEFAULT_METHODS, expensive_methods, methods_available


@dataclass
class Settings:
    k: int
    methods: list[str]
    filters: dict = field(default_factory=dict)
    exclude_self: bool = True  # leave the query out when it is an indexed case itself
    concepts: dict = field(default_factory=dict)  # {stored concept: weight != 0}, as in SMILY

    def key(self, exclude_patient: bool) -> tuple:
        """What a stored result must match to still be the answer to the current settings."""
        return (
            self.k,
            tuple(self.methods),
            exclude_patient,
            self.exclude_self,
            tuple(sorted((n, tuple(v)) for n, v in self.filters.items())),
            tuple(sorted(self.concepts.items())),
        )


def filters(r) -> dict:
    st.sidebar.subheader("Filter the neighbours")
    chosen_filters: dict = {}
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
                chosen_filters[name] = [
                    v for v, x in zip(values, numeric, strict=True) if chosen[0] <= x <= chosen[1]
                ]
        else:
            chosen = st.sidebar.multiselect(name, values, key=f"filter_{name}", placeholder="any")
            if chosen:
                chosen_filters[name] = chosen
    if chosen_filters:
        st.sidebar.caption(
            "Only cases matching every filter are searched (the neighbour vote "
            "changes with them; the model's prediction does not)."
        )
    return chosen_filters


def concept_sliders(index_dir: Path) -> dict[str, float]:
    """One slider per concept stored in the bundle (casebase concepts --store), as in SMILY:
    a negative weight moves the search away from the concept, a positive one towards it."""
    from retrieval.concepts.store import stored_concepts
    from retrieval.errors import CasebaseError

    try:
        info = stored_concepts(index_dir)
    except CasebaseError as err:
        st.sidebar.warning(f"Stored concepts unreadable: {err}")
        return {}
    if not info:
        return {}
    st.sidebar.subheader("Refine by concept")
    weights = {}
    for name, v in sorted(info.items()):
        sig = v.get("significant_classes") or []
        w = st.sidebar.slider(
            name,
            -2.0,
            2.0,
            0.0,
            0.5,
            key=f"concept_{name}",
            help=f"{v.get('kind', '')} concept ({v.get('spec', '')}); TCAV-significant for "
            f"{', '.join(sig) or 'no class'}. -1 drops the concept's part of every similarity, "
            "-2 prefers cases without it, +1 doubles it.",
        )
        if w != 0.0:
            weights[name] = float(w)
    if weights:
        st.sidebar.caption("The query is moved along the concepts before the search.")
    return weights


def settings(r, index_dir: Path, manifest: Path | None) -> Settings:
    sb = st.sidebar
    sb.header("Query settings")
    k = sb.slider("Neighbours (k)", 1, 20, 5)
    available = methods_available()  # every method runs on a volume model too
    methods = sb.multiselect(
        "Explanation maps",
        available,
        default=[m for m in DEFAULT_METHODS if m in available],
        help="For the query: the predicted class. For each neighbour: the similarity, on both "
        "images. " + ", ".join(sorted(expensive_methods())) + " cost tens to hundreds of "
        "forward passes: expect seconds to a minute on a CPU.",
    )
    exclude_self = sb.checkbox(
        "Leave out the query itself when it is an indexed case",
        value=True,
        key="exclude_self",
        help="An indexed case queried again is its own best match (similarity 1.000), which "
        "says nothing about other patients.",
    )
    chosen = filters(r)
    concepts = concept_sliders(index_dir)
    with sb.expander("About this index"):
        cfg = r.meta.get("model", {})
        st.caption(
            f"{len(r.cases)} cases · classes {', '.join(r.classes)} · backbone "
            f"{cfg.get('backbone', '?')} · {cfg.get('image_size', '?')} px · "
            f"{r.weighting} weighting · FAISS {r.meta.get('faiss', {}).get('factory', '?')}"
        )
        st.caption(f"Index: `{index_dir}`" + (f" · manifest: `{manifest}`" if manifest else ""))
    return Settings(k, list(methods), chosen, exclude_self, concepts)
