"""The audit tab: the bundle's shortcut-audit report, whole, or how to make it."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

AUDIT_REPORT = Path("audit") / "report.html"


def show(index_dir: Path, manifest: Path | None) -> None:
    report = index_dir / AUDIT_REPORT
    if not report.is_file():
        m = str(manifest) if manifest else "MANIFEST"
        st.info(
            "No audit report in this bundle yet. The audit asks whether retrieval matches on "
            "the lesion or on site, scanner, burned-in markers or patient identity. Make it "
            f"with:\n\n`casebase audit {index_dir} {m}`\n\nthen reload this page."
        )
        return
    html = report.read_text(encoding="utf-8", errors="replace")
    st.caption(f"Shortcut audit of this index ({AUDIT_REPORT}, written by `casebase audit`).")
    st.download_button(
        "Download the report", html, file_name="casebase-audit.html", mime="text/html"
    )
    # the report is our own self-contained HTML (its CSS must not restyle the app, so a
    # frame), sized to its content: the whole report shows, the page scrolls
    st.iframe(html, height="content", alt="casebase shortcut audit report")
