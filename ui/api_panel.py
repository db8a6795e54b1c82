"""The `/edit` API endpoint: image and mask files, a prompt and settings JSON in; candidates and the result's
JSON out. Its components are hidden: the endpoint is for `gradio_client` and scripts. It edits with the server's
own model (`--model` / `BLENDED_MODEL`), whatever a browser session picked."""

from __future__ import annotations

from typing import Any, Optional

import gradio as gr

from blended import InputError

from .editing import OutputDir, checked_image, edit_config
from .limits import Limits
from .results_panel import saved_outputs
from .streaming import EDIT_CONCURRENCY, EditRunner


def build_api(server: Any, runner: EditRunner, files: OutputDir, limits: Limits) -> None:
    """The hidden components of `/edit` and its handler (call inside the Blocks). `server`
    (`ui.models_panel.ServerModels`) gives the server's own model: an edit reads its defaults and runs on it."""
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
        with server.acquire(None, progress) as editor:  # the server's model, held until the edit ends
            try:
                source = checked_image(image_file, limits)
                config = edit_config(editor, options, limits)
            except InputError as e:
                raise gr.Error(str(e), title="Cannot edit") from None
            result = runner.run(editor, source, mask_file, text, config, request, progress)
        items, _, _, _ = saved_outputs(files, result, source)
        return items, result.to_json()

    api_button.click(api_edit, inputs=[api_image, api_mask, api_prompt, api_settings],
                     outputs=[api_gallery, api_result], api_name="edit", concurrency_limit=limits.concurrency,
                     concurrency_id=EDIT_CONCURRENCY)
