"""Settings from a result: drop a PNG this app (or the CLI, or A1111) saved, and the prompt, the negative prompt and
the Settings widgets take what it records (`blended.pnginfo.read_recipe`). A file that cannot be read changes
nothing and says why in one line. Every PNG the app writes carries those parameters (`ui.editing.OutputDir`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import gradio as gr

from blended import InputError
from blended.pnginfo import Recipe, read_recipe

from .limits import Limits

CAPPED = {"num_candidates": "max_candidates", "num_inference_steps": "max_steps"}  # setting -> its Limits field


def build_recipe_drop() -> gr.File:
    """The file control (call inside the Blocks' column)."""
    return gr.File(label="Settings from a result: drop a PNG made here (or by A1111) to fill the prompt and Settings",
                   file_types=[".png"], type="filepath", height=120, elem_id="settings-from-result")


def recipe_values(recipe: Recipe, names: list[str], limits: Limits) -> tuple[dict[str, Any], list[str]]:
    """({widget name: value} for the Settings widgets `names` that the recipe sets, notes): a seed turns
    *randomize* off (the recipe's seed is used), the background sets the "preserve" checkbox, and values over this
    server's limits are brought to them, said in a note."""
    from blended.background import PRESERVE_METHOD

    values: dict[str, Any] = {}
    notes: list[str] = []
    for name, value in recipe.settings.items():
        limit = getattr(limits, CAPPED[name]) if name in CAPPED else None
        if limit is not None and value > limit:
            notes.append(f"{name} {value} lowered to {limit}, this server's limit")
            value = limit
        if name in names:
            values[name] = value
    if "seed" in values and "randomize_seed" in names:
        values["randomize_seed"] = False
    if "background" in values and "preserve_background" in names:
        values["preserve_background"] = values["background"] == PRESERVE_METHOD
    if "decode" in recipe.settings and "fast_decode" in names:
        values["fast_decode"] = recipe.settings["decode"] != "full"
    left = sorted(set(recipe.settings) - set(values) - {"negative_prompt", "decode"})
    if left:
        notes.append(f"no widget here for {', '.join(left)} (the model's defaults apply)")
    return values, notes


def follow_recipe(drop: gr.File, prompt: gr.Textbox, settings: dict[str, gr.components.Component],
                  limits: Limits) -> None:
    """The drop's handler: fills `prompt` and the `settings` widgets (`negative_prompt` among them) or, for a file
    it cannot read, shows one line and changes nothing."""
    names = [n for n in settings if n != "negative_prompt"]
    outputs = [prompt, settings["negative_prompt"], *(settings[n] for n in names), drop]

    def on_drop(path: Optional[str]) -> list:
        keep = [gr.skip()] * (len(outputs) - 1)
        if not path:
            return keep + [gr.skip()]
        try:
            recipe = read_recipe(path)
        except InputError as e:
            gr.Warning(f"{Path(path).name}: {e}", title="No settings read")
            return keep + [None]
        values, notes = recipe_values(recipe, names, limits)
        notes = notes + list(recipe.notes)
        if recipe.model:
            notes.insert(0, f"made with the model {recipe.model} (pick it under Model to use it)")
        gr.Info(f"Filled the prompt and {len(values)} setting(s) from {Path(path).name}"
                + (f"; {'; '.join(notes)}." if notes else "."), title="Settings from a result")
        return [recipe.prompt, recipe.negative_prompt, *(values.get(n, gr.skip()) for n in names), None]

    drop.upload(on_drop, inputs=drop, outputs=outputs, api_visibility="private")
