"""Write the app's examples: shape scenes for the demo model (blended_dev/scenes.py) and one photo.

    python assets/examples/make_examples.py

Each example is an image, a mask and a prompt, listed in examples.json. A mask is an RGBA layer,
transparent where the image is kept and translucent magenta where it is edited: the app's image
editor shows it as a painted stroke, and `blended` (CLI, API) reads it by its alpha.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from blended_dev import scenes

HERE = Path(__file__).resolve().parent

LAYER_RGBA = (255, 0, 255, 160)  # the painted colour; its alpha (> 50%) marks the region to edit

# (file stem, held-out scene seed offset, prompt); the masks come from the scene generator
SCENES = [
    ("scene-red-circle", 0, "a red circle"),
    ("scene-blue-square", 5, "a blue square"),
    ("scene-yellow-triangle", 9, "a yellow triangle"),
    ("scene-green-circle", 13, "a green circle"),
]
PHOTO = ("photo-coffee", HERE.parent / "photos" / "coffee.png", (205, 92, 372, 195), "a cup of green matcha latte")


def layer(mask: np.ndarray) -> Image.Image:
    """A painted layer (RGBA) from a boolean mask."""
    a = np.zeros(mask.shape + (4,), np.uint8)
    a[mask] = LAYER_RGBA
    return Image.fromarray(a, "RGBA")


def main() -> None:
    index = []
    for stem, offset, prompt in SCENES:
        image, mask, _, _, _ = scenes.make_edit_case(scenes.HELDOUT_SEED_START + offset)
        Image.fromarray(image).save(HERE / f"{stem}.png")
        layer(mask).save(HERE / f"{stem}-mask.png")
        index.append({"name": prompt + " (shapes)", "image": f"{stem}.png", "mask": f"{stem}-mask.png",
                      "prompt": prompt, "model": "demo"})
    stem, path, box, prompt = PHOTO
    m = Image.new("L", Image.open(path).size, 0)
    ImageDraw.Draw(m).ellipse(box, fill=255)
    layer(np.asarray(m) > 0).save(HERE / f"{stem}-mask.png")
    index.append({"name": prompt + " (photo)", "image": "../photos/coffee.png", "mask": f"{stem}-mask.png",
                  "prompt": prompt, "model": "any"})
    (HERE / "examples.json").write_text(json.dumps(index, indent=2) + "\n")
    print(f"wrote {len(index)} examples to {HERE}")


if __name__ == "__main__":
    main()
