"""Sharing (issue 28) in a real browser: a deep link made in one browser context opens in another with the same
prompt, Settings, picture, mask, model and results; every PNG the app gives carries its parameters, and
"Settings from a result" reads them back (a bad file changes nothing and says why in one line).

Gradio's deep links work at 127.0.0.1 as at a public address: the button asks `gradio_api/deep_link` for the
session's saved values and copies `<page>?deep_link=<hash>`; Chromium allows the copy on 127.0.0.1 (a secure
context) once the context is granted clipboard access. Writes test-output/browser-share-*.png."""

import io

import numpy as np
import pytest
from PIL import Image

from test_browser import OUT, browser, click_example, magenta, set_settings, wait_result  # noqa: F401 (browser: the shared fixture)
from test_sessions import details, model_status, pick_model

VIEW = {"width": 1400, "height": 1000}


@pytest.fixture(scope="module")
def app_url():
    from blended import Editor
    from test_app_client import launch
    from ui import Limits

    demo, url = launch(Editor.load("demo", ranker=None), Limits(max_candidates=4))
    yield url
    demo.close()


def open_in(context, url):
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#editor canvas", state="attached", timeout=30_000)
    return page


def gallery_images(page) -> list[np.ndarray]:
    """The gallery's images as the server serves them, in order."""
    srcs = page.eval_on_selector_all("#gallery .thumbnail-item img", "els => els.map(e => e.src)")
    return [np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB")) for src in srcs]


def set_seed(page, seed: int) -> None:
    """Type a seed and turn *randomize* off (the Settings accordion open)."""
    page.fill("#seed input", str(seed))
    page.keyboard.press("Tab")
    page.uncheck("#randomize-seed input")


def settings_shown(page) -> dict:
    set_settings(page)  # opens the accordion
    return {"steps": page.input_value("#num-inference-steps input[type=number]"),
            "candidates": page.input_value("#num-candidates input[type=number]"),
            "seed": page.input_value("#seed input"), "randomize": page.is_checked("#randomize-seed input"),
            "scheduler": page.input_value("#scheduler input")}


def test_a_link_opens_the_same_page_in_another_browser(browser, app_url):
    a = browser.new_context(viewport=VIEW)
    a.grant_permissions(["clipboard-read", "clipboard-write"], origin=app_url.rstrip("/"))
    b = browser.new_context(viewport=VIEW)
    try:
        page = open_in(a, app_url)
        pick_model(page, "demo-fast (bundled, fast: 4 steps)", "demo-fast")
        click_example(page, "a red circle (shapes)")
        set_settings(page, num_candidates=2)
        set_seed(page, 123)
        page.click("#generate")
        wait_result(page, 2, timeout=300_000)
        shown, images = settings_shown(page), gallery_images(page)
        assert shown == {"steps": "4", "candidates": "2", "seed": "123", "randomize": False, "scheduler": "lcm"}
        captions = page.inner_text("#gallery")
        page.click("#deep-link")
        page.wait_for_function("() => document.querySelector('#deep-link').innerText.includes('Link copied')",
                               timeout=30_000)
        link = ""
        for _ in range(40):  # the copy follows the server's answer
            link = page.evaluate("() => navigator.clipboard.readText()")
            if "deep_link=" in link:
                break
            page.wait_for_timeout(250)
        assert link.startswith(app_url) and "?deep_link=" in link, link

        other = open_in(b, link)
        other.wait_for_function("() => (document.querySelector('#gallery')?.innerText || '').includes('#1 ·')",
                                timeout=60_000)
        assert other.input_value("#prompt textarea") == "a red circle"
        assert settings_shown(other) == shown
        assert other.inner_text("#gallery") == captions
        assert all(np.array_equal(x, y) for x, y in zip(gallery_images(other), images)) and len(images) == 2
        assert other.locator("#before-after img").count() == 2
        for _ in range(120):  # the picture and its mask, drawn as the magenta layer
            if magenta(other).mean() > 0.05:
                break
            other.wait_for_timeout(250)
        assert magenta(other).mean() > 0.05, "the link did not bring the mask"
        other.wait_for_function("() => document.querySelector('#model-status')?.innerText.includes('demo-fast')"
                                " || !document.querySelector('#model-status')", timeout=60_000)
        assert "session: demo-fast." in model_status(other)  # the link's model is this session's now
        OUT.mkdir(exist_ok=True)
        other.screenshot(path=str(OUT / "browser-share-opened.png"), full_page=True)

        # the same edit again from the opened link: the same source, mask, model and seed give the same pixels
        details(other)  # its timings differ from run to run: a new result shows there
        other.evaluate("() => { window.before = document.querySelector('#details').innerText; }")
        other.click("#generate")
        other.wait_for_function("() => document.querySelector('#details').innerText !== window.before",
                                timeout=300_000)
        wait_result(other, 2)
        again = gallery_images(other)
        assert len(again) == 2 and all(np.array_equal(x, y) for x, y in zip(again, images))
    finally:
        a.close()
        b.close()


def test_downloads_carry_their_parameters_and_fill_the_settings(browser, app_url, tmp_path):
    from blended.pnginfo import read_recipe

    context = browser.new_context(viewport=VIEW, accept_downloads=True)
    try:
        page = open_in(context, app_url)
        click_example(page, "a blue square (shapes)")
        set_settings(page, num_candidates=2, num_inference_steps=6)
        set_seed(page, 77)
        page.click("#generate")
        wait_result(page, 2, timeout=300_000)
        page.click("#gallery [aria-label^='Thumbnail 2 ']")
        page.wait_for_function("() => !document.querySelector('#download').disabled", timeout=10_000)
        with page.expect_download() as download:
            page.click("#download")
        saved = tmp_path / download.value.suggested_filename
        download.value.save_as(saved)
        text = Image.open(saved).text
        assert "Seed: 78" in text["parameters"] and text["parameters"].startswith("a blue square")
        recipe = read_recipe(saved)
        assert (recipe.prompt, recipe.settings["seed"], recipe.settings["num_inference_steps"], recipe.model) == \
            ("a blue square", 78, 6, "demo")

        fresh = open_in(context, app_url)
        set_settings(fresh)
        fresh.set_input_files("#settings-from-result input[type=file]", str(saved))
        fresh.wait_for_function("() => document.querySelector('#prompt textarea').value === 'a blue square'",
                                timeout=30_000)
        fresh.wait_for_function("() => document.querySelector('#seed input').value === '78'", timeout=30_000)
        assert fresh.input_value("#num-inference-steps input[type=number]") == "6"
        assert not fresh.is_checked("#randomize-seed input")  # the file's seed is the one used
        OUT.mkdir(exist_ok=True)
        fresh.locator("#settings-from-result").screenshot(path=str(OUT / "browser-share-settings-from-result.png"))

        bad = tmp_path / "not-a-result.png"
        Image.new("RGB", (8, 8), "white").save(bad)  # a PNG without parameters
        fresh.fill("#prompt textarea", "kept as it is")
        fresh.set_input_files("#settings-from-result input[type=file]", str(bad))
        toast = fresh.locator(".toast-body").filter(has_text="not-a-result.png")
        toast.first.wait_for(timeout=30_000)
        line = toast.first.inner_text()
        assert "holds no parameters" in line
        assert fresh.input_value("#prompt textarea") == "kept as it is"
        assert fresh.input_value("#seed input") == "78"
    finally:
        context.close()


def test_the_api_gives_pngs_with_parameters(app_url, tmp_path):
    from gradio_client import Client, handle_file

    from test_app_client import make_case
    from blended import Editor

    image, mask, _ = make_case(Editor.load("demo", ranker=None), tmp_path)
    gallery, result = Client(app_url, verbose=False).predict(
        handle_file(str(image)), handle_file(str(mask)), "a red circle", {"num_candidates": 2, "seed": 9,
                                                                         "num_inference_steps": 4}, api_name="/edit")
    seeds = [Image.open(item["image"]).text["parameters"].split("Seed: ")[1].split(",")[0] for item in gallery]
    assert seeds == ["9", "10"] and result["model"] == "demo"
    assert '"model": "demo"' in Image.open(gallery[0]["image"]).text["blended"]
