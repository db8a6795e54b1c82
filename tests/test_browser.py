"""End to end in a real browser (Debian's chromium through Playwright): upload, paint a stroke with the
mouse, type a prompt, Generate, select the best candidate, download its PNG and check its pixels.

Writes test-output/browser-result.png, a screenshot of the finished page.
"""

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import scene
from test_app_client import app_editor, launch  # noqa: F401  (app_editor is a fixture)

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
OUT = Path(__file__).resolve().parent.parent / "test-output"


@pytest.fixture(scope="module")
def app_url(app_editor):  # noqa: F811
    from ui import Limits

    demo, url = launch(app_editor, Limits(max_candidates=4, max_steps=200))
    yield url
    demo.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def image_point(page, size, x, y):
    """Page coordinates of image pixel (x, y): the editor centres the image in its canvas at its zoom."""
    box = page.locator("#editor canvas").first.bounding_box()
    zoom = float(page.inner_text("#editor .zoom-number").strip().rstrip("%")) / 100
    w, h = size
    return (box["x"] + box["width"] / 2 + (x - w / 2) * zoom,
            box["y"] + box["height"] / 2 + (y - h / 2) * zoom)


def test_paint_generate_download(browser, app_url, app_editor, tmp_path):  # noqa: F811
    n = app_editor.model.native_size
    w, h = 6 * n, 4 * n
    source_path = tmp_path / "photo.png"
    scene(w, h, seed=11).save(source_path)
    source = np.asarray(Image.open(source_path).convert("RGB"), np.int16)

    page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page.goto(app_url)
    page.wait_for_selector("#editor canvas", state="attached", timeout=30_000)

    # upload, then paint a horizontal stroke near the top-left corner with the mouse
    page.set_input_files("#editor input[type=file]", str(source_path))
    page.wait_for_selector("#editor .empty", state="detached", timeout=30_000)
    page.wait_for_timeout(300)
    y = n // 4
    x0, x1 = n // 4, n // 2
    page.mouse.move(*image_point(page, (w, h), x0, y))
    page.mouse.down()
    page.mouse.move(*image_point(page, (w, h), x1, y), steps=10)
    page.mouse.up()

    page.fill("#prompt textarea", "a red circle")
    page.get_by_role("button", name="Settings").first.click()
    steps = min(app_editor.defaults.num_inference_steps, 10)
    for name, value in (("num-candidates", 2), ("num-inference-steps", steps)):
        page.fill(f"#{name} input[type=number]", str(value))
        page.keyboard.press("Tab")
        page.wait_for_function(f"() => document.querySelector('#{name} input[type=range]').value === '{value}'")
    page.click("#generate")
    page.wait_for_selector("#gallery .thumbnail-item", timeout=120_000)
    assert page.locator("#gallery .thumbnail-item").count() == 2
    seed = int(page.input_value("#seed input"))  # randomized, written back
    assert f"#1 · seed {seed}" in page.inner_text("#gallery")

    page.click("#gallery [aria-label^='Thumbnail 1 ']")  # select the best candidate
    page.wait_for_function("() => !document.querySelector('#download').disabled", timeout=10_000)
    with page.expect_download() as download:
        page.click("#download")
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    assert saved.name == f"rank1-seed{seed}.png"
    assert page.locator("#before-after img").count() == 2  # before and after

    OUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUT / "browser-result.png"), full_page=True)
    page.close()

    result = Image.open(saved)
    assert result.format == "PNG" and result.size == (w, h)  # full resolution
    out = np.asarray(result.convert("RGB"), np.int16)
    stroke = (slice(y - 2, y + 3), slice(x0 + 2, x1 - 1))  # under the brush's centre line
    assert np.abs(out[stroke] - source[stroke]).mean() > 3, "nothing changed inside the stroke"
    np.testing.assert_array_equal(out[:, w // 2:], source[:, w // 2:])  # far outside: untouched
    np.testing.assert_array_equal(out[3 * h // 4:], source[3 * h // 4:])
