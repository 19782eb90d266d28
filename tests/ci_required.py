"""Under CI, a browser, Orthanc or Ray test that would skip fails instead.

These tests drive real systems (headless Chromium, an Orthanc server, a Ray
cluster); on a developer's machine they skip with a message when the system is
missing, but CI must not pass by skipping them. When ``CI=true`` (what GitHub
Actions, GitLab and most CI services set), the skip of a test carrying one of
the markers below is reported as a failure that quotes the skip reason.

Skips must happen at run time (in the test or a fixture), not at import: a
module that skips during collection has no markers to go by.
"""

from __future__ import annotations

import os

import pytest

REQUIRED_MARKERS = {
    "browser": "drives the Streamlit app or the audit report in headless Chromium",
    "orthanc": "talks DICOMweb to a real Orthanc server",
    "ray": "builds an index on a real Ray cluster",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def pytest_configure(config) -> None:
    for name, why in REQUIRED_MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {why} (a skip fails under CI=true)")


def _skip_reason(rep) -> str:
    longrepr = rep.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not (rep.skipped and in_ci()) or hasattr(rep, "wasxfail"):
        return
    needed = sorted(m for m in REQUIRED_MARKERS if item.get_closest_marker(m) is not None)
    if not needed:
        return
    rep.outcome = "failed"
    rep.longrepr = (
        f"CI=true: this {'/'.join(needed)} test would have skipped ({_skip_reason(rep)}); "
        "in CI it must run: install what it needs (scripts/system-deps.sh, the test extra)"
    )
