"""The model picker: the bundled presets here, the models and LoRAs in `BLENDED_MODELS_DIR`, loaded with progress.

The server runs one model for everyone. `ModelSlot` is the editor the other panels use; a load builds a whole
new Editor (model, LoRAs, ranker) beside the current one and swaps it in only once it is ready, so a model or
LoRA that fails to load leaves the current one serving, and an edit that is running finishes on the model it
started with (LoRAs are never added to a model in use: docs/models.md).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Optional, Sequence

import gradio as gr
import torch

from blended import Editor
from blended.errors import InputError, ModelLoadError
from blended.models import LoraSpec
from blended.models.catalog import local_presets, scan

DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class ModelSlot:
    """The Editor in use, swappable; attribute access goes to it (`slot.edit(...)`, `slot.model`, ...)."""

    def __init__(self, editor: Editor):
        self.current = editor
        self.loading = threading.Lock()  # one load at a time (two would need memory for three models)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["current"], name)


def describe(editor: Any) -> str:
    """'name' plus its LoRAs and VAE, for the status line."""
    m = editor.model
    extras = [f"LoRA {Path(l.path).name} x {l.weight:g}" for l in m.loras] + ([f"VAE {Path(m.vae).name}"] if m.vae else [])
    return f"`{Path(m.name).name if Path(m.name).exists() else m.name}`" + (f" ({', '.join(extras)})" if extras else "")


def load_into(slot: ModelSlot, model: str, loras: Sequence[str] = (), weight: float = 1.0,
              progress: Optional[Any] = None) -> str:
    """Load `model` with `loras` (each at `weight`) on the current device and swap it in; return the status line.
    On failure the current model stays and the line says why."""
    report = progress or (lambda *a, **k: None)
    if not model:
        return f"Pick a model. In use: {describe(slot)}"
    with slot.loading:
        report(0.05, desc=f"loading {Path(model).name}")
        m = slot.model
        try:
            new = Editor.load(model, device=str(m.device), dtype=DTYPES.get(m.dtype), ranker="auto",
                              max_pixels=slot.max_pixels, loras=[LoraSpec(p, float(weight)) for p in loras or ()])
        except (ModelLoadError, InputError) as e:
            return f"**Could not load it:** {e}. Still using {describe(slot)}."
        report(0.95, desc="swapping in")
        slot.current = new
    return f"In use: {describe(slot)}"


def models_panel(slot: ModelSlot, models_dir: Optional[str] = None) -> dict[str, gr.components.Component]:
    """The Model accordion (inside a Blocks): model and LoRA pickers, a Load button and a status line."""
    models, loras = scan(models_dir)
    choices = local_presets() + models
    current = slot.model.name
    if current not in [v for _, v in choices]:
        choices = [(Path(current).name if Path(current).exists() else current, current)] + choices
    w: dict[str, gr.components.Component] = {}
    with gr.Accordion("Model", open=False, elem_id="models"):
        w["model"] = gr.Dropdown(choices, value=current, label="Model", elem_id="model-picker",
                                 info="The bundled presets and the models in BLENDED_MODELS_DIR (diffusers folders, "
                                      ".safetensors checkpoints). One model serves everyone using this server.")
        w["loras"] = gr.Dropdown(loras, value=[], multiselect=True, label="LoRAs", elem_id="lora-picker",
                                 visible=bool(loras), info="From BLENDED_MODELS_DIR and its loras/ folder.")
        w["lora_weight"] = gr.Slider(-2.0, 2.0, value=1.0, step=0.05, label="LoRA weight (each)",
                                     visible=bool(loras), elem_id="lora-weight")
        w["load"] = gr.Button("Load", size="sm", elem_id="load-model")
        w["status"] = gr.Markdown(f"In use: {describe(slot)}", elem_id="model-status")

    def on_load(model: str, chosen: list, weight: float, progress=gr.Progress()) -> str:
        return load_into(slot, model, chosen, weight, progress)

    w["load"].click(on_load, [w["model"], w["loras"], w["lora_weight"]], w["status"], concurrency_limit=1,
                    concurrency_id="model-load", api_name=False)
    return w
