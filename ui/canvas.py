"""The canvas: the image editor a visitor paints the mask on (a magenta brush sized to each picture) and the
examples that load a picture with its mask as a layer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import gradio as gr
import numpy as np
from PIL import Image

from .editing import brush_radius, mask_layer

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"
BRUSH_COLOUR = ("#ff00ff", 0.55)  # translucent, so the picture stays visible under the mask
BRUSH_RADIUS = 6  # image pixels, before an upload; then `brush_radius(size)` (the size control changes it)


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


def build_canvas() -> gr.ImageEditor:
    """The image editor (call inside the Blocks' column): upload or paste, paint the region to edit."""
    return gr.ImageEditor(
        label="Image: paint over the region to edit", type="pil", image_mode="RGBA", format="png",
        sources=("upload", "clipboard"), transforms=(), fixed_canvas=False,
        canvas_size=(16, 16),  # gradio 6.31 places loaded layers within max(canvas_size, image): keep it small
        layers=False,
        brush=gr.Brush(colors=[BRUSH_COLOUR], default_color=BRUSH_COLOUR, color_mode="fixed",
                       default_size=BRUSH_RADIUS),
        eraser=gr.Eraser(default_size=BRUSH_RADIUS), elem_id="editor")


def follow_uploads(image_editor: gr.ImageEditor, follow: Callable[[Any], Any]) -> None:
    """A new upload gets a brush sized to it; `follow` refreshes what shows the editor's picture elsewhere."""
    def on_upload(value: Optional[dict]) -> Any:
        background = (value or {}).get("background")
        return gr.skip() if background is None else brush_for(background.size)

    follow(image_editor.upload(on_upload, inputs=image_editor, outputs=image_editor, queue=False,
                               api_visibility="private"))


def build_examples(image_editor: gr.ImageEditor, prompt: gr.Textbox, follow: Callable[[Any], Any]) -> None:
    """The examples under the app (when assets/examples has any): a click loads the picture with its mask as a
    layer into the editor, and the prompt."""
    examples = load_examples()
    if not examples:
        return

    def on_example(value: Optional[dict], text: str) -> Any:
        if not value or value.get("background") is None:
            return gr.skip()
        return brush_for(value["background"].size, value=editor_value(value["background"], value.get("layers")))

    shown = gr.Examples(
        examples=[[editor_value(ex["image"], [ex["mask"]]), ex["prompt"]] for ex in examples],
        inputs=[image_editor, prompt], outputs=image_editor, fn=on_example, run_on_click=True,
        example_labels=[ex["name"] for ex in examples], cache_examples=False,
        label="Examples: click one (its mask is the magenta layer: erase or add to it), then Generate")
    follow(shown.load_input_event)
