"""The selection panel's text box in a real browser (chromium through Playwright; issue 29): words typed into
`#select-text` put the named object's mask into the editor as a visible layer, and Generate edits with it.
Writes test-output/browser-select-text.png.

    HF_HUB_OFFLINE=1 python -m pytest -q tests/test_browser_select_text.py
"""

import numpy as np
from PIL import Image

from test_browser import OUT, app_url, browser, calls, magenta, open_app, set_settings, wait_result  # noqa: F401
from test_app_client import app_editor  # noqa: F401  (a fixture)

from blended.select import shared_text_segmenter
from blended_dev.textseg import heldout_cases


def test_words_select_the_named_object_and_generate_edits_with_it(browser, app_url, calls, tmp_path,  # noqa: F811
                                                                  monkeypatch):
    monkeypatch.setenv("BLENDED_TEXT_SEGMENTER", "demo")
    shared_text_segmenter.cache_clear()
    case = next(c for c in heldout_cases(40, 2) if c.phrase == "the red circle")
    path = tmp_path / "scene.png"
    Image.fromarray(case.image).save(path)

    page = open_app(browser, app_url)
    page.set_input_files("#editor input[type=file]", str(path))
    page.wait_for_selector("#select-click img", timeout=30_000)
    page.wait_for_timeout(500)
    assert magenta(page).mean() < 0.01
    page.fill("#select-text textarea, #select-text input", "the red circle")
    page.keyboard.press("Enter")
    for _ in range(120):
        if magenta(page).mean() > 0.03:
            break
        page.wait_for_timeout(250)
    share = magenta(page).mean()
    assert share > 0.03, f"the editor never showed the selected circle (magenta share {share:.3f})"
    OUT.mkdir(exist_ok=True)
    page.locator("#select-panel").screenshot(path=str(OUT / "browser-select-text.png"))

    page.fill("#prompt textarea", "a blue square")
    set_settings(page, num_candidates=1, num_inference_steps=4)
    page.click("#generate")
    wait_result(page, 1)
    page.close()
    shared_text_segmenter.cache_clear()

    (_, mask, prompt, _, result), = calls
    sent = np.asarray(mask) > 0
    assert prompt == "a blue square"
    assert (sent & case.mask).sum() / (sent | case.mask).sum() > 0.85, "the edit's mask is not the red circle"
    assert not any((sent & other).any() for other in case.others)  # the other object stays out of the mask
