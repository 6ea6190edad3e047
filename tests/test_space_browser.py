"""The web demo (space/app.py) in a real browser: Debian's Chromium driven by Playwright (`make test-browser`
installs the browser; nothing is downloaded at test time). The app runs on the digits demo on 127.0.0.1; the test
uploads a demo image, asks its question, and checks the answer, the tile overlay and the tokens plot; a bad upload
shows its refusal in the page. Screenshots of the page go to the test's temporary folder, or to
$SPACE_SCREENSHOTS when set (`SPACE_SCREENSHOTS=docs/images make test-browser` renews the README's).

Runs with `make test-browser` (and in CI), which installs the browser and sets INTERNVL_X_BROWSER_TEST=1; `make test`
leaves it to that step, so a machine that has Chromium does not run it in every suite run.
"""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.bundle import ROOT
from tests.utils.engines import free_port, wait_until_answering

if not os.environ.get("INTERNVL_X_BROWSER_TEST"):
    pytest.skip("the browser test runs with make test-browser", allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is in requirements-dev.txt: make install")
CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("Debian's chromium is not installed: make test-browser installs it", allow_module_level=True)

DEMO = ROOT / "examples" / "digits-demo"
EXAMPLES = json.loads((DEMO / "examples.json").read_text())
# Chromium as this machine's closed network wants it: no background connections, no sandbox (root), no GPU.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextlib.contextmanager
def app(tmp_path: Path):
    """`python space/app.py` on the digits demo, on a free port of 127.0.0.1, until the test ends."""
    port = free_port()
    log = open(tmp_path / "app.log", "w")  # noqa: SIM115 (open for the app's lifetime)
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "space" / "app.py"), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_answering(url, process, tmp_path / "app.log", 300)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("space")
    with app(tmp_path) as url, playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        tab = browser.new_page(viewport={"width": 1400, "height": 1100})
        tab.goto(url)
        tab.wait_for_selector("#box textarea", timeout=120_000)
        yield tab
        browser.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = Path(os.environ["SPACE_SCREENSHOTS"]) if os.environ.get("SPACE_SCREENSHOTS") else None
    return folder or tmp_path_factory.mktemp("screenshots")


def ask(page, question: str, files: list[Path]) -> None:
    page.set_input_files("#box input[type=file]", [str(path) for path in files])
    page.wait_for_timeout(500)
    page.fill("#box textarea", question)
    page.press("#box textarea", "Enter")


def test_a_demo_image_is_answered_with_its_tiles_and_its_tokens_plot(page, screenshots):
    example = EXAMPLES[2]
    ask(page, example["question"], [DEMO / example["image"]])
    bot = page.locator("#chat [data-testid='bot']").last
    bot.wait_for(timeout=120_000)
    page.wait_for_function(
        "answer => [...document.querySelectorAll('#chat [data-testid=\"bot\"]')]"
        ".some(node => node.innerText.trim().endsWith(answer))",
        arg=example["answer"],
        timeout=120_000,
    )
    page.locator("#status").get_by_text("Done.").wait_for(timeout=120_000)
    overlay = page.locator("#overlay img")
    overlay.wait_for(timeout=60_000)
    assert overlay.evaluate("node => node.naturalWidth") > 0
    plot = page.locator("#plot img, #plot svg, #plot canvas").first
    plot.wait_for(timeout=60_000)
    numbers = page.locator("#numbers").inner_text()
    assert "time to first token" in numbers and "positions used" in numbers
    page.screenshot(path=str(screenshots / "space-answer.png"), full_page=True)


def test_a_bad_upload_shows_its_refusal_in_the_page(page, tmp_path, screenshots):
    fake = tmp_path / "not-an-image.png"
    fake.write_bytes(b"this is not an image")
    ask(page, "What digit is this?", [fake])
    refusal = page.locator("#status").get_by_text("Refused:")
    refusal.wait_for(timeout=60_000)
    assert "is not an image Pillow can read" in page.locator("#status").inner_text()
    assert "Traceback" not in page.content()
    page.screenshot(path=str(screenshots / "space-refusal.png"), full_page=True)
