"""The Streamlit app end to end: a real `streamlit run` server driven by headless Chromium.

Uses the Debian Chromium at /usr/bin/chromium (Playwright never downloads a
browser here); skipped with a message when it or Playwright is missing. The
server runs on a free local port and is killed whatever happens. A
screenshot of the answered query is kept at artifacts/app.png.
"""

from __future__ import annotations

import os
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


def run_query(page, url: str) -> None:
    """Open the app, keep the preselected test case, run the query, wait for the answer."""
    page.goto(url, wait_until="domcontentloaded")
    button = page.get_by_role("button", name="Run query")
    button.wait_for(state="visible", timeout=WAIT_MS)
    page.wait_for_function(
        "() => { const b = [...document.querySelectorAll('button')]"
        ".find(b => b.innerText.includes('Run query')); return b && !b.disabled; }",
        timeout=WAIT_MS,
    )
    button.click()
    page.get_by_text("Nearest cases", exact=True).wait_for(timeout=WAIT_MS)
    page.get_by_text(" · sim ").first.wait_for(timeout=WAIT_MS)
    # the page is done when Streamlit stops running the script
    page.wait_for_selector('[data-testid="stStatusWidget"]', state="detached", timeout=WAIT_MS)


@pytest.fixture(scope="module")
def browser_ready():
    if not CHROMIUM.is_file():
        pytest.skip(
            "no /usr/bin/chromium: install Debian's chromium (apt-get install chromium) "
            "to run the browser test"
        )
    pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")


def test_app_in_a_browser(browser_ready, tiny_index, phantom_dir, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    log = tmp_path / "streamlit.log"
    with (
        streamlit_server(tiny_index, phantom_dir / "manifest.csv", log) as url,
        chromium_page() as page,
    ):
        run_query(page, url)
        body = page.inner_text("body")
        # neighbours: the gallery captions "case_XXXX · label · sim 0.97"
        gallery = page.get_by_text(" · sim ")
        assert gallery.count() == 5, body[-2000:]
        assert "case_" in gallery.first.inner_text()
        assert "Prediction" in body and "Nearest cases" in body
        # maps: gradcam and similarity overlays, each with a trust line
        captions = page.locator('[data-testid="stImageCaption"]').all_inner_texts()
        for method in ("gradcam", "similarity"):
            assert method in [c.strip() for c in captions], f"no {method} map: {captions}"
        assert page.locator('[data-testid="stImage"] img').count() >= 3 + 2 * 5
        assert body.count("casebase explain-eval") >= 2  # tiny index: trust not measured yet
        assert "Traceback" not in body
        page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)

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
        page.screenshot(path=str(ARTIFACTS / "app-bad-upload.png"), full_page=True)
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
