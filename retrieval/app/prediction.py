"""The model's answer, the "I don't know" gate in front of it, and the self-match notice."""

from __future__ import annotations

import pandas as pd
import streamlit as st

GREYED = "ood_greyed"  # the container holding an answer shown despite "I don't know"
GREY_CSS = f"<style>.st-key-{GREYED} {{ opacity: 0.45; filter: grayscale(100%); }}</style>"


def ood_gate(result) -> bool:
    """True when the answer may be shown: in distribution, or the user asked for it anyway."""
    if not result.ood.flag:
        return True
    st.warning(
        f"### ⚠️ I don't know\nThis image is unlike the indexed cases (OOD score "
        f"{result.ood.score:.3g}, above the calibrated threshold {result.ood.threshold:.3g}). "
        "The model's guess and the nearest cases are not an answer: they are hidden."
    )
    return st.checkbox(
        "Show the guess and the neighbours anyway (greyed out, not an answer)",
        value=False,
        key="show_anyway",
    )


def greyed():
    """A container drawn greyed out (for an answer shown despite "I don't know")."""
    st.html(GREY_CSS)
    return st.container(key=GREYED)


def self_match_notice(result) -> None:
    sm = getattr(result, "self_match", None)
    if sm is None:
        return
    with st.container(key="self_match"):
        if sm.excluded:
            st.info(
                f"This query is indexed case **{sm.case_id}** itself ({sm.reason}). It is left "
                "out of the neighbours: a case always matches itself, which says nothing about "
                "other patients. (Untick *Leave out the query itself* in the sidebar to see it.)"
            )
        else:
            at = f" at similarity {sm.similarity:.3f}" if sm.similarity is not None else ""
            st.warning(
                f"This query is indexed case **{sm.case_id}** itself ({sm.reason}): it comes back "
                f"as its own neighbour{at}. That match is the same picture, not evidence."
            )


def show(result, truth: str | None) -> None:
    p = result.prediction
    unknown = result.ood.flag
    # temperature-scaled probabilities when the index has them (what the text above says)
    probs = getattr(p, "calibrated_probabilities", None) or p.probabilities
    calibrated = probs is not p.probabilities
    st.subheader("Prediction")
    c1, c2 = st.columns([1, 2])
    with c1:
        st.metric(
            "Model's guess (not an answer)" if unknown else "Model prediction",
            p.label,
            None
            if unknown
            else f"{probs[p.label]:.0%} confidence" + (" (calibrated)" if calibrated else ""),
            delta_color="off",
            delta_arrow="off",
        )
        vote = max(result.knn_vote, key=result.knn_vote.get) if result.knn_vote else "—"
        st.metric(
            "Neighbour vote",
            vote,
            f"{result.knn_vote.get(vote, 0):.0%} of the similarity"
            if result.knn_vote and not unknown
            else None,
            delta_color="off",
            delta_arrow="off",
        )
        pset = getattr(p, "set", None)
        if pset is not None:
            cov = getattr(p, "set_coverage", None)
            at = f" at {cov:.0%} coverage" if cov else ""
            st.caption(f"Prediction set{at}: **{', '.join(pset) or '(empty)'}**")
        if truth:
            verdict = "the model is right" if truth == p.label else "the model is wrong"
            st.caption(f"Ground truth from the manifest: **{truth}** ({verdict})")
        st.caption(
            f"OOD score {result.ood.score:.3g} (threshold {result.ood.threshold:.3g}): "
            + ("out of distribution" if unknown else "in distribution")
        )
    with c2:
        name = "model (calibrated)" if calibrated else "model probability"
        chart = pd.DataFrame({name: probs, "neighbour vote": result.knn_vote})
        st.bar_chart(chart, stack=False, horizontal=True, height=220)
    st.info(result.explanation_text)
    if result.contrast_note:
        st.caption(result.contrast_note)
