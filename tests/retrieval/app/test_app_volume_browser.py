"""The app on a volume index, in Chromium: the query's slice scroller, the maps' shared
plane / slice control, and a neighbour card's jump to its matched region.

Full-page screenshot: artifacts/app-volume.png (looked at when the page changes).
"""

from __future__ import annotations

import re

import pytest

from retrieval.app import volume_view as vv

from .test_app_browser import (
    ARTIFACTS,
    WAIT_MS,
    browser_ready,  # noqa: F401 (fixture)
    chromium_page,
    full_page_screenshot,
    open_app,
    run_query,
    settle,
    streamlit_server,
)
from .test_app_volume import volume_index, volume_phantom  # noqa: F401 (fixtures)

pytestmark = pytest.mark.browser


def _slider(page, key: str):
    return page.locator(f".st-key-{key} input[type=range]").first


def _slider_value(page, key: str) -> int:
    return int(_slider(page, key).input_value())


def test_volume_query_scrolls_switches_plane_and_jumps(
    browser_ready,  # noqa: F811
    volume_index,  # noqa: F811
    volume_phantom,  # noqa: F811
    tmp_path,
):
    ARTIFACTS.mkdir(exist_ok=True)
    log = tmp_path / "streamlit.log"
    with (
        streamlit_server(volume_index, volume_phantom / "manifest.csv", log) as url,
        chromium_page() as page,
    ):
        open_app(page, url)
        run_query(page)
        page.get_by_text("Nearest cases").wait_for(timeout=WAIT_MS)
        settle(page)
        body = page.inner_text("body")
        assert "Traceback" not in body
        assert "Jump to the matched region" in body and "z " in body
        # the maps' slider starts on the middle slice; the keyboard moves it one slice
        start = _slider_value(page, "vv_maps_axial")
        _slider(page, "vv_maps_axial").focus()
        page.keyboard.press("ArrowRight" if start == 0 else "ArrowLeft")
        settle(page)
        assert _slider_value(page, "vv_maps_axial") != start
        # the maps switch to the coronal plane (a slider of their own appears)
        page.locator(".st-key-vv_maps_plane").get_by_text("coronal").click()
        settle(page)
        _slider(page, "vv_maps_coronal").wait_for(state="attached", timeout=WAIT_MS)
        # the first card's query slider sent to slice 0, then its jump: it lands on the slice
        # through the centre of the first (green) region's query box
        body = page.inner_text("body")
        m = re.search(r"region 1: query x (\d+)–(\d+), y (\d+)–(\d+), z (\d+)–(\d+)", body)
        assert m, body[-2000:]
        x0, x1, y0, y1, z0, z1 = (int(v) for v in m.groups())
        want = vv.jump_index([x0, y0, z0, x1, y1, z1], "axial", (8, 32, 32))
        _slider(page, "vv_nb1_query_axial").focus()
        page.keyboard.press("End" if want == 0 else "Home")
        settle(page)
        assert _slider_value(page, "vv_nb1_query_axial") != want
        page.locator(".st-key-jump_1").get_by_role("button").first.click()
        settle(page)
        assert _slider_value(page, "vv_nb1_query_axial") == want
        full_page_screenshot(page, ARTIFACTS / "app-volume.png")
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
