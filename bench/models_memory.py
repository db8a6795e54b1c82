"""The server's memory with 1, 2, 3 models loaded by browser sessions (issue 28: each session picks its own model).

    python -m bench.models_memory                 # the demo family and the SD 1.5 graph at half width
    python -m bench.models_memory --quick         # the demo family only

Starts `python app.py` in its own process with `BLENDED_MODELS_DIR` holding the models and `BLENDED_MAX_MODELS=3`,
then one browser context (Chromium through Playwright) per model picks it in the Model accordion, loads it and
edits once with it (1 candidate, 2 steps: every weight is touched, so none is only mapped from its file); the
server's resident memory is read after each. A fourth session loads a fourth model: the cache drops the least
recently used one, so the memory stays near three models'. Families: the bundled demo model (copies of
assets/demo under other names, so each is its own model) and the SD 1.5 graph at half its channel widths with
random weights (blended_dev/tiny.py's `sd_components`, 512 px; the full-size SD 1.5 takes about 4x its memory).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from blended_dev import ROOT
from blended_dev.bench import table, write_doc
from blended_dev.server import app_server, rss_mb

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def demo_family(folder: Path) -> list[str]:
    """Four demo models under four names (copies of assets/demo, each loaded as its own model)."""
    names = []
    for i in range(4):
        shutil.copytree(ROOT / "assets" / "demo", folder / f"demo-{i}")
        names.append(f"demo-{i}")
    return names


def sd_half_family(folder: Path) -> list[str]:
    """Four SD 1.5 graphs at half width, random weights with different seeds, saved as diffusers folders."""
    from diffusers import StableDiffusionPipeline

    from blended_dev.tiny import sd_components

    names = []
    for i in range(4):
        pipe = StableDiffusionPipeline(**sd_components(width=0.5, size=512, seed=i), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(folder / f"sd-half-{i}")
        names.append(f"sd-half-{i}")
        del pipe
    return names


def edit(page) -> None:
    """One small edit in `page` (the first shape example, 1 candidate, 2 steps): it touches every weight."""
    page.click("button.gallery-item:has-text('a red circle (shapes)')")
    page.wait_for_function("() => document.querySelector('#prompt textarea').value.length > 0", timeout=60_000)
    page.wait_for_timeout(1500)
    if not page.locator("#num-candidates").is_visible():
        page.get_by_role("button", name="Settings").first.click()
    for name, value in (("num-candidates", 1), ("num-inference-steps", 2)):
        page.fill(f"#{name} input[type=number]", str(value))
        page.keyboard.press("Tab")
        page.wait_for_function(f"() => document.querySelector('#{name} input[type=range]').value === '{value}'",
                               timeout=30_000)
    page.click("#generate")
    page.wait_for_function("() => (document.querySelector('#gallery')?.innerText || '').includes('#1 ·')",
                           timeout=600_000)


def session(browser, url: str, name: str = "") -> float:
    """A new browser context (a session) loads `name` in the Model accordion (none: keeps the server's) and edits
    once with it; returns the seconds the load took."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    seconds = 0.0
    try:
        page = context.new_page()
        page.goto(url)
        page.wait_for_selector("#editor canvas", state="attached", timeout=60_000)
        if name:
            page.locator("#models").get_by_text("Model").first.click()
            page.click("#model-picker input")
            page.get_by_role("option", name=name, exact=True).click()
            start = time.perf_counter()
            page.click("#load-model")
            page.wait_for_function("() => document.querySelector('#model-status').innerText"
                                   f".includes('session: {name}.')", timeout=600_000)
            seconds = time.perf_counter() - start
        edit(page)
        return seconds
    finally:
        context.close()


def measure(family: str, names: list[str], models_dir: Path) -> list[list[str]]:
    from playwright.sync_api import sync_playwright

    env = {"BLENDED_MODELS_DIR": str(models_dir), "BLENDED_MAX_MODELS": "3"}
    rows = []
    with app_server(env, model=str(models_dir / names[0]), timeout=600) as (url, pid), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        for n, name in enumerate(names, start=1):
            seconds = session(browser, url, name if n > 1 else "")
            time.sleep(2)
            what = {1: "1 (the server's)", 4: "4 asked, 3 kept (the least recently used dropped)"}.get(n, str(n))
            rows.append([family, what, f"{seconds:.1f}" if n > 1 else "", f"{rss_mb(pid):.0f}"])
        browser.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the demo family only")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="blended-models-memory-"))
    rows = []
    try:
        families = [("demo (15 MB of weights)", demo_family)]
        if not args.quick:
            families.append(("SD 1.5 graph at half width (~1 GB fp32)", sd_half_family))
        for i, (family, make) in enumerate(families):
            folder = tmp / str(i)
            folder.mkdir()
            rows += measure(family, make(folder), folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = table(["models", "loaded", "load (s)", "server RSS (MiB)"], rows)
    print(text)
    if not args.quick:
        cmd = "python -m bench.models_memory " + " ".join(sys.argv[1:])
        write_doc("models_memory", f"```\n{cmd.strip()}\n```\n\nOne browser session per model: it loads the model "
                                   "and edits once with it (1 candidate, 2 steps); `BLENDED_MAX_MODELS=3`, CPU, fp32; "
                                   f"the server's resident memory after each.\n\n{text}\n")


if __name__ == "__main__":
    main()
