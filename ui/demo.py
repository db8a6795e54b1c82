"""The gradio Blocks around one loaded Editor: paint a mask, write a prompt, get ranked candidates."""

from __future__ import annotations

import contextvars
import json
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import gradio as gr
import numpy as np
from PIL import Image

from blended import EditCancelled, EditConfig, Editor, EditResult, InputError
from blended.config import BACKGROUND_METHODS, SCHEDULERS
from blended.models import PRESETS

from .editing import SIDES, OutputDir, StopSwitch, brush_radius, caption, checked_image, continue_history, \
    editor_inputs, extend_canvas, extension, mask_layer, progress_label, server_defaults, settings_to_config
from .limits import Limits
from .mask_panel import build_mask_panel
from .models_panel import ModelSlot, models_panel
from .speed import cpu_notice
from .zerogpu import gpu

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"
BRUSH_COLOUR = ("#ff00ff", 0.55)  # translucent, so the picture stays visible under the mask
BRUSH_RADIUS = 6  # image pixels, before an upload; then `brush_radius(size)` (the size control changes it)
PREVIEW_INTERVAL = 0.25  # seconds between two live previews sent to the page (the engine makes them more often)
PREVIEWS_PER_CHUNK = 10  # the engine makes a preview every steps / PREVIEWS_PER_CHUNK steps
EDIT_CONCURRENCY = "edit"  # UI and API edits share one concurrency group (one model, one accelerator)
GPU_SECONDS = 180  # longest edit a ZeroGPU Space grants a device for

INTRO = """# blended: text-driven local image editing
Upload a picture, **paint over the region to change** (brush; the eraser, brush size and undo are in the
editor's toolbar), describe what should appear there and press **Generate**. Beyond the painted region and a
thin seam band around it (8 pixels), every pixel comes back exactly as uploaded, at full resolution.
Method: *Blended Latent Diffusion* (Avrahami, Fried, Lischinski, SIGGRAPH 2023)."""


# Ctrl/Cmd+Enter in the prompt (or the negative prompt) presses Generate
KEYS_JS = """() => {
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Enter" || !(e.ctrlKey || e.metaKey)) return;
    if (!e.target.closest || !e.target.closest("#prompt, #negative-prompt")) return;
    e.preventDefault();
    document.querySelector("#generate")?.click();
  }, true);
}"""


def brush_for(size: tuple[int, int], **value: Any) -> gr.ImageEditor:
    """An editor update whose brush and eraser fit an image of `size` (w, h); `value=` also sets the image."""
    radius = brush_radius(size)
    return gr.ImageEditor(**value, brush=gr.Brush(colors=[BRUSH_COLOUR], default_color=BRUSH_COLOUR, color_mode="fixed",
                                         default_size=radius),
                          eraser=gr.Eraser(default_size=radius))


def editor_value(background: Any, layers: Optional[list] = None) -> dict:
    """An ImageEditor value that draws its layers (gradio draws them only when `composite` is None).

    Without layers it gets one transparent layer: gradio 6.31 keeps no drawable layer when a new background
    arrives with an empty layer list."""
    if not layers:
        image = background if isinstance(background, Image.Image) else Image.open(background)
        layers = [mask_layer(np.zeros(image.size[::-1], bool))]
    return {"background": background, "layers": list(layers), "composite": None}


def is_demo_model(editor: Editor) -> bool:
    """True when the editor runs a bundled demo model, `demo` or `demo-fast` (by preset name or by its folder)."""
    m = editor.model
    return m.name in ("demo", "demo-fast") or any(Path(m.source).resolve() == Path(PRESETS[name]).resolve()
                                                   for name in ("demo", "demo-fast"))


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
    w["guidance_scale"] = gr.Slider(min(1.0, defaults.guidance_scale), max(20.0, defaults.guidance_scale), step=0.5,
                                    label="Guidance scale",
                                    value=defaults.guidance_scale)
    with gr.Row():
        w["seed"] = gr.Number(value=defaults.seed, precision=0, minimum=0, label="Seed")
        w["randomize_seed"] = gr.Checkbox(value=True, label="Randomize seed (the seed used is written back)")
    w["blend_start"] = gr.Slider(0.0, 0.95, step=0.05, value=defaults.blend_start,
                                 label="Blend start (fraction of the schedule skipped)")
    w["shrink"] = gr.Checkbox(value=defaults.shrink, label="Progressive mask shrinking")
    w["mask_blur"] = gr.Slider(0, 32, step=1, value=defaults.mask_blur, label="Mask blur (px)",
                               info="Fades the edit into the photo over a blur of this many pixels outside the "
                                    "mask's edge. 0 = the usual 8 px seam band.")
    w["background"] = gr.Dropdown(list(BACKGROUND_METHODS), value=defaults.background,
                                  label="Background reconstruction")
    w["preserve_background"] = gr.Checkbox(
        value=defaults.background == "decoder", label="Preserve faces and text next to the mask (decoder fine-tuning)",
        info=f"Off, the photo is kept bit for bit beyond a {defaults.feather} px seam band, where the edit cross-fades "
             "into it. On, a copy of the decoder is fine-tuned for the edit, so the band comes out seamless and faces "
             "or text right next to the mask stay sharp; it adds about a third to a half of the edit's time on a GPU "
             "(much more on a CPU with Stable Diffusion).")
    w["scheduler"] = gr.Dropdown(list(SCHEDULERS), value=defaults.scheduler, label="Scheduler")
    w["inpainting_mask_weight"] = gr.Slider(0.0, 1.0, step=0.05, value=defaults.inpainting_mask_weight,
                                            label="Inpainting mask weight (9-channel inpainting models only)",
                                            info="What an inpainting model sees of the photo under the mask: 1 = "
                                                 "a hole, 0 = the photo as it is. Other models ignore it.")
    for name, widget in w.items():
        widget.elem_id = name.replace("_", "-")
    return w


MODEL_SETTINGS = ("num_inference_steps", "guidance_scale", "scheduler", "blend_start", "shrink", "mask_blur",
                  "background", "inpainting_mask_weight", "negative_prompt")  # reset to a newly loaded model's defaults


def model_settings(slot: ModelSlot, status: str, names: Sequence[str], limits: Limits) -> list:
    """The values of the `names` settings after the model picker answered `status`: the model in use's defaults
    (a few-step model's steps, scheduler and guidance, a model's blended.json), or skips when the load failed."""
    if not status.startswith("In use:"):  # a failed load: the model in use did not change
        return [gr.skip()] * len(names)
    defaults = server_defaults(slot.current.defaults, limits)
    return [getattr(defaults, n) for n in names]


def follow_model_defaults(slot: ModelSlot, status: gr.components.Component,
                          settings: dict[str, gr.components.Component], limits: Limits) -> None:
    """When the model picker swaps in another model, the Settings take its defaults (`model_settings`)."""
    names = [n for n in MODEL_SETTINGS if n in settings]
    status.change(lambda text: model_settings(slot, text, names, limits), inputs=status,
                  outputs=[settings[n] for n in names], queue=False, api_visibility="private")


def create_demo(editor: Editor, limits: Optional[Limits] = None, notice: Optional[str] = None,
                speed: Optional[str] = "auto", segmenter: Any = "grabcut", segmenter_note: str = "",
                models_dir: Optional[str] = None) -> gr.Blocks:
    """Build the app around `editor` (not launched: call `.queue(...)` and `.launch(...)` on it).

    Args:
        editor: the loaded engine, shared by every request.
        limits: deployment limits; default `Limits.from_env()`.
        notice: an extra line for the demo-model banner (e.g. why the requested model is not in use).
        speed: a banner about the time an edit takes here; "auto" times one UNet call when a Stable Diffusion
            model runs on the CPU (`ui.speed.cpu_notice`), None shows none.
        segmenter: what selects objects from clicks (`blended.select.load_segmenter`); "grabcut" = GrabCut,
            None = selection off. `segmenter_note` says which is in use.
        models_dir: the model picker's folder of models and LoRAs (default: $BLENDED_MODELS_DIR; none: the
            bundled presets only).

    API endpoints: `/edit` (image file, mask file, prompt, settings JSON -> gallery, result JSON) and
    `/stop` (stops the running edits of the caller's session).
    """
    limits = limits or Limits.from_env()
    editor = editor if isinstance(editor, ModelSlot) else ModelSlot(editor)  # the model picker swaps what it holds
    models_dir = models_dir if models_dir is not None else os.environ.get("BLENDED_MODELS_DIR")
    defaults = server_defaults(editor.defaults, limits)
    files = OutputDir()
    switch = StopSwitch()
    if speed == "auto":
        speed = None if is_demo_model(editor) else cpu_notice(editor, defaults)
    if segmenter == "grabcut":
        from blended.select import GrabCutSegmenter

        segmenter, segmenter_note = GrabCutSegmenter(), segmenter_note or "Selection: GrabCut (OpenCV, no weights)."

    @gpu(duration=GPU_SECONDS)
    def run_edit(source, mask, prompt: str, config: EditConfig, report: Callable,
                 should_stop: Callable[[], bool], preview: Optional[Callable] = None) -> EditResult:
        if isinstance(mask, list):  # several (label, mask): split the candidates, rank them together
            from blended.multimask import edit_masks

            return edit_masks(editor, source, mask, prompt, config, progress=report, should_stop=should_stop)
        every = max(1, config.num_inference_steps // PREVIEWS_PER_CHUNK)
        return editor.edit(source, mask, prompt, config, progress=report, should_stop=should_stop,
                           preview=preview, preview_every=every)

    def session_of(request: Optional[gr.Request]) -> str:
        return getattr(request, "session_hash", None) or "anonymous"

    def show_progress(progress: gr.Progress, stage: str, done: int, total: int) -> None:
        if stage != "done":
            progress((done, max(total, 1)), desc=progress_label(stage, done, total), unit="steps")

    def guarded_edit(source, mask, prompt: str, config: EditConfig, stop: threading.Event, report: Callable,
                     preview: Optional[Callable] = None) -> EditResult:
        """One edit polling `stop`, reporting named stages; user-caused errors become gr.Error."""
        try:
            return run_edit(source, mask, prompt, config, report, stop.is_set, preview)
        except InputError as e:
            raise gr.Error(str(e), title="Cannot edit") from None
        except EditCancelled:
            raise gr.Error("The edit was stopped before it finished.", title="Stopped") from None
        except (MemoryError, RuntimeError) as e:
            if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
                raise gr.Error("Out of memory: try fewer candidates or a smaller image.", title="Cannot edit") from None
            raise

    def streamed_edit(source, mask, prompt: str, config: EditConfig, request: Optional[gr.Request],
                      progress: gr.Progress, live: bool) -> Iterator[Any]:
        """Run the edit in a worker thread; yield ("preview", done, total, images) at most every
        PREVIEW_INTERVAL seconds while it denoises (when `live`), then ("result", EditResult).

        Closing the generator (gradio's cancel) stops the edit at its next denoising step."""
        session = session_of(request)
        stop = switch.start(session)
        messages: queue.Queue = queue.Queue()

        def work() -> None:
            try:
                messages.put(("result", guarded_edit(
                    source, mask, prompt, config, stop, lambda *a: messages.put(("progress", *a)),
                    (lambda *a: messages.put(("preview", *a))) if live else None)))
            except BaseException as e:  # noqa: BLE001  (re-raised in the handler's thread)
                messages.put(("error", e))

        worker = threading.Thread(target=contextvars.copy_context().run, args=(work,), daemon=True)
        worker.start()
        finished, last = False, 0.0
        try:
            while True:
                kind, *rest = messages.get()
                if kind == "progress":
                    show_progress(progress, *rest)
                elif kind == "preview":
                    if time.monotonic() - last >= PREVIEW_INTERVAL:
                        last = time.monotonic()
                        yield ("preview", *rest)
                elif kind == "error":
                    finished = True
                    raise rest[0]
                else:
                    finished = True
                    yield ("result", rest[0])
                    return
        finally:
            if not finished:
                stop.set()
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
        if speed:
            gr.Markdown(speed, elem_id="speed-banner", container=True)

        with gr.Row():
            with gr.Column(scale=1):
                image_editor = gr.ImageEditor(
                    label="Image: paint over the region to edit", type="pil", image_mode="RGBA", format="png",
                    sources=("upload", "clipboard"), transforms=(), fixed_canvas=False,
                    canvas_size=(16, 16),  # gradio 6.31 places loaded layers within max(canvas_size, image): keep it small
                    layers=False,
                    brush=gr.Brush(colors=[BRUSH_COLOUR], default_color=BRUSH_COLOUR, color_mode="fixed",
                                   default_size=BRUSH_RADIUS),
                    eraser=gr.Eraser(default_size=BRUSH_RADIUS), elem_id="editor")
                panel = build_mask_panel(image_editor, segmenter, limits, segmenter_note)
                with gr.Accordion("Extend the canvas (outpainting)", open=False, elem_id="extend"):
                    with gr.Row():
                        extend_sides = gr.CheckboxGroup(list(SIDES), value=["right"], label="Sides",
                                                        elem_id="extend-sides")
                        extend_percent = gr.Slider(5, 100, step=5, value=25, label="By (% of the image's size)",
                                                   elem_id="extend-percent")
                    extend = gr.Button("Extend the canvas", size="sm", elem_id="extend-canvas")
                    gr.Markdown("The new area is filled with the picture's blurred edge colours and becomes the "
                                "mask: describe what should be there and press Generate.")
                prompt = gr.Textbox(label="Prompt (Ctrl/Cmd+Enter generates)",
                                    placeholder="what should appear in the painted region", max_lines=3,
                                    elem_id="prompt")
                negative_prompt = gr.Textbox(label="Negative prompt", value=defaults.negative_prompt,
                                             placeholder="what to avoid (optional)", max_lines=3,
                                             elem_id="negative-prompt")
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                with gr.Accordion("Settings", open=False):
                    live_preview = gr.Checkbox(value=True, label="Live preview while denoising (a rough look "
                                               "at the candidates forming)", elem_id="live-preview")
                    settings = settings_widgets(defaults, limits)
                model_widgets = models_panel(editor, models_dir)
            with gr.Column(scale=1):
                gallery = gr.Gallery(label="Candidates, best first", format="png", columns=2, height="auto",
                                     object_fit="contain", elem_id="gallery")
                with gr.Row():
                    keep_editing = gr.Button("Continue editing the selected candidate", size="sm",
                                             interactive=False, elem_id="continue-editing")
                    download = gr.DownloadButton("Download the selected candidate (full-resolution PNG)",
                                                 interactive=False, size="sm", elem_id="download")
                before_after = gr.ImageSlider(label="Before / after (select a candidate)", type="filepath",
                                              format="png", elem_id="before-after")
                history_gallery = gr.Gallery(label="Edit history (select a version to edit it again)",
                                             format="png", columns=6, height="auto", object_fit="contain",
                                             allow_preview=False, elem_id="history")
                with gr.Accordion("Details (JSON)", open=False):
                    details = gr.JSON(label="Result", elem_id="details")
        settings.update(negative_prompt=negative_prompt)
        follow_model_defaults(editor, model_widgets["status"], settings, limits)
        results = gr.State(None)  # {"source": path, "paths": [...], "selected": i} of this session's last edit
        history = gr.State([])  # the session's versions: [{"path", "label", "digest"}], oldest first

        examples = load_examples()
        if examples:
            def on_example(value: Optional[dict], text: str) -> Any:
                if not value or value.get("background") is None:
                    return gr.skip()
                return brush_for(value["background"].size, value=editor_value(value["background"],
                                                                                   value.get("layers")))

            shown = gr.Examples(
                examples=[[editor_value(ex["image"], [ex["mask"]]), ex["prompt"]] for ex in examples],
                inputs=[image_editor, prompt], outputs=image_editor, fn=on_example, run_on_click=True,
                example_labels=[ex["name"] for ex in examples], cache_examples=False,
                label="Examples: click one (its mask is the magenta layer: erase or add to it), then Generate")
            panel.follow(shown.load_input_event)

        # -- events: handlers read their inputs by component, settings by name ---------------------------
        def on_generate(data: dict, request: gr.Request, progress=gr.Progress()) -> Iterator[dict]:
            values = {name: data[widget] for name, widget in settings.items()}
            try:
                source, mask = editor_inputs(data[image_editor], limits)
                config = settings_to_config(defaults, values, limits)
                mask = panel.masks(data[image_editor], data[panel.state], data[panel.multi]) or mask
            except InputError as e:
                raise gr.Error(str(e), title="Cannot edit") from None
            live = bool(data[live_preview]) and not isinstance(mask, list)
            for kind, *rest in streamed_edit(source, mask, data[prompt], config, request, progress, live):
                if kind == "preview":
                    done, total, images = rest
                    yield {gallery: [(im, f"preview · step {done}/{total}") for im in images]}
                    continue
                result = rest[0]
                items, pair, best, state = outputs_of(result, source)
                yield {gallery: items, before_after: pair, details: result.to_json(), settings["seed"]: config.seed,
                       download: gr.DownloadButton(value=best, interactive=True), results: state,
                       keep_editing: gr.Button(interactive=True)}

        editing = generate.click(
            on_generate, inputs={image_editor, prompt, live_preview, panel.multi, panel.state, *settings.values()},
            outputs=[gallery, before_after, details, settings["seed"], download, results, keep_editing],
            concurrency_limit=limits.concurrency, concurrency_id=EDIT_CONCURRENCY, api_visibility="private")

        def on_select(state: Optional[dict], evt: gr.SelectData) -> Any:
            if not state or evt.index is None or not 0 <= evt.index < len(state["paths"]):
                return gr.skip(), gr.skip(), gr.skip()
            path = state["paths"][evt.index]
            return (state["source"], path), gr.DownloadButton(value=path, interactive=True), \
                {**state, "selected": evt.index}

        gallery.select(on_select, inputs=results, outputs=[before_after, download, results], queue=False,
                       api_visibility="private")

        def on_continue(state: Optional[dict], versions: list, text: str) -> Any:
            """The selected candidate (the best when none was selected) becomes the image to edit; mask cleared."""
            if not state:
                raise gr.Error("Generate first, then continue from one of the candidates.", title="Nothing to continue")
            path = state["paths"][state.get("selected", 0)]
            versions = continue_history(versions, state["source"], path, text or "")
            size = checked_image(path, limits).size
            return brush_for(size, value=editor_value(path)), versions, [(v["path"], v["label"]) for v in versions]

        panel.follow(keep_editing.click(on_continue, inputs=[results, history, prompt],
                                        outputs=[image_editor, history, history_gallery], queue=False,
                                        api_visibility="private"))

        def on_history(versions: list, evt: gr.SelectData) -> Any:
            if evt.index is None or not 0 <= evt.index < len(versions or []):
                return gr.skip()
            path = versions[evt.index]["path"]
            return brush_for(checked_image(path, limits).size, value=editor_value(path))

        panel.follow(history_gallery.select(on_history, inputs=history, outputs=image_editor, queue=False,
                                            api_visibility="private"))

        def on_upload(value: Optional[dict]) -> Any:
            background = (value or {}).get("background")
            return gr.skip() if background is None else brush_for(background.size)

        panel.follow(image_editor.upload(on_upload, inputs=image_editor, outputs=image_editor, queue=False,
                                         api_visibility="private"))

        def on_extend(value: Optional[dict], sides: list, percent: float) -> Any:
            background = (value or {}).get("background")
            if background is None:
                raise gr.Error("Upload an image first.", title="Cannot extend")
            try:
                image, layer = extend_canvas(background, value.get("layers") or [],
                                             extension(background.size, percent, sides), limits.max_pixels)
            except InputError as e:
                raise gr.Error(str(e), title="Cannot extend") from None
            return brush_for(image.size, value=editor_value(image, [layer]))

        panel.follow(extend.click(on_extend, inputs=[image_editor, extend_sides, extend_percent], outputs=image_editor,
                                  api_visibility="private"))

        def on_stop(request: gr.Request) -> None:
            """Stop the edits this session is running (they end within one denoising step)."""
            switch.stop(session_of(request))

        stop.click(on_stop, inputs=None, outputs=None, api_name="stop", concurrency_limit=None)
        stop.click(None, cancels=[editing])  # edits still waiting in the queue never start

        settings["preserve_background"].input(
            lambda on, method: "decoder" if on else (EditConfig().background if method == "decoder" else method),
            inputs=[settings["preserve_background"], settings["background"]], outputs=settings["background"],
            queue=False, api_visibility="private")
        settings["background"].input(lambda method: method == "decoder", inputs=settings["background"],
                                     outputs=settings["preserve_background"], queue=False, api_visibility="private")
        demo.load(None, js=KEYS_JS)

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
            session = session_of(request)
            stop = switch.start(session)
            try:
                result = guarded_edit(source, mask_file, text, config, stop,
                                      lambda *a: show_progress(progress, *a))
            finally:
                switch.finish(session, stop)
            items, _, _, _ = outputs_of(result, source)
            return items, result.to_json()

        api_button.click(api_edit, inputs=[api_image, api_mask, api_prompt, api_settings],
                         outputs=[api_gallery, api_result], api_name="edit", concurrency_limit=limits.concurrency,
                         concurrency_id=EDIT_CONCURRENCY)
    return demo
