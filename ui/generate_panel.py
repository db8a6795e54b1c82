"""The prompt, Generate and Stop: Generate reads the editor, the mask tools and the Settings by name, runs the
edit on the model in use (`EditRunner.stream`, live previews on the way) and fills the results column; Stop is
also the `/stop` API endpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import gradio as gr

from blended import EditConfig, InputError

from .editing import OutputDir, edit_config, editor_inputs
from .limits import Limits
from .mask_panel import MaskPanel
from .results_panel import Results, saved_outputs
from .streaming import EDIT_CONCURRENCY, EditRunner


@dataclass
class Prompt:
    """The prompt area's components."""

    prompt: gr.Textbox
    negative_prompt: gr.Textbox
    generate: gr.Button
    stop: gr.Button
    remove: gr.Checkbox  # the Remove choice (EditConfig.remove): Generate takes the painted object away, no prompt


def build_prompt(defaults: EditConfig) -> Prompt:
    """The prompts and the Generate / Stop buttons (call inside the Blocks' column)."""
    prompt = gr.Textbox(label="Prompt (Ctrl/Cmd+Enter generates)", placeholder="what should appear in the painted region",
                        max_lines=3, elem_id="prompt")
    negative_prompt = gr.Textbox(label="Negative prompt", value=defaults.negative_prompt,
                                 placeholder="what to avoid (optional)", max_lines=3, elem_id="negative-prompt")
    remove = gr.Checkbox(value=False, label="Remove: take away what is painted (no prompt needed; a prompt, if any, "
                         "describes what is behind it)", elem_id="remove")
    with gr.Row():
        generate = gr.Button("Generate", variant="primary", elem_id="generate")
        stop = gr.Button("Stop", variant="stop", elem_id="stop")
    return Prompt(prompt, negative_prompt, generate, stop, remove)


def follow_generate(models: Any, runner: EditRunner, files: OutputDir, limits: Limits, image_editor: gr.ImageEditor,
                    prompt: Prompt, live_preview: gr.Checkbox, panel: MaskPanel,
                    settings: dict[str, gr.components.Component], results: Results) -> None:
    """The handlers of Generate and Stop. `models` (`ui.models_panel.ModelPanel`) holds the session's model: an edit
    reads its defaults and runs on it, held until the edit ends (`settings` hold the widgets by setting name,
    `negative_prompt` included)."""
    settings = {**settings, "remove": prompt.remove}  # the Remove choice is a setting of the edit

    def on_generate(data: dict, request: gr.Request, progress=gr.Progress()) -> Iterator[dict]:
        lease = models.acquire(data[models.key], progress)  # this session's model, held until the edit ends
        editor = lease.model
        values = {name: data[widget] for name, widget in settings.items()}
        try:
            source, mask = editor_inputs(data[image_editor], limits)
            config = edit_config(editor, values, limits)
            mask = panel.masks(data[image_editor], data[panel.state], data[panel.multi]) or mask
        except BaseException as e:
            lease.release()  # the edit does not start
            if isinstance(e, InputError):
                raise gr.Error(str(e), title="Cannot edit") from None
            raise
        live = bool(data[live_preview]) and not isinstance(mask, list)
        for kind, *rest in runner.stream(editor, source, mask, data[prompt.prompt], config, request, progress, live,
                                         lease):
            if kind == "preview":
                done, total, images = rest
                yield {results.gallery: [(im, f"preview · step {done}/{total}") for im in images]}
                continue
            result = rest[0]
            items, pair, best, state = saved_outputs(files, result, source)
            yield {results.gallery: items, results.before_after: pair, results.details: result.to_json(),
                   settings["seed"]: config.seed, results.download: gr.DownloadButton(value=best, interactive=True),
                   results.state: state, results.keep_editing: gr.Button(interactive=True)}

    editing = prompt.generate.click(
        on_generate, inputs={image_editor, prompt.prompt, live_preview, panel.multi, panel.state, models.key,
                *settings.values()},
        outputs=[results.gallery, results.before_after, results.details, settings["seed"], results.download,
                 results.state, results.keep_editing],
        concurrency_limit=limits.concurrency, concurrency_id=EDIT_CONCURRENCY, api_visibility="private")

    def on_stop(request: gr.Request) -> None:
        """Stop the edits this session is running (they end within one denoising step)."""
        runner.stop(request)

    prompt.stop.click(on_stop, inputs=None, outputs=None, api_name="stop", concurrency_limit=None)
    prompt.stop.click(None, cancels=[editing])  # edits still waiting in the queue never start
