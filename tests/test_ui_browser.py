"""`persres ui` as a person uses it: headless Chromium (Debian's package) driven by Playwright,
against the app on the built-in toy model. Uploads the shipped `toy:checker_circle` references,
trains a few steps, generates with LAG and checks that the images and the concept's region
overlay are shown. Screenshots go to $PERSRES_UI_SCREENSHOTS (the README's come from
`PERSRES_UI_SCREENSHOTS=docs/img python -m pytest tests/test_ui_browser.py`), else a temporary folder.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

pytest.importorskip("gradio")
playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def page(tmp_path, persres_home):
    from persres.ui.app import serve
    from persres.workspace import Workspace

    app, url = serve(Workspace(), tmp_path / "out", port=free_port(), block=False)  # the toy model, as a new user has it
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        tab = browser.new_page(viewport={"width": 1280, "height": 1000})
        tab.set_default_timeout(180_000)
        tab.goto(url)
        yield tab
        browser.close()
    app.close()


def shots(tmp_path) -> Path:
    folder = Path(os.environ.get("PERSRES_UI_SCREENSHOTS") or tmp_path / "shots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_train_then_generate_with_lag_shows_images_and_regions(page, tmp_path):
    from persres.toy import CONCEPTS_DIR

    out = shots(tmp_path)
    page.get_by_role("tab", name="Train").click()
    references = sorted(str(p) for p in (CONCEPTS_DIR / "checker_circle").iterdir())
    page.locator("#train-images input[type=file]").set_input_files(references)
    page.locator("#train-name textarea, #train-name input").first.fill("checker")
    page.locator("#train-class textarea, #train-class input").first.fill("circle")
    page.locator("#train-steps input").first.fill("40")
    page.locator("#train-button").click()
    result = page.locator("#train-result textarea, #train-result input").first
    playwright.expect(result).to_have_value(playwright_regex(r"^trained checker"), timeout=300_000)
    page.screenshot(path=str(out / "ui-train.png"), full_page=True)

    page.get_by_role("tab", name="Concepts").click()
    playwright.expect(page.locator("#concept-cards img").first).to_be_visible()
    assert "checker · circle" in page.locator("#concept-cards").inner_text()
    page.screenshot(path=str(out / "ui-concepts.png"), full_page=True)

    page.get_by_role("tab", name="Generate").click()
    page.locator("#gen-prompt textarea").fill("a <checker> circle on a green background")
    page.locator("#gen-steps input").first.fill("20")
    page.locator("#gen-count input").first.fill("2")
    page.locator("#gen-button").click()
    regions = page.locator("#gen-regions textarea, #gen-regions input").first
    playwright.expect(regions).to_have_value(playwright_regex(r"checker: \d+% of the image"), timeout=300_000)
    gallery = page.locator("#gen-gallery")
    playwright.expect(gallery.locator("img").nth(3)).to_be_visible()  # 2 images, each followed by its region overlay
    assert gallery.locator("img").count() >= 4
    assert "where checker acted" in gallery.inner_text()
    page.screenshot(path=str(out / "ui-generate.png"), full_page=True)


def playwright_regex(pattern: str):
    import re

    return re.compile(pattern)
