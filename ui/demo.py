"""The gradio Blocks around one loaded Editor: paint a mask, write a prompt, get ranked candidates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import gradio as gr

from blended import EditCancelled, EditConfig, Editor, EditResult, InputError
from blended.config import BACKGROUND_METHODS, SCHEDULERS
from blended.models import PRESETS

from .editing import OutputDir, StopSwitch, caption, checked_image, editor_inputs, progress_label, \
    server_defaults, settings_to_config
from .limits import Limits
from .zerogpu import gpu

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"
BRUSH_COLOUR = ("#ff00ff", 0.55)  # translucent, so the picture stays visible under the mask
BRUSH_RADIUS = 6  # image pixels; the editor's size control changes it (its "auto" is ~25 px on any image)
EDIT_CONCURRENCY = "edit"  # UI and API edits share one concurrency group (one model, one accelerator)
GPU_SECONDS = 180  # longest edit a ZeroGPU Space grants a device for

INTRO = """# blended: text-driven local image editing
Upload a picture, **paint over the region to change** (brush; the eraser, brush size and undo are in the
editor's toolbar), describe what should appear there and press **Generate**. Everything outside the painted
region is kept. Method: *Blended Latent Diffusion* (Avrahami, Fried, Lischinski, SIGGRAPH 2023)."""


def is_demo_model(editor: Editor) -> bool:
    """True when the editor runs the bundled demo model (by preset name or by its folder)."""
    m = editor.model
    return m.name == "demo" or Path(m.source).resolve() == Path(PRESETS["demo"]).resolve()


def load_examples(folder: Path = EXAMPLES) -> list[dict]:
    """The examples listed in `folder`/examples.json whose files exist: name, image, mask, prompt (paths absolute)."""
    index = folder / "examples.json"
    if not index.is_file():
        return []
    found = []
    for ex in json.loads(index.read_text()):
        image, mask = (folder / ex["image"]).resolve(), (folder / ex["mask"]).resolve()
        if image.is_file() and mask.is_file():
            found.append({**ex, "image": str(image), "mask": str(mask)})
    return found


def settings_widgets(defaults: EditConfig, limits: Limits) -> dict[str, gr.components.Component]:
    """The Settings accordion's widgets, keyed by EditConfig field (plus `randomize_seed`, `preserve_background`)."""
    w: dict[str, gr.components.Component] = {}
    w["num_candidates"] = gr.Slider(1, limits.max_candidates, step=1, label="Candidates",
                                    value=defaults.num_candidates)
    w["num_inference_steps"] = gr.Slider(1, limits.max_steps, step=1, label="Denoising steps",
                                         value=defaults.num_inference_steps)
    w["guidance_scale"] = gr.Slider(1.0, max(20.0, defaults.guidance_scale), step=0.5, label="Guidance scale",
                                    value=defaults.guidance_scale)
    with gr.Row():
        w["seed"] = gr.Number(value=defaults.seed, precision=0, minimum=0, label="Seed")
        w["randomize_seed"] = gr.Checkbox(value=True, label="Randomize seed (the seed used is written back)")
    w["blend_start"] = gr.Slider(0.0, 0.95, step=0.05, value=defaults.blend_start,
                                 label="Blend start (fraction of the schedule skipped)")
    w["shrink"] = gr.Checkbox(value=defaults.shrink, label="Progressive mask shrinking")
    w["background"] = gr.Dropdown(list(BACKGROUND_METHODS), value=defaults.background,
                                  label="Background reconstruction")
    w["preserve_background"] = gr.Checkbox(value=defaults.background == "decoder",
                                           label="Preserve faces and text in the background (decoder fine-tuning)")
    w["scheduler"] = gr.Dropdown(list(SCHEDULERS), value=defaults.scheduler, label="Scheduler")
    for name, widget in w.items():
        widget.elem_id = name.replace("_", "-")
    return w


def create_demo(editor: Editor, limits: Optional[Limits] = None, notice: Optional[str] = None) -> gr.Blocks:
    """Build the app around `editor` (not launched: call `.queue(...)` and `.launch(...)` on it).

    Args:
        editor: the loaded engine, shared by every request.
        limits: deployment limits; default `Limits.from_env()`.
        notice: an extra line for the demo-model banner (e.g. why the requested model is not in use).

    API endpoints: `/edit` (image file, mask file, prompt, settings JSON -> gallery, result JSON) and
    `/stop` (stops the running edits of the caller's session).
    """
    limits = limits or Limits.from_env()
    defaults = server_defaults(editor.defaults, limits)
    files = OutputDir()
    switch = StopSwitch()

    @gpu(duration=GPU_SECONDS)
    def run_edit(source, mask, prompt: str, config: EditConfig, report: Callable,
                 should_stop: Callable[[], bool]) -> EditResult:
        return editor.edit(source, mask, prompt, config, progress=report, should_stop=should_stop)

    def guarded_edit(source, mask, prompt: str, config: EditConfig, request: Optional[gr.Request],
                     progress: gr.Progress) -> EditResult:
        """One edit with a Stop flag of its own and named progress stages; user-caused errors become gr.Error."""
        session = getattr(request, "session_hash", None) or "anonymous"
        stop = switch.start(session)

        def report(stage: str, done: int, total: int) -> None:
            if stage != "done":
                progress((done, max(total, 1)), desc=progress_label(stage, done, total), unit="steps")

        try:
            return run_edit(source, mask, prompt, config, report, stop.is_set)
        except InputError as e:
            raise gr.Error(str(e), title="Cannot edit") from None
        except EditCancelled:
            raise gr.Error("The edit was stopped before it finished.", title="Stopped") from None
        except (MemoryError, RuntimeError) as e:
            if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
                raise gr.Error("Out of memory: try fewer candidates or a smaller image.", title="Cannot edit") from None
            raise
        finally:
            switch.finish(session, stop)

    def outputs_of(result: EditResult, source) -> tuple[list, tuple[str, str], str, dict]:
        """Gallery items, the before/after pair of the best candidate, its PNG and the session's result state."""
        source_path, paths = files.save(source, result.candidates)
        items = [(p, caption(i + 1, c)) for i, (p, c) in enumerate(zip(paths, result.candidates))]
        return items, (source_path, paths[0]), paths[0], {"source": source_path, "paths": paths}

    with gr.Blocks(title="blended: Blended Latent Diffusion", delete_cache=(1800, 3600)) as demo:
        gr.Markdown(INTRO)
        if is_demo_model(editor):
            text = ("**The bundled demo model is in use.** It only knows simple scenes of coloured shapes at "
                    "64x64 pixels: try *a red circle* or *a blue square* on the shape examples below.")
            gr.Markdown(text + (f"<br>{notice}" if notice else ""), elem_id="demo-banner", container=True)

        with gr.Row():
            with gr.Column(scale=1):
                image_editor = gr.ImageEditor(
                    label="Image: paint over the region to edit", type="pil", image_mode="RGBA", format="png",
                    sources=("upload", "clipboard"), transforms=(), layers=False, fixed_canvas=False,
                    brush=gr.Brush(colors=[BRUSH_COLOUR], default_color=BRUSH_COLOUR, color_mode="fixed",
                                   default_size=BRUSH_RADIUS),
                    eraser=gr.Eraser(default_size=BRUSH_RADIUS), elem_id="editor")
                with gr.Row():
                    clear_mask = gr.Button("Clear mask", size="sm", elem_id="clear-mask")
                    invert_mask = gr.Checkbox(label="Invert mask (edit outside the painted region)",
                                              value=defaults.invert_mask, elem_id="invert-mask")
                prompt = gr.Textbox(label="Prompt", placeholder="what should appear in the painted region",
                                    max_lines=3, elem_id="prompt")
                negative_prompt = gr.Textbox(label="Negative prompt", value=defaults.negative_prompt,
                                             placeholder="what to avoid (optional)", max_lines=3,
                                             elem_id="negative-prompt")
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                with gr.Accordion("Settings", open=False):
                    settings = settings_widgets(defaults, limits)
            with gr.Column(scale=1):
                gallery = gr.Gallery(label="Candidates, best first", format="png", columns=2, height="auto",
                                     object_fit="contain", elem_id="gallery")
                before_after = gr.ImageSlider(label="Before / after (select a candidate)", type="filepath",
                                              format="png", elem_id="before-after")
                download = gr.DownloadButton("Download the selected candidate (full-resolution PNG)",
                                             interactive=False, elem_id="download")
                with gr.Accordion("Details (JSON)", open=False):
                    details = gr.JSON(label="Result", elem_id="details")
        settings.update(negative_prompt=negative_prompt, invert_mask=invert_mask)
        results = gr.State(None)  # {"source": path, "paths": [...]} of this session's last edit

        examples = load_examples()
        if examples:
            gr.Examples(
                examples=[[{"background": ex["image"], "layers": [ex["mask"]], "composite": ex["image"]},
                           ex["prompt"]] for ex in examples],
                inputs=[image_editor, prompt], example_labels=[ex["name"] for ex in examples], cache_examples=False,
                label="Examples: click one, then Generate (its mask is applied, though the editor does not draw it)")

        # -- events: handlers read their inputs by component, settings by name ---------------------------
        def on_generate(data: dict, request: gr.Request, progress=gr.Progress()) -> dict:
            values = {name: data[widget] for name, widget in settings.items()}
            try:
                source, mask = editor_inputs(data[image_editor], limits)
                config = settings_to_config(defaults, values, limits)
            except InputError as e:
                raise gr.Error(str(e), title="Cannot edit") from None
            result = guarded_edit(source, mask, data[prompt], config, request, progress)
            items, pair, best, state = outputs_of(result, source)
            return {gallery: items, before_after: pair, details: result.to_json(), settings["seed"]: config.seed,
                    download: gr.DownloadButton(value=best, interactive=True), results: state}

        editing = generate.click(
            on_generate, inputs={image_editor, prompt, *settings.values()},
            outputs=[gallery, before_after, details, settings["seed"], download, results],
            concurrency_limit=limits.concurrency, concurrency_id=EDIT_CONCURRENCY, api_visibility="private")

        def on_select(state: Optional[dict], evt: gr.SelectData) -> Any:
            if not state or evt.index is None or not 0 <= evt.index < len(state["paths"]):
                return gr.skip(), gr.skip()
            path = state["paths"][evt.index]
            return (state["source"], path), gr.DownloadButton(value=path, interactive=True)

        gallery.select(on_select, inputs=results, outputs=[before_after, download], queue=False,
                       api_visibility="private")

        def on_stop(request: gr.Request) -> None:
            """Stop the edits this session is running (they end within one denoising step)."""
            switch.stop(getattr(request, "session_hash", None) or "anonymous")

        stop.click(on_stop, inputs=None, outputs=None, api_name="stop", concurrency_limit=None)
        stop.click(None, cancels=[editing])  # edits still waiting in the queue never start

        def on_clear(value: Optional[dict]) -> Any:
            if not value or value.get("background") is None:
                return gr.skip()
            return {"background": value["background"], "layers": [], "composite": value["background"]}

        clear_mask.click(on_clear, inputs=image_editor, outputs=image_editor, queue=False, api_visibility="private")
        settings["preserve_background"].input(
            lambda on, method: "decoder" if on else ("none" if method == "decoder" else method),
            inputs=[settings["preserve_background"], settings["background"]], outputs=settings["background"],
            queue=False, api_visibility="private")
        settings["background"].input(lambda method: method == "decoder", inputs=settings["background"],
                                     outputs=settings["preserve_background"], queue=False, api_visibility="private")

        # -- the API endpoint: files in, gallery + JSON out ---------------------------------------------
        with gr.Column(visible=False):
            api_image = gr.File(label="image", file_types=["image"])
            api_mask = gr.File(label="mask, same size (white or opaque = edit)", file_types=["image"])
            api_prompt = gr.Textbox(label="prompt")
            api_settings = gr.JSON(label="settings: EditConfig names, randomize_seed, preserve_background")
            api_gallery = gr.Gallery(label="candidates, best first", format="png")
            api_result = gr.JSON(label="result")
            api_button = gr.Button()

        def api_edit(image_file: Optional[str], mask_file: Optional[str], text: str, options: Optional[dict],
                     request: gr.Request, progress=gr.Progress()) -> tuple[list, dict]:
            """Edit `image_file` inside `mask_file` (same size; white or opaque = edit) to show `text`."""
            if not image_file or not mask_file:
                raise gr.Error("send both an image file and a mask file", title="Cannot edit")
            try:
                source = checked_image(image_file, limits)
                config = settings_to_config(defaults, options, limits)
            except InputError as e:
                raise gr.Error(str(e), title="Cannot edit") from None
            result = guarded_edit(source, mask_file, text, config, request, progress)
            items, _, _, _ = outputs_of(result, source)
            return items, result.to_json()

        api_button.click(api_edit, inputs=[api_image, api_mask, api_prompt, api_settings],
                         outputs=[api_gallery, api_result], api_name="edit", concurrency_limit=limits.concurrency,
                         concurrency_id=EDIT_CONCURRENCY)
    return demo
