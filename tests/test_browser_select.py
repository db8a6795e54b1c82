"""The selection panel in a real browser (chromium through Playwright; issue 22): a click on the clickable
picture puts the selected object's mask into the editor as a visible layer, the grow slider grows it, and
Generate edits with it. Writes test-output/browser-select-*.png; with BLENDED_README_PICTURES=1 also
docs/images/select.png:

    BLENDED_README_PICTURES=1 HF_HUB_OFFLINE=1 python -m pytest -q tests/test_browser_select.py
"""

import io

import numpy as np
from PIL import Image

from test_browser import (OUT, PICTURES, README_PICTURES, app_url, browser, calls, magenta,  # noqa: F401
                          open_app, set_settings, wait_result)
from test_app_client import app_editor  # noqa: F401  (a fixture)

from blended_dev import scenes

SEED = scenes.HELDOUT_SEED_START + 990_004  # one black square at (24, 8)-(60, 44) of the 64 x 64 scene


def click_picture(page, x, y):
    """Click image pixel (x, y) of the clickable picture (served enlarged, drawn with object-fit: contain)."""
    img = page.locator("#select-click img").first
    box = img.bounding_box()
    nw, nh = page.evaluate("() => { const i = document.querySelector('#select-click img');"
                           " return [i.naturalWidth, i.naturalHeight]; }")
    scale = min(box["width"] / nw, box["height"] / nh)
    k = nw / 64  # served pixels per image pixel
    img.click(position={"x": (box["width"] - nw * scale) / 2 + (x + 0.5) * k * scale,  # waits until the picture
                        "y": (box["height"] - nh * scale) / 2 + (y + 0.5) * k * scale})  # takes clicks


def wait_magenta(page, test, what, tries=120):
    for _ in range(tries):
        share = magenta(page).mean()
        if test(share):
            return share
        page.wait_for_timeout(250)
    raise AssertionError(f"the editor never showed {what} (magenta share {magenta(page).mean():.3f})")


def test_click_selects_grow_grows_and_generate_edits_with_it(browser, app_url, calls, tmp_path):  # noqa: F811
    scene = scenes.make_scene(SEED, 1)
    truth = scene.masks[0]
    path = tmp_path / "scene.png"
    Image.fromarray(scene.image).save(path)

    page = open_app(browser, app_url)
    page.set_input_files("#editor input[type=file]", str(path))
    page.wait_for_selector("#select-click img", timeout=30_000)  # the upload reaches the clickable picture
    assert magenta(page).mean() < 0.01
    page.wait_for_timeout(500)
    for attempt in range(3):  # a busy machine may drop a click: click again until it lands
        click_picture(page, 42, 26)
        try:
            first = wait_magenta(page, lambda s: s > 0.05, "the selected square as a layer", tries=60)
            break
        except AssertionError:
            page.screenshot(path=str(OUT / f"browser-select-miss{attempt}.png"), full_page=True)
            if attempt == 2:
                raise
    page.wait_for_timeout(500)
    first = magenta(page).mean()

    page.fill("#mask-grow input[type=number]", "6")
    page.keyboard.press("Tab")
    grown = wait_magenta(page, lambda s: s > first * 1.3, "the grown mask")
    page.wait_for_timeout(1000)  # the editor's own events after the update must not reset the selection
    shot = np.asarray(Image.open(io.BytesIO(page.locator("#select-click img").first.screenshot())).convert("RGB"),
                      np.int16)
    green = (shot[..., 1] - shot[..., 0] > 80) & (shot[..., 1] - shot[..., 2] > 60)
    assert green.sum() > 20, "the click's green dot is gone from the clickable picture"
    OUT.mkdir(exist_ok=True)
    page.locator("#select-panel").screenshot(path=str(OUT / "browser-select-panel.png"))
    if README_PICTURES:
        page.evaluate("() => window.scrollTo(0, 0)")
        page.screenshot(path=str(PICTURES / "select.png"), clip=_left_column(page), full_page=True)

    page.fill("#prompt textarea", "a red circle")
    set_settings(page, num_candidates=1, num_inference_steps=4)
    page.click("#generate")
    wait_result(page, 1)
    page.screenshot(path=str(OUT / "browser-select-result.png"), full_page=True)
    page.close()

    (_, mask, prompt, _, result), = calls
    sent = np.asarray(mask) > 0
    inside = (sent & truth).sum() / truth.sum()
    assert prompt == "a red circle" and inside > 0.97, "the edit's mask does not cover the selected square"
    ring = sent & ~truth
    assert 0.5 * 6 * 4 * 30 < ring.sum() < 2.0 * 6 * 4 * 36, "the mask was not grown by about 6 px"
    assert grown > first
    out = np.asarray(result.candidates[0].image, np.int16)
    far = np.ones_like(sent)
    far[:44 + 16, 24 - 16:] = False
    assert np.array_equal(out[far], np.asarray(scene.image, np.int16)[far])  # kept beyond mask + seam band
    assert np.abs(out[truth] - np.asarray(scene.image, np.int16)[truth]).mean() > 5  # edited inside


def _left_column(page):
    """The editor column from the editor to the selection panel's end (the README's picture)."""
    top = page.locator("#editor").bounding_box()
    panel = page.locator("#select-panel").bounding_box()
    return {"x": top["x"] - 8, "y": top["y"] - 8, "width": top["width"] + 16,
            "height": panel["y"] + panel["height"] - top["y"] + 16}
