"""Extend the canvas (outpainting): grow the picture on the chosen sides; the new area becomes the mask."""

from __future__ import annotations

from typing import Any, Callable, Optional

import gradio as gr

from blended import InputError

from .canvas import brush_for, editor_value
from .editing import SIDES, extend_canvas, extension
from .limits import Limits


def build_extend_panel(image_editor: gr.ImageEditor, limits: Limits, follow: Callable[[Any], Any]) -> None:
    """The accordion under the editor (call inside the Blocks' column) and its handler; `follow` refreshes what
    shows the editor's picture elsewhere once the canvas grew."""
    with gr.Accordion("Extend the canvas (outpainting)", open=False, elem_id="extend"):
        with gr.Row():
            sides = gr.CheckboxGroup(list(SIDES), value=["right"], label="Sides", elem_id="extend-sides")
            percent = gr.Slider(5, 100, step=5, value=25, label="By (% of the image's size)", elem_id="extend-percent")
        extend = gr.Button("Extend the canvas", size="sm", elem_id="extend-canvas")
        gr.Markdown("The new area is filled with the picture's blurred edge colours and becomes the "
                    "mask: describe what should be there and press Generate.")

    def on_extend(value: Optional[dict], chosen: list, by: float) -> Any:
        background = (value or {}).get("background")
        if background is None:
            raise gr.Error("Upload an image first.", title="Cannot extend")
        try:
            image, layer = extend_canvas(background, value.get("layers") or [],
                                         extension(background.size, by, chosen), limits.max_pixels)
        except InputError as e:
            raise gr.Error(str(e), title="Cannot extend") from None
        return brush_for(image.size, value=editor_value(image, [layer]))

    follow(extend.click(on_extend, inputs=[image_editor, sides, percent], outputs=image_editor,
                        api_visibility="private"))
