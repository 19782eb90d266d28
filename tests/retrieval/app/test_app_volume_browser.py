"""The app on a volume index, in Chromium: the query's slice scroller, the maps' shared
plane / slice control, a neighbour card's jump to its matched region, and a region dragged
on an axial slice with its slices and searched.

Full-page screenshots: artifacts/app-volume.png, app-volume-region.png (looked at when the
page changes).
"""

from __future__ import annotations

import io
import re

import numpy as np
import pytest

from retrieval.app import volume_region as vr
from retrieval.app import volume_view as vv

from .test_app_browser import (
    ARTIFACTS,
    WAIT_MS,
    app_page,
    browser_ready,  # noqa: F401 (fixture)
    full_page_screenshot,
    run_query,
    settle,
)
from .test_app_refine_browser import PICKER, _blue_pixels, _click, _drag, _trail, _wait_trail
from .test_app_volume import volume_index, volume_phantom  # noqa: F401 (fixtures)

pytestmark = pytest.mark.browser


def _slider(page, key: str):
    return page.locator(f".st-key-{key} input[type=range]").first


def _slider_value(page, key: str) -> int:
    return int(_slider(page, key).input_value())


def _bluish(png: bytes) -> int:
    """Pixels far bluer than grey, green or orange: the searched box's blue after st.image's
    JPEG (its chroma blurs a thin line, so the exact colour of _blue_pixels is rare)."""
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int(((rgb[..., 2] - rgb[..., 0] > 80) & (rgb[..., 2] - rgb[..., 1] > 30)).sum())


def test_volume_query_scrolls_switches_plane_and_jumps(
    browser_ready,  # noqa: F811
    volume_index,  # noqa: F811
    volume_phantom,  # noqa: F811
    tmp_path,
):
    with app_page(volume_index, volume_phantom / "manifest.csv", tmp_path) as page:
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
        x1, y1, z1 = x1 + 1, y1 + 1, z1 + 1  # the caption's ranges are inclusive
        want = vv.jump_index([x0, y0, z0, x1, y1, z1], "axial", (8, 32, 32))
        _slider(page, "vv_nb1_query_axial").focus()
        page.keyboard.press("End" if want == 0 else "Home")
        settle(page)
        assert _slider_value(page, "vv_nb1_query_axial") != want
        page.locator(".st-key-jump_1").get_by_role("button").first.click()
        settle(page)
        assert _slider_value(page, "vv_nb1_query_axial") == want
        full_page_screenshot(page, ARTIFACTS / "app-volume.png")


def test_volume_region_dragged_on_a_slice_with_its_slices_is_searched(
    browser_ready,  # noqa: F811
    volume_index,  # noqa: F811
    volume_phantom,  # noqa: F811
    tmp_path,
):
    with app_page(volume_index, volume_phantom / "manifest.csv", tmp_path) as page:
        assert page.get_by_role("button", name="Search this region").is_disabled()
        run_query(page)
        # the in-plane box dragged on the axial slice shown (the middle one, z 4); its slices
        # are the range slider's, a few around that slice
        _drag(page, (0.20, 0.25), (0.70, 0.75))
        page.wait_for_function(
            "() => [...document.querySelectorAll('input')].some(i => /^(\\d+,){5}\\d+$/"
            ".test(i.value))",
            timeout=WAIT_MS,
        )
        settle(page)
        box_input = page.get_by_label("Box in voxels", exact=False)
        x0, y0, z0, x1, y1, z1 = (int(v) for v in box_input.input_value().split(","))
        first, last = vr.slices_around(4, 8)
        assert (z0, z1) == (first, last + 1), box_input.input_value()
        assert abs(x0 - 0.20 * 32) <= 1 and abs(y1 - 0.75 * 32) <= 1, (x0, y0, x1, y1)
        assert _blue_pixels(page.locator(PICKER).screenshot()) > 20  # drawn on the slice
        # the range slider's first thumb one slice up: the box's Z0 follows
        thumb = _slider(page, "region_slices")
        thumb.focus()
        page.keyboard.press("ArrowRight")
        settle(page)
        page.wait_for_function(
            "(v) => [...document.querySelectorAll('input')].some(i => i.value === v)",
            arg=f"{x0},{y0},{z0 + 1},{x1},{y1},{z1}",
            timeout=WAIT_MS,
        )
        _click(page, "Search this region")
        _wait_trail(page, "region x")
        body = page.inner_text("body")
        m = re.search(r"Searched with the region x (\d+)–(\d+), y (\d+)–(\d+), z (\d+)–(\d+)", body)
        assert m, body[-2000:]
        assert [int(v) for v in m.groups()] == [x0, x1 - 1, y0, y1 - 1, z0 + 1, z1 - 1]  # inclusive
        assert "The query failed" not in body and "Traceback" not in body
        assert _trail(page).startswith("Search trail: whole volume → region x")
        full_page_screenshot(page, ARTIFACTS / "app-volume-region.png")
        # the searched box is drawn in blue on the first card's query slice (z 4, inside it)
        assert _bluish(page.locator(".st-key-vv_nb1_query img").first.screenshot()) > 100
        # undo: the whole volume's answer again
        _click(page, "Undo last step")
        _wait_trail(page, "region x", present=False)
        assert "Searched with the region" not in page.inner_text("body")
