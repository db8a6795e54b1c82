"""The gradio Blocks around one loaded Editor: paint a mask, write a prompt, get ranked candidates.

`create_demo` composes the panels, each a small module that builds its components and their handlers: the
canvas (`canvas`), selection and mask tools (`mask_panel`), extending the canvas (`extend_panel`), the prompt
with Generate and Stop (`generate_panel`), the Settings (`settings_panel`), the model picker (`models_panel`), the
results and the history (`results_panel`, `history_panel`) and the `/edit` API (`api_panel`); `streaming` runs
the edits."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import gradio as gr

from blended import Editor
from blended.models import PRESETS
from blended.models.cache import ModelKey

from .api_panel import build_api
from .canvas import EXAMPLES, brush_for, build_canvas, build_examples, editor_value, follow_uploads, load_examples
from .editing import OutputDir, server_defaults
from .extend_panel import build_extend_panel
from .generate_panel import build_prompt, follow_generate
from .history_panel import follow_history
from .limits import Limits
from .mask_panel import build_mask_panel
from .models_panel import ServerModels, follow_models, is_shared, models_panel
from .results_panel import build_results
from .recipe_panel import build_recipe_drop, follow_recipe
from .share_panel import follow_link, link_button
from .settings_panel import MODEL_SETTINGS, build_settings, model_settings, settings_widgets
from .speed import cpu_notice
from .streaming import EditRunner

__all__ = ["create_demo", "is_demo_model", "load_examples", "brush_for", "editor_value", "EXAMPLES", "MODEL_SETTINGS",
           "model_settings", "settings_widgets"]

INTRO = """# blended: text-driven local image editing
Upload a picture, **paint over the region to change** (brush; the eraser, brush size and undo are in the
editor's toolbar), describe what should appear there and press **Generate**. Beyond the painted region and a
thin seam band around it (8 pixels), every pixel comes back exactly as uploaded, at full resolution.
Method: *Blended Latent Diffusion* (Avrahami, Fried, Lischinski, SIGGRAPH 2023)."""

DEMO_BANNER = ("**The bundled demo model is in use.** It only knows simple scenes of coloured shapes at "
               "64x64 pixels: try *a red circle* or *a blue square* on the shape examples below.")

DAY = 86400  # seconds

# Ctrl/Cmd+Enter in the prompt (or the negative prompt) presses Generate
KEYS_JS = """() => {
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Enter" || !(e.ctrlKey || e.metaKey)) return;
    if (!e.target.closest || !e.target.closest("#prompt, #negative-prompt")) return;
    e.preventDefault();
    document.querySelector("#generate")?.click();
  }, true);
}"""


def is_demo_model(editor: Editor) -> bool:
    """True when the editor runs a bundled demo model, `demo` or `demo-fast` (by preset name or by its folder)."""
    m = editor.model
    return m.name in ("demo", "demo-fast") or any(Path(m.source).resolve() == Path(PRESETS[name]).resolve()
                                                   for name in ("demo", "demo-fast"))


def create_demo(editor: Editor, limits: Optional[Limits] = None, notice: Optional[str] = None,
                speed: Optional[str] = "auto", segmenter: Any = "grabcut", segmenter_note: str = "",
                models_dir: Optional[str] = None, shared: Optional[bool] = None,
                model_key: Optional[ModelKey] = None) -> gr.Blocks:
    """Build the app around `editor` (not launched: call `.queue(...)` and `.launch(...)` on it).

    Args:
        editor: the server's loaded model: every session starts with it, and `/edit` uses it.
        limits: deployment limits; default `Limits.from_env()`.
        notice: an extra line for the demo-model banner (e.g. why the requested model is not in use).
        speed: a banner about the time an edit takes here; "auto" times one UNet call when a Stable Diffusion
            model runs on the CPU (`ui.speed.cpu_notice`), None shows none.
        segmenter: what selects objects from clicks (`blended.select.load_segmenter`); "grabcut" = GrabCut,
            None = selection off. `segmenter_note` says which is in use.
        models_dir: the model picker's folder of models and LoRAs (default: $BLENDED_MODELS_DIR; none: the
            bundled presets only).
        shared: the picker loads only what it lists (default: on a Space, `SPACE_ID` set).
        model_key: the `ModelKey` `editor` was loaded with (default: read off it; app.py adds its
            --prediction-type). Other sessions' models are loaded into a cache of `limits.max_models`.

    API endpoints: `/edit` (image file, mask file, prompt, settings JSON -> gallery, result JSON) and
    `/stop` (stops the running edits of the caller's session).
    """
    limits = limits or Limits.from_env()
    models_dir = models_dir if models_dir is not None else os.environ.get("BLENDED_MODELS_DIR")
    server = ServerModels(editor, model_key, models_dir, is_shared(shared), limits.max_models)  # sessions pick theirs
    defaults = server_defaults(editor.defaults, limits)  # the widgets' first values only: edits read their model's
    if speed == "auto":
        speed = None if is_demo_model(editor) else cpu_notice(editor, defaults)
    if segmenter == "grabcut":
        from blended.select import GrabCutSegmenter

        segmenter, segmenter_note = GrabCutSegmenter(), segmenter_note or "Selection: GrabCut (OpenCV, no weights)."
    words = "auto"  # the demo models select by words with the bundled demo segmenter, no hub call
    if is_demo_model(editor) and not os.environ.get("BLENDED_TEXT_SEGMENTER") and segmenter is not None:
        from blended.select import shared_text_segmenter

        words = shared_text_segmenter("demo", None, segmenter)[0] or "auto"
    runner, files = EditRunner(), OutputDir()
    link = link_button()  # made before the Blocks: its click is wired below, saving what the page shows first

    with gr.Blocks(title="blended: Blended Latent Diffusion", delete_cache=(3600, limits.link_days * DAY)) as demo:
        gr.Markdown(INTRO)
        if is_demo_model(editor):
            gr.Markdown(DEMO_BANNER + (f"<br>{notice}" if notice else ""), elem_id="demo-banner", container=True)
        if speed:
            gr.Markdown(speed, elem_id="speed-banner", container=True)
        with gr.Row():
            with gr.Column(scale=1):
                image_editor = build_canvas()
                panel = build_mask_panel(image_editor, segmenter, limits, segmenter_note, words)
                build_extend_panel(image_editor, limits, panel.follow)
                prompt = build_prompt(defaults)
                live_preview, settings = build_settings(defaults, limits)
                recipe = build_recipe_drop()
                models = models_panel(server)
            with gr.Column(scale=1):
                results = build_results(link, limits.link_days)
        settings.update(negative_prompt=prompt.negative_prompt)
        follow_models(demo, models, server, settings, limits)
        remove = {"remove": prompt.remove} if hasattr(prompt, "remove") else {}  # the Remove choice is a setting too
        follow_recipe(recipe, prompt.prompt, {**settings, **remove}, limits)
        build_examples(image_editor, prompt.prompt, panel.follow)

        follow_generate(models, runner, files, limits, image_editor, prompt, live_preview, panel, settings, results)
        follow_history(results, image_editor, prompt.prompt, limits, panel.follow)
        follow_uploads(image_editor, panel.follow)
        demo.load(None, js=KEYS_JS)
        kept = [image_editor, prompt.prompt, live_preview, *settings.values(), *remove.values(), results.gallery,
                results.before_after, results.details, results.history, models.model, models.loras, models.lora_weight]
        follow_link(demo, results.link, kept,  # what a link to the page shows
                    reset=[results.keep_editing, results.download])  # armed again by selecting a candidate
        build_api(server, runner, files, limits)
    return demo
