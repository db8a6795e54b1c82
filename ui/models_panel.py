"""The model picker: each visitor picks the model of their own session (issue 28).

The server's models live in a bounded cache (`blended.models.cache.ModelCache`, `BLENDED_MAX_MODELS`, least
recently used dropped first, never one an edit is using); a session holds only the *key* of its model in a
`gr.State`. Load puts a model into the cache (one load at a time) and makes it this session's: its edits, its
Settings' defaults and its previews follow it, and no other session notices. A session whose model was dropped
meanwhile gets it loaded again by its next edit. On a shared server (a Space, `app.py --shared` or `--share`) the
picker offers only the presets, the server's own model and what the owner put in `BLENDED_MODELS_DIR`; anything
else is refused with one line. LoRAs follow the same rule and are part of a loaded model (its cache key).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import gradio as gr
import torch

from blended import Editor
from blended.errors import InputError, ModelLoadError
from blended.models.cache import DEFAULT_MAX_MODELS, Lease, ModelCache, ModelKey
from blended.models.catalog import local_presets, scan

DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def is_shared(flag: Optional[bool] = None) -> bool:
    """True on a Hugging Face Space (`SPACE_ID` set) or when the owner says so (`app.py --shared`/`--share`)."""
    return bool(flag) or bool(os.environ.get("SPACE_ID"))


class ServerModels:
    """The server's model (the default), what a visitor may pick, and the loaded models (`cache`).

    Args:
        editor: the server's loaded model; the cache starts with it and loads others on its device and dtype.
        key: its `ModelKey` (default: read off it; app.py adds its --prediction-type).
        models_dir: the owner's folder of models and LoRAs (`BLENDED_MODELS_DIR`).
        shared: only the listed models and LoRAs may be loaded (a Space, `--shared`).
        max_models: the cache's bound (`Limits.max_models`: `BLENDED_MAX_MODELS`, default 2).
    """

    def __init__(self, editor: Any, key: Optional[ModelKey] = None, models_dir: Optional[str] = None,
                 shared: bool = False, max_models: Optional[int] = None):
        self.default_key = key or ModelKey.of(editor.model)
        self.shared = shared
        m = editor.model
        self.device, self.dtype, self.max_pixels = str(m.device), DTYPES.get(m.dtype), editor.max_pixels
        self.cache = ModelCache(self._load, max_models or DEFAULT_MAX_MODELS)
        self.cache.put(self.default_key, editor)
        models, loras = scan(models_dir)
        default = self.default_key.model
        self.choices = local_presets() + models  # (label, value)
        if default not in [v for _, v in self.choices]:
            self.choices = [(Path(default).name if Path(default).exists() else default, default)] + self.choices
        self.loras = loras + [(Path(p).name, p) for p, _ in self.default_key.loras if p not in [v for _, v in loras]]

    def _load(self, key: ModelKey) -> Editor:
        return Editor.load(key.model, device=self.device, dtype=self.dtype, ranker="auto", max_pixels=self.max_pixels,
                           **key.load_options())

    def key_for(self, model: str, loras: Sequence[str] = (), weight: float = 1.0) -> ModelKey:
        """The key of `model` with `loras` at `weight`; the server's model keeps its VAE and prediction type.
        InputError (one line) for an empty choice, and on a shared server for one that is not listed."""
        model = (model or "").strip()
        if not model:
            raise InputError("pick a model")
        loras = [str(l) for l in loras or ()]
        if self.shared:
            if model not in [v for _, v in self.choices]:
                raise InputError(f"'{model}' is not offered here: this shared server loads only the models in its list")
            unlisted = [l for l in loras if l not in [v for _, v in self.loras]]
            if unlisted:
                raise InputError(f"LoRA '{unlisted[0]}' is not offered here: this shared server loads only the LoRAs "
                                 "in its list")
        default = self.default_key
        same = model == default.model
        return ModelKey(model, tuple((l, float(weight)) for l in loras), default.vae if same else None,
                        default.prediction_type if same else None)

    def acquire(self, key: Optional[ModelKey], progress: Optional[Any] = None) -> Lease:
        """A lease on a session's model (loaded again if the cache dropped it); one line when it cannot load."""
        def loading(k: ModelKey) -> None:
            if progress is not None:
                progress(0.0, desc=f"loading {k.label()}")

        try:
            return self.cache.acquire(key or self.default_key, on_load=loading)
        except ModelLoadError as e:
            raise gr.Error(f"This session's model could not be loaded: {e}", title="Cannot edit") from None

    def status(self, key: ModelKey) -> str:
        """The status line: this session's model and how many the server keeps loaded."""
        return (f"In use in this session: `{key.label()}`. The server keeps {self.cache.max_models} "
                f"model{'s' if self.cache.max_models != 1 else ''} loaded for all sessions (the least recently used "
                "is dropped; a dropped one loads again at your next edit).")


@dataclass
class ModelPanel:
    """The Model accordion's components; `key` is the session's model (a `ModelKey`)."""

    model: gr.Dropdown
    loras: gr.Dropdown
    lora_weight: gr.Slider
    load: gr.Button
    status: gr.Markdown
    key: gr.State
    server: ServerModels

    def acquire(self, key: Optional[ModelKey], progress: Optional[Any] = None) -> Lease:
        """A lease on the session's model `key` (the value of `self.key`): `ServerModels.acquire`."""
        return self.server.acquire(key, progress)


def models_panel(server: ServerModels) -> ModelPanel:
    """The Model accordion (inside a Blocks): model and LoRA pickers, a Load button and a status line."""
    key = server.default_key
    where = ("The bundled presets, this server's model and the models its owner put in BLENDED_MODELS_DIR."
             if server.shared else "The bundled presets and the models in BLENDED_MODELS_DIR; or type a hub id, a "
             "folder or a .safetensors file.")
    with gr.Accordion("Model", open=False, elem_id="models"):
        model = gr.Dropdown(server.choices, value=key.model, label="Model (for this session)", elem_id="model-picker",
                            allow_custom_value=not server.shared,
                            info=where + " Your choice changes the model of your edits only.")
        chosen = [p for p, _ in key.loras if p in [v for _, v in server.loras]]
        loras = gr.Dropdown(server.loras, value=chosen, multiselect=True, label="LoRAs", elem_id="lora-picker",
                            visible=bool(server.loras), info="From BLENDED_MODELS_DIR and its loras/ folder.")
        weight = gr.Slider(-2.0, 2.0, value=key.loras[0][1] if key.loras else 1.0, step=0.05,
                           label="LoRA weight (each)", visible=bool(server.loras), elem_id="lora-weight")
        load = gr.Button("Load", size="sm", elem_id="load-model")
        status = gr.Markdown(server.status(key), elem_id="model-status")
    return ModelPanel(model, loras, weight, load, status, gr.State(key), server)


def load_for_session(server: ServerModels, model: str, loras: Sequence[str] = (), weight: float = 1.0,
                     progress: Optional[Any] = None) -> tuple[Optional[ModelKey], str]:
    """(the session's new key, the status line), or (None, why not) when the choice is refused or fails to load.
    The model is loaded into the server's cache; nothing changes for any other session."""
    try:
        key = server.key_for(model, loras, weight)
    except InputError as e:
        return None, f"**Not loaded:** {e}."
    if progress is not None:
        progress(0.05, desc=f"loading {key.label()}")
    try:
        server.cache.get(key)
    except (ModelLoadError, InputError) as e:  # InputError: a malformed LoRA weight
        return None, f"**Could not load it:** {e}."
    return key, server.status(key)


def follow_models(demo: gr.Blocks, panel: ModelPanel, server: ServerModels,
                  settings: dict[str, gr.components.Component], limits: Any) -> None:
    """Load makes the chosen model this session's and sets the Settings to its defaults; a refused or failed load
    changes nothing but the status line (and puts the picker back on the session's model). When the page opens
    on a deep link whose picker names another model, the session takes that model."""
    from .settings_panel import MODEL_SETTINGS, model_settings

    names = [n for n in MODEL_SETTINGS if n in settings]

    def on_load(model: str, chosen: list, weight: float, current: ModelKey, progress=gr.Progress()) -> list:
        key, line = load_for_session(server, model, chosen, weight, progress)
        if key is None:
            current = current or server.default_key
            return [gr.skip(), f"{line} {server.status(current)}", current.model] + [gr.skip()] * len(names)
        return [key, line, gr.skip()] + model_settings(server.cache.get(key), names, limits)

    panel.load.click(on_load, [panel.model, panel.loras, panel.lora_weight, panel.key],
                     [panel.key, panel.status, panel.model, *(settings[n] for n in names)],
                     concurrency_limit=1, concurrency_id="model-load", api_visibility="private")

    def on_open(model: str, chosen: list, weight: float) -> list:
        try:
            wanted = server.key_for(model, chosen, weight)
        except InputError:
            wanted = None
        if wanted == server.default_key:  # an ordinary visit
            return [gr.skip()] * 3
        key, line = load_for_session(server, model, chosen, weight)
        if key is None:
            return [gr.skip(), f"{line} {server.status(server.default_key)}", server.default_key.model]
        return [key, line, gr.skip()]

    demo.load(on_open, [panel.model, panel.loras, panel.lora_weight], [panel.key, panel.status, panel.model],
              concurrency_limit=None, api_visibility="private")  # the cache loads one model at a time
