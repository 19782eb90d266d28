"""The app's explanation maps grouped by family, each with its measured trust, in a browser.

A copy of the tiny index gets a real (small) explain-eval for one or two methods of
each family, stored in the bundle; the query page then shows the family headings in
the registry's order and each map's verdicts (sanity, faithfulness, number of cases)
in its caption. Full-page screenshot: artifacts/app-maps.png.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

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

pytestmark = pytest.mark.browser

METHODS = ["gradcam", "similarity", "deeplift", "occlusion", "gradient_shap", "lrp"]
FAMILY_ORDER = ["CAM family", "gradients", "perturbation", "Shapley", "relevance"]


@pytest.fixture(scope="module")
def trusted_index(tiny_index, phantom_dir, tmp_path_factory) -> Path:
    from retrieval.cli import main

    copy = tmp_path_factory.mktemp("trusted") / "index"
    shutil.copytree(tiny_index, copy)
    rc = main(
        [
            "explain-eval",
            str(copy),
            str(phantom_dir / "manifest.csv"),
            "--methods",
            ",".join(METHODS),
            "--max-cases",
            "4",
            "--sanity-cases",
            "1",
            "--sanity-seeds",
            "1",
        ]
    )
    assert rc == 0
    return copy


def test_maps_grouped_by_family_with_trust(browser_ready, trusted_index, phantom_dir, tmp_path):  # noqa: F811
    ARTIFACTS.mkdir(exist_ok=True)
    log = tmp_path / "streamlit.log"
    with (
        streamlit_server(trusted_index, phantom_dir / "manifest.csv", log) as url,
        chromium_page() as page,
    ):
        open_app(page, url)
        box = page.locator('[data-testid="stSidebar"] [data-testid="stMultiSelect"]').first
        for m in METHODS:
            if m in ("gradcam", "similarity"):  # the defaults
                continue
            box.locator("input").click()
            box.locator("input").fill(m)
            # the exact option: Enter would take the first fuzzy match (deeplift_shap)
            page.get_by_role("option", name=m, exact=True).click()
            settle(page)
        page.keyboard.press("Escape")
        run_query(page)
        page.get_by_text("relevance —").wait_for(timeout=WAIT_MS)
        settle(page)
        body = page.inner_text("body")
        assert "Traceback" not in body
        # every family heading, once, in the registry's order
        heads = [body.index(f"{f} —") for f in FAMILY_ORDER]
        assert heads == sorted(heads), heads
        maps_part = body[body.index("Explanation maps") : body.index("Nearest cases")]
        for f in FAMILY_ORDER:
            assert maps_part.count(f"{f} —") == 1, f
        # each map sits under its family, its caption carrying the measured verdicts
        captions = [
            c.strip() for c in page.locator('[data-testid="stImageCaption"]').all_inner_texts()
        ]
        mine = [c for c in captions if c and " · " not in c and c != "query image"]
        assert sorted(mine) == sorted(METHODS), captions
        # ... on the page: below its family's heading and above the next family's
        tops = [page.get_by_text(f"{f} —").first.bounding_box()["y"] for f in FAMILY_ORDER]
        tops.append(float("inf"))
        caps = page.locator('[data-testid="stImageCaption"]')
        for k, m in enumerate(["gradcam", "deeplift", "occlusion", "gradient_shap", "lrp"]):
            y = caps.filter(has_text=m).first.bounding_box()["y"]
            assert tops[k] < y < tops[k + 1], (m, y, tops)
        assert maps_part.count("Measured trust (measured on 4 test cases)") == len(METHODS)
        assert maps_part.count("sanity pass") + maps_part.count("sanity FAIL") == len(METHODS)
        assert "Trust not measured yet" not in maps_part
        # each map carries its folded sanity curves (the paper's Fig. 2); unfolding one draws it
        panels = page.locator('[data-testid="stExpander"]').filter(has_text="sanity check:")
        assert panels.count() == len(METHODS)
        images_before = page.locator('[data-testid="stImage"] img').count()
        panels.first.locator("summary").click()
        settle(page)
        panels.first.get_by_text("randomised from the top").wait_for(timeout=WAIT_MS)
        assert panels.first.locator("img").count() == 1
        assert page.locator('[data-testid="stImage"] img').count() >= images_before
        full_page_screenshot(page, ARTIFACTS / "app-maps.png")
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
