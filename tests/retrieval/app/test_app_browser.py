"""The Streamlit app end to end: a real `streamlit run` server driven by headless Chromium.

Uses the Debian Chromium at /usr/bin/chromium (Playwright never downloads a
browser here); skipped with a message when it or Playwright is missing. The
server runs on a free local port and is killed whatever happens.

The checks look at what a person sees: full-page screenshots (Streamlit
scrolls inside its own container, so the viewport is grown to the content
first and the container is checked to have nothing left to scroll) of the
answered query (artifacts/app.png), the query that is an indexed case, the
"I don't know" state hidden and then greyed, and the whole audit report.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[3]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = REPO / "artifacts"
WAIT_MS = 240_000  # model load + a query on a CPU that other jobs may share
MAX_SHOT_PX = 16_000  # the tallest viewport a full-page screenshot grows to
SCROLLERS = '[data-testid="stMain"], [data-testid="stAppViewContainer"], section.stMain'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def streamlit_server(index: Path, manifest: Path, log: Path, timeout: float = 120.0):
    """`streamlit run app.py` on a free port; yields the URL; always stops the server."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(REPO / "app.py"),
        "--server.headless",
        "true",
        "--server.address",
        "127.0.0.1",
        "--server.port",
        str(port),
        "--browser.gatherUsageStats",
        "false",
        "--server.fileWatcherType",
        "none",
        "--",
        "--index",
        str(index),
        "--manifest",
        str(manifest),
    ]
    env = dict(os.environ, STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"streamlit exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as resp:
                    if resp.status == 200 and resp.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"streamlit not healthy after {timeout:.0f} s:\n{log.read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


@contextmanager
def chromium_page(width: int = 1400, height: int = 1000):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            yield page
        finally:
            browser.close()


@contextmanager
def app_page(index: Path, manifest: Path, tmp_path: Path):
    """The app on this index, opened in a Chromium page; on the way out the server's log
    must hold no traceback (an exception the page may not show)."""
    ARTIFACTS.mkdir(exist_ok=True)
    log = tmp_path / "streamlit.log"
    with streamlit_server(index, manifest, log) as url, chromium_page() as page:
        open_app(page, url)
        yield page
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def open_app(page, url: str) -> None:
    """Open the app and wait until the preselected case is loaded (Run query enabled)."""
    page.goto(url, wait_until="domcontentloaded")
    page.get_by_role("button", name="Run query").wait_for(state="visible", timeout=WAIT_MS)
    page.wait_for_function(
        "() => { const b = [...document.querySelectorAll('button')]"
        ".find(b => b.innerText.includes('Run query')); return b && !b.disabled; }",
        timeout=WAIT_MS,
    )
    settle(page)


def run_query(page) -> None:
    """Run the query on what is chosen and wait for the answer."""
    page.get_by_role("button", name="Run query").click()
    page.get_by_text("Prediction", exact=True).or_(page.get_by_text("I don't know")).first.wait_for(
        timeout=WAIT_MS
    )
    settle(page)


def settle(page) -> None:
    """Wait until Streamlit has stopped running the script (and images have loaded)."""
    page.wait_for_timeout(300)
    page.wait_for_selector('[data-testid="stStatusWidget"]', state="detached", timeout=WAIT_MS)
    # elements of a run still streaming in are skeletons (the status widget can be gone already)
    page.wait_for_selector('[data-testid="stSkeleton"]', state="detached", timeout=WAIT_MS)
    page.wait_for_function("() => [...document.images].every(i => i.complete)", timeout=WAIT_MS)


def full_page_screenshot(page, path: Path) -> int:
    """Grow the viewport to the content (Streamlit scrolls inside its own container, so a
    plain full_page screenshot stops at the window), check nothing is left to scroll, shoot."""
    measure = (
        "() => Math.max(document.documentElement.scrollHeight, "
        f"...[...document.querySelectorAll('{SCROLLERS}')].map(e => e.scrollHeight))"
    )
    width = page.viewport_size["width"]
    height = 0
    for _ in range(3):  # the layout can change once the window is taller
        h = int(page.evaluate(measure))
        if h <= height:
            break
        height = min(h + 40, MAX_SHOT_PX)
        page.set_viewport_size({"width": width, "height": height})
        page.wait_for_timeout(400)
    hidden = page.evaluate(
        f"() => [...document.querySelectorAll('{SCROLLERS}')]"
        ".map(e => e.scrollHeight - e.clientHeight)"
    )
    assert max(hidden, default=0) <= 2, f"content still scrolls inside the app: {hidden}"
    page.screenshot(path=str(path), full_page=True)
    return height


@pytest.fixture(scope="module")
def browser_ready():
    if not CHROMIUM.is_file():
        pytest.skip(
            "no /usr/bin/chromium: install Debian's chromium (apt-get install chromium) "
            "to run the browser test"
        )
    pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")


@pytest.fixture(scope="module")
def audited_index(tiny_index, phantom_dir, tmp_path_factory) -> Path:
    """A copy of the tiny index with a real (small) audit report in the bundle."""
    from index import bundle
    from retrieval.audit import run_audit
    from retrieval.audit.report import render_html
    from retrieval.service.retriever import CaseRetriever

    copy = tmp_path_factory.mktemp("audited") / "index"
    shutil.copytree(tiny_index, copy)
    r = CaseRetriever.load(copy, device="cpu")
    res = run_audit(
        r, phantom_dir / "manifest.csv", permutations=19, progress=False, max_counterfactual=4
    )
    bundle.update(copy, files={"audit/report.html": render_html(res.data, res.examples).encode()})
    return copy


@pytest.fixture(scope="module")
def ood_index(tiny_index, tmp_path_factory) -> Path:
    """A copy whose "I don't know" threshold flags every query (the UI state under test; the
    detection itself is tested in tests/retrieval/service)."""
    from index import bundle

    copy = tmp_path_factory.mktemp("always_ood") / "index"
    shutil.copytree(tiny_index, copy)
    ood = dict(bundle.read_meta(copy)["ood"])
    ood["threshold"] = -1.0
    bundle.update(copy, meta_updates={"ood": ood})
    return copy


def _gallery_ids(page) -> list[str]:
    return [c.split(" · ")[0].strip() for c in page.get_by_text(" · sim ").all_inner_texts()]


def test_query_page_self_match_and_whole_audit(browser_ready, audited_index, phantom_dir, tmp_path):
    import pandas as pd

    ARTIFACTS.mkdir(exist_ok=True)
    manifest = pd.read_csv(phantom_dir / "manifest.csv")
    classes = sorted(manifest["label"].unique())
    log = tmp_path / "streamlit.log"
    with (
        streamlit_server(audited_index, phantom_dir / "manifest.csv", log) as url,
        chromium_page() as page,
    ):
        open_app(page, url)
        shown = page.locator('[data-testid="stSelectbox"]').first.evaluate(
            "e => [e.innerText, ...[...e.querySelectorAll('input')].map(i => i.value)].join(' ')"
        )
        assert "case_" in shown and not any(c in shown for c in classes), shown  # no answer
        assert "Ground truth" not in page.inner_text("body")

        run_query(page)
        body = page.inner_text("body")
        assert len(_gallery_ids(page)) == 5, body[-2000:]
        assert "Prediction" in body and "Nearest cases" in body
        assert "Ground truth from the manifest" in body  # after the query, beside the answer
        captions = page.locator('[data-testid="stImageCaption"]').all_inner_texts()
        for method in ("gradcam", "similarity"):
            assert method in [c.strip() for c in captions], f"no {method} map: {captions}"
        assert page.locator('[data-testid="stImage"] img').count() >= 3 + 2 * 5
        assert "Traceback" not in body and "I don't know" not in body
        full_page_screenshot(page, ARTIFACTS / "app.png")
        # the last neighbour card is in the screenshot, not below the window
        last = page.get_by_text(" · sim ").last.bounding_box()
        assert last and last["y"] + last["height"] <= page.viewport_size["height"]

        # a text file named x.png: a friendly error, no traceback
        page.get_by_text("Upload an image", exact=True).click()
        page.locator('input[type="file"]').set_input_files(
            files=[{"name": "x.png", "mimeType": "image/png", "buffer": b"just some text\n" * 20}]
        )
        error = page.get_by_text("Cannot use this file")
        error.wait_for(timeout=WAIT_MS)
        assert "not a DICOM/PNG/JPEG/TIFF/NPY file" in error.inner_text()
        body = page.inner_text("body")
        assert "Traceback" not in body and "Error:" not in body
        full_page_screenshot(page, ARTIFACTS / "app-bad-upload.png")

        # an indexed case uploaded again: recognised, said, and left out of the neighbours
        indexed = set(pd.read_parquet(audited_index / "cases.parquet")["case_id"])
        row = manifest[manifest["case_id"].isin(indexed)].iloc[0]
        page.locator('input[type="file"]').set_input_files(str(phantom_dir / row["image"]))
        page.get_by_text("patient id from the DICOM header").wait_for(timeout=WAIT_MS)
        page.get_by_role("button", name="Run query").click()
        notice = page.locator(".st-key-self_match")
        notice.wait_for(timeout=WAIT_MS)
        settle(page)
        text = notice.inner_text()
        assert row["case_id"] in text and "itself" in text and "left out" in text, text
        assert notice.is_visible()
        ids = _gallery_ids(page)
        assert ids and row["case_id"] not in ids
        full_page_screenshot(page, ARTIFACTS / "app-self-match.png")

        # the audit tab: the whole report, the frame as tall as its content
        page.get_by_role("tab", name="Audit").click()
        frame_el = page.locator('iframe[title="casebase shortcut audit report"]')
        frame_el.wait_for(timeout=WAIT_MS)
        frame = frame_el.element_handle().content_frame()
        frame.wait_for_selector("h2", timeout=WAIT_MS)
        page.wait_for_timeout(1000)  # let the frame take its content's height
        content_h = frame.evaluate("() => document.documentElement.scrollHeight")
        box = frame_el.bounding_box()
        assert content_h > 1000, content_h  # longer than the fixed frame that clipped it
        # and nothing cut off at the right either (the attribute table's "flagged" column)
        overflow = frame.evaluate(
            "() => [...document.querySelectorAll('table')].map(t => t.getBoundingClientRect().right"
            " - document.documentElement.clientWidth)"
        )
        assert overflow and max(overflow) <= 1, overflow
        assert frame.get_by_text("flagged", exact=True).first.is_visible()
        assert box["height"] >= content_h - 2, (box["height"], content_h)
        shot_h = full_page_screenshot(page, ARTIFACTS / "app-audit.png")
        method = frame.locator("h2", has_text="Method").bounding_box()
        assert method and method["y"] + method["height"] <= shot_h, (method, shot_h)
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def test_i_dont_know_hides_then_greys_the_answer(browser_ready, ood_index, phantom_dir, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    log = tmp_path / "streamlit.log"
    with (
        streamlit_server(ood_index, phantom_dir / "manifest.csv", log) as url,
        chromium_page() as page,
    ):
        open_app(page, url)
        run_query(page)
        page.get_by_text("I don't know").first.wait_for(timeout=WAIT_MS)
        settle(page)
        body = page.inner_text("body")
        assert "Nearest cases" not in body and "confidence" not in body
        assert not _gallery_ids(page)
        full_page_screenshot(page, ARTIFACTS / "app-ood-hidden.png")

        page.get_by_text("Show the guess and the neighbours anyway").click()
        page.get_by_text("Nearest cases", exact=True).wait_for(timeout=WAIT_MS)
        settle(page)
        greyed = page.locator(".st-key-ood_greyed")
        style = greyed.evaluate(
            "e => { const s = getComputedStyle(e); return [s.opacity, s.filter]; }"
        )
        assert float(style[0]) < 0.6 and "grayscale" in style[1], style
        assert greyed.get_by_text("Nearest cases", exact=True).count() == 1
        assert len(greyed.get_by_text(" · sim ").all()) == 5
        assert "Model's guess (not an answer)" in greyed.inner_text()
        full_page_screenshot(page, ARTIFACTS / "app-ood-greyed.png")
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
