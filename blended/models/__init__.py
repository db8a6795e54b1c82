"""Load Stable Diffusion 1.x / 2.x / SDXL: presets, hub ids, diffusers folders, single `.safetensors` files,
with an optional VAE of one's own and LoRAs; one file per way in (like diffusers' own loaders/):

  pretrained.py    diffusers folders and hub ids; a preset's sources in turn (loaded.PRESET_SOURCES)
  single_file.py   original-layout single files, offline with the bundled configs (configs/<family>/)
  detect.py        what a file holds, from its header (modelspec metadata, family, 4- or 9-channel UNet),
                   pickles refused
  vae.py           --vae FOLDER|FILE
  lora.py          --lora FILE[:WEIGHT], applied at load time (peft)
  catalog.py       the models and LoRAs in a folder (the app's picker)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..errors import ModelLoadError
from .detect import PICKLE_SUFFIXES, read_header
from .loaded import (ASSETS, DEFAULT_MODEL, PRESET_SOURCES, PRESETS, RECOMMENDED_FILE, LoadedModel, pick_device,
                     preset_sources, resolve)
from .lora import LoraSpec, apply_loras, parse_lora

PREDICTION_TYPES = ("epsilon", "v_prediction")

__all__ = ["ASSETS", "DEFAULT_MODEL", "PRESETS", "PRESET_SOURCES", "PREDICTION_TYPES", "LoadedModel", "LoraSpec",
           "load_model", "parse_lora", "pick_device", "preset_sources", "resolve"]


def _text_to_image(pipe: Any, model: str) -> Any:
    """The family's text-to-image pipeline around the same modules (inpainting pipelines share them)."""
    from diffusers import (StableDiffusionInpaintPipeline, StableDiffusionPipeline, StableDiffusionXLInpaintPipeline,
                           StableDiffusionXLPipeline)

    if isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
        return pipe
    if isinstance(pipe, StableDiffusionXLInpaintPipeline):
        return StableDiffusionXLPipeline.from_pipe(pipe)
    if isinstance(pipe, StableDiffusionInpaintPipeline):
        return StableDiffusionPipeline.from_pipe(pipe)
    raise ModelLoadError(f"model '{model}' is a {type(pipe).__name__}; blended edits with Stable Diffusion "
                         "1.x/2.x/SDXL checkpoints")


def _load_pipe(model: str, dt: torch.dtype, local_files_only: Optional[bool], model_config: Optional[str],
               own_vae: Any) -> tuple[Any, str, Optional[str]]:
    """(text-to-image pipeline, the source it came from, the prediction type a single file's modelspec states)."""
    from .pretrained import load_preset, load_pretrained
    from .single_file import load_single_file

    path = Path(resolve(model)).expanduser()
    if model in PRESET_SOURCES and model not in ("demo", "demo-fast"):
        return (*load_preset(model, preset_sources(model), dtype=dt, local_files_only=local_files_only,
                             check=lambda pipe, source: _text_to_image(pipe, model)), None)
    if path.suffix.lower() in (".safetensors",) + PICKLE_SUFFIXES or path.is_file():
        pipe, info = load_single_file(path, dtype=dt, config=model_config,
                                      components=None if own_vae is None else {"vae": own_vae})
        return pipe, str(path), info.prediction_type
    source = resolve(model)
    pipe = load_pretrained(model, source, dtype=dt, local_files_only=local_files_only)
    return _text_to_image(pipe, model), source, None


def load_model(model: str = DEFAULT_MODEL, *, device: Optional[str] = None, dtype: Optional[str] = None,
               local_files_only: Optional[bool] = None, vae: Optional[str] = None,
               loras: Sequence[LoraSpec | str] = (), prediction_type: Optional[str] = None,
               model_config: Optional[str] = None) -> LoadedModel:
    """Load a Stable Diffusion 1.x, 2.x or SDXL checkpoint, text-to-image (4-channel) or inpainting (9-channel).

    Args:
        model: a preset (`sd15`, `sd21`, `sdxl`, `demo`, ...: the first of its `PRESET_SOURCES` that loads), a
            hub id (`org/name`), a local diffusers folder, or a single `.safetensors` checkpoint in the original
            layout (loaded offline with bundled configs).
            Pickle files (`.ckpt`, `.pt`, `.bin`, `.pth`) are refused: they can run code.
        device: `cuda`, `cuda:1`, `mps`, `cpu`; default: the best available.
        dtype: `fp16`, `bf16`, `fp32`; default: fp16 on accelerators, fp32 on the CPU.
        local_files_only: do not try the network (default: only when HF_HUB_OFFLINE is set).
        vae: a diffusers VAE folder or a `.safetensors` VAE file replacing the checkpoint's own.
        loras: `LoraSpec`s or 'FILE[:WEIGHT]' strings, applied in order (diffusers or kohya format).
        prediction_type: `epsilon` or `v_prediction`, overriding the scheduler's and what a single file's
            modelspec metadata states (most files say nothing: then the family's default).
        model_config: a diffusers folder of configs for a single file whose family's bundled configs do not
            fit (other sizes); default: the bundled ones.

    Raises:
        ModelLoadError: one line naming the model (or VAE, LoRA) and why it failed.
    """
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ModelLoadError(f"prediction type '{prediction_type}': use {' or '.join(PREDICTION_TYPES)}")
    dev, dt = pick_device(device, dtype)
    loras = [parse_lora(l) if isinstance(l, str) else l for l in loras]
    for spec in loras:  # cheap checks before the model's load: a missing, pickled or broken LoRA fails at once
        read_header(Path(spec.path).expanduser(), "LoRA")
    if vae is not None and not Path(vae).expanduser().is_dir():
        read_header(Path(vae).expanduser(), "VAE")
    own_vae = None  # a VAE folder is loaded first, so that a checkpoint file without a VAE can take it
    if vae is not None and Path(vae).expanduser().is_dir():
        from .vae import load_vae

        own_vae = load_vae(vae, None, dt)
    pipe, source, stated = _load_pipe(model, dt, local_files_only, model_config, own_vae)
    prediction_type = prediction_type or stated  # --prediction-type wins over what the file's modelspec says
    path = Path(source).expanduser()
    latent, in_channels = pipe.vae.config.latent_channels, pipe.unet.config.in_channels
    if in_channels not in (latent, 2 * latent + 1):
        raise ModelLoadError(f"model '{model}' has a {in_channels}-channel UNet; blended runs text-to-image "
                             f"({latent}) and inpainting ({2 * latent + 1}) UNets")
    if prediction_type is not None:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction_type)
    if vae is not None:
        from .vae import load_vae

        pipe.vae = own_vae if own_vae is not None else load_vae(vae, pipe, dt)
        if pipe.vae.config.latent_channels != latent:
            raise ModelLoadError(f"VAE {vae} has {pipe.vae.config.latent_channels} latent channels; the model's "
                                 f"UNet takes {latent}")
    applied = apply_loras(pipe, loras)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(dev)
    if dt == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
        pipe.vae.to(torch.float32)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False).eval()
    recommended: dict = {}
    if path.is_dir() and (path / RECOMMENDED_FILE).is_file():
        recommended = json.loads((path / RECOMMENDED_FILE).read_text())
    return LoadedModel(pipe=pipe, name=model, source=source, device=dev, dtype=dt, recommended=recommended,
                       loras=applied, vae=None if vae is None else str(Path(vae).expanduser()))
