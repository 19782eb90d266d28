"""casebase — the Streamlit app: what does the model think, and which past cases does this look like?

    streamlit run app.py -- --index INDEX_DIR [--manifest MANIFEST]

(``CASEBASE_INDEX`` / ``CASEBASE_MANIFEST`` in the environment work too.)
Without an index it offers the demo's (``casebase-demo/index``, made by
``casebase demo``) when present, else says how to make one.

The app is a thin view over :class:`retrieval.service.retriever.CaseRetriever`: every
number and map on the page comes from ``CaseRetriever.query``. This file only
composes the page pieces of :mod:`retrieval.app` (sidebar, query, prediction,
maps, neighbour cards, audit). It shows case ids, pseudonymised patient ids and
case attributes only, never file names, paths or DICOM header fields.
"""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

from retrieval.app import audit, query, sidebar
from retrieval.app.state import cli_args, default_manifest, demo_index, load_retriever, mtime
from retrieval.errors import CasebaseError


def how_to_make_an_index() -> None:
    st.info(
        "No index is open. Make one and start the app on it:\n\n"
        "* the demo (synthetic chest films, about 10 minutes on a laptop CPU): `make demo` "
        "or `casebase demo` (it opens this app when it is done)\n"
        "* your own data: `casebase train MANIFEST --out MODEL` then "
        "`casebase index build MODEL MANIFEST --out INDEX`, then "
        "`streamlit run app.py -- --index INDEX --manifest MANIFEST`"
    )


def open_index(args) -> Path:
    """The index folder to serve; stops the page with a message when there is none."""
    index_arg = args.index or st.session_state.get("index_dir")
    if not index_arg:
        demo = demo_index()
        if demo is not None:
            st.info(f"No index given (`--index`). The demo's index is here: `{demo}`.")
            if st.button("Open the demo index", type="primary"):
                st.session_state["index_dir"] = str(demo)
                st.rerun()
        how_to_make_an_index()
        st.stop()
    index_dir = Path(index_arg)
    if not (index_dir / "bundle.json").is_file():
        st.error(f"`{index_dir}` is not an index bundle (no bundle.json).")
        how_to_make_an_index()
        st.stop()
    return index_dir


def main() -> None:
    st.set_page_config(page_title="casebase", page_icon="🩻", layout="wide")
    args = cli_args(sys.argv[1:])
    st.title("casebase")
    st.caption(
        "Case-based retrieval explainer: what the model thinks, which labelled past cases "
        "this looks like, and in which regions."
    )
    index_dir = open_index(args)
    index_stamp = mtime(index_dir / "bundle.json")
    try:
        r = load_retriever(str(index_dir.resolve()), index_stamp)
    except CasebaseError as err:
        st.error(f"Cannot open the index: {err}")
        st.stop()
    manifest = Path(args.manifest) if args.manifest else default_manifest(index_dir, r.meta)
    settings = sidebar.settings(r, index_dir, manifest)
    tab_query, tab_audit = st.tabs(["Query", "Audit"])
    with tab_audit:
        audit.show(index_dir, manifest)
    with tab_query:
        query.page(r, index_dir, manifest, index_stamp, settings)


main()
