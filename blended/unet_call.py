"""The one place the UNet is called: every model-specific input of a denoising evaluation lives here.

`encode_prompt` turns a prompt into a `Conditioning` (SDXL adds its pooled embeddings and size ids);
`make_denoise` returns the `(latents, t) -> noise_pred` callable that `sampler.blend_loop` takes, with
classifier-free guidance. Inputs that other kinds of checkpoints need are fields of `Conditioning`:
a few-step (LCM-distilled) UNet's `timestep_cond`, a 9-channel inpainting UNet's extra channels, LoRA
`cross_attention_kwargs`; adding one is a field here and a line in `denoise`, nothing in `Editor._edit`.
`time_unet_call` times one such evaluation (the app's speed banner).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .sampler import Denoise


@dataclass(frozen=True)
class Conditioning:
    """What the UNet reads besides latents and t, for one candidate (`repeat` makes a chunk's).

    With guidance every tensor holds the negative (unconditional) rows first, then the prompt's.
    """

    encoder_hidden_states: torch.Tensor  # (G, L, D); G = 2 when guided, else 1
    guided: bool = False  # rows hold the negative prompt's conditions first (classifier-free guidance)
    added_cond_kwargs: Optional[dict[str, torch.Tensor]] = None  # SDXL: text_embeds (G, P), time_ids (G, 6)
    timestep_cond: Optional[torch.Tensor] = None  # LCM-distilled UNets (`time_cond_proj_dim`): (G, D_cond)
    extra_channels: Optional[torch.Tensor] = None  # 9-channel inpainting UNets: (G, 1 + C, h, w) mask, masked source latents
    cross_attention_kwargs: Optional[dict[str, Any]] = None  # e.g. {"scale": w} for LoRAs

    def repeat(self, batch: int) -> "Conditioning":
        """Each row repeated `batch` times (negatives first, then prompts), the layout of `cat([x, x])`."""
        def rep(t):
            return None if t is None else t.repeat_interleave(batch, 0)

        return dataclasses.replace(
            self, encoder_hidden_states=rep(self.encoder_hidden_states), timestep_cond=rep(self.timestep_cond),
            extra_channels=rep(self.extra_channels),
            added_cond_kwargs=None if self.added_cond_kwargs is None else
            {k: rep(v) for k, v in self.added_cond_kwargs.items()})


def guidance_embedding(guidance_scale: float, dim: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(batch, dim) sinusoidal embedding of `guidance_scale - 1` (VDM), the `timestep_cond` of an LCM-distilled UNet.

    The scale - 1 convention is diffusers' LatentConsistencyModelPipeline's: the UNet was distilled from a
    teacher guided by `uncond + (w + 1) * (text - uncond)` and reads w.
    """
    w = torch.full((batch,), (guidance_scale - 1.0) * 1000.0, dtype=torch.float32)
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb.to(dtype)


# A model's tokenizer is shared by every edit in the process, and a fast (Rust) tokenizer is not safe to call from two
# threads: each call first sets padding and truncation on the shared backend, so a concurrent call can encode with the
# other's settings (transformers issue 47085). Seen in bench/load.py with two edits at once: a negative prompt padded
# to "longest" (2 tokens) beside a prompt padded to the maximum length. Every use of the model's tokenizers holds it.
TOKENIZER_LOCK = threading.RLock()


def encode_prompt(model: Any, prompt: str, negative_prompt: str, guided: bool, size: tuple[int, int]) -> Conditioning:
    """Text embeddings of `prompt` (negative first when `guided`) and SDXL's added conditions for a (W, H) `size`;
    one encoding at a time in the process (`TOKENIZER_LOCK`)."""
    with TOKENIZER_LOCK:
        return _encode_prompt(model, prompt, negative_prompt, guided, size)


def _encode_prompt(model: Any, prompt: str, negative_prompt: str, guided: bool, size: tuple[int, int]) -> Conditioning:
    pipe, dev = model.pipe, model.device
    if model.is_sdxl:
        emb, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=prompt, device=dev, num_images_per_prompt=1, do_classifier_free_guidance=guided,
            negative_prompt=negative_prompt)
        w, h = size
        time_ids = pipe._get_add_time_ids((h, w), (0, 0), (h, w), dtype=emb.dtype,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        if guided:
            emb, pooled, time_ids = torch.cat([neg, emb]), torch.cat([neg_pooled, pooled]), time_ids.repeat(2, 1)
        return Conditioning(emb, guided, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.to(dev)})
    emb, neg = pipe.encode_prompt(prompt, dev, 1, guided, negative_prompt)
    return Conditioning(torch.cat([neg, emb]) if guided else emb, guided)


def inpaint_conditioning(model: Any, cond: Conditioning, encode: Any, x_source: torch.Tensor, pixel_mask: Any,
                         latent_mask: torch.Tensor, config: Any) -> Conditioning:
    """`cond` with a 9-channel inpainting UNet's extra input; unchanged for other UNets.

    The extra channels are the latent mask (1 = edit) and the latents of the source with the masked pixels
    blanked by `config.inpainting_mask_weight` (A1111's: lerp(source, masked source, w); 1 shows the UNet the
    hole, 0 the whole source); `inpainting_conditioning=False` gives zeros (the UNet as text-to-image).

    Args:
        encode: (1, 3, H, W) in [-1, 1] -> scaled latents (1, C, h, w).
        x_source: (1, 3, H, W) source at work size; pixel_mask: (H, W) bool, True = edit.
        latent_mask: (1, 1, h, w) edit strengths of the blend.
    """
    if not model.is_inpainting:
        return cond
    m = (latent_mask > 0).to(x_source.device, model.dtype)  # (1, 1, h, w)
    if config.inpainting_conditioning:
        hole = torch.as_tensor(pixel_mask, dtype=x_source.dtype, device=x_source.device)[None, None]  # (1, 1, H, W)
        z = encode(x_source * (1 - config.inpainting_mask_weight * hole))  # (1, C, h, w)
        extra = torch.cat([m, z.to(m.dtype)], 1)
    else:
        extra = torch.zeros(1, 1 + model.latent_channels, *m.shape[-2:], device=m.device, dtype=m.dtype)
    rows = cond.encoder_hidden_states.shape[0]  # G: the negative rows get the same image conditions
    return dataclasses.replace(cond, extra_channels=extra.repeat(rows, 1, 1, 1))


def is_guided(unet: Any, guidance_scale: float) -> bool:
    """True when a step evaluates the UNet twice (classifier-free guidance): a scale above 1 on a UNet without
    a guidance embedding. An LCM-distilled UNet reads the scale as `timestep_cond` and runs once."""
    return guidance_scale > 1.0 and getattr(unet.config, "time_cond_proj_dim", None) is None


def conditions(model: Any, prompt: str, negative_prompt: str, guidance_scale: float,
               size: tuple[int, int]) -> Conditioning:
    """`encode_prompt` with the guidance each UNet takes: classifier-free (`is_guided`), or, for a UNet with
    `time_cond_proj_dim`, the embedding of `guidance_scale` as its `timestep_cond` (no negative prompt)."""
    unet = model.pipe.unet
    cond = encode_prompt(model, prompt, negative_prompt, is_guided(unet, guidance_scale), size)
    dim = getattr(unet.config, "time_cond_proj_dim", None)
    if dim is None:
        return cond
    emb = guidance_embedding(guidance_scale, dim, cond.encoder_hidden_states.shape[0])
    return dataclasses.replace(cond, timestep_cond=emb.to(model.device, cond.encoder_hidden_states.dtype))


def make_denoise(unet: Any, scheduler: Any, cond: Conditioning, guidance_scale: float) -> Denoise:
    """`(latents (B, C, h, w), t) -> noise_pred (B, C, h, w)`, guided by `guidance_scale` when `cond.guided`.

    `cond` must already be repeated for the batch (`Conditioning.repeat(B)`).
    """
    guided = cond.guided

    def denoise(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = torch.cat([latents, latents]) if guided else latents  # (G*B, C, h, w)
        x = scheduler.scale_model_input(x, t)
        if cond.extra_channels is not None:  # inpainting UNets: latents, then mask and masked source
            x = torch.cat([x, cond.extra_channels.to(x.dtype)], dim=1)
        noise_pred = unet(x, t, encoder_hidden_states=cond.encoder_hidden_states,
                          timestep_cond=cond.timestep_cond, added_cond_kwargs=cond.added_cond_kwargs,
                          cross_attention_kwargs=cond.cross_attention_kwargs, return_dict=False)[0]
        if guided:
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + guidance_scale * (text - uncond)
        return noise_pred

    return denoise


@torch.no_grad()
def time_unet_call(model: Any, guided: bool = True) -> float:
    """Seconds of one denoising evaluation at the model's native size for one candidate, timed once: the UNet
    called through `make_denoise` with the conditions an edit builds (an empty prompt; `guided`: the negative
    row and the prompt's, a batch of 2), an LCM-distilled UNet's `timestep_cond` and an inpainting UNet's
    extra channels included. The prompt is encoded before the clock starts."""
    from .schedulers import make_scheduler

    unet, side = model.pipe.unet, model.pipe.unet.config.sample_size
    cond = encode_prompt(model, "", "", guided, (model.native_size, model.native_size))
    rows, dtype = cond.encoder_hidden_states.shape[0], cond.encoder_hidden_states.dtype
    dim = getattr(unet.config, "time_cond_proj_dim", None)
    if dim is not None:
        cond = dataclasses.replace(cond, timestep_cond=guidance_embedding(1.0, dim, rows).to(model.device, dtype))
    if model.is_inpainting:  # the mask and masked source's latents (zeros: their values do not change the time)
        extra = torch.zeros(rows, 1 + model.latent_channels, side, side, device=model.device, dtype=model.dtype)
        cond = dataclasses.replace(cond, extra_channels=extra)
    scheduler = make_scheduler(model.pipe, "ddim")
    scheduler.set_timesteps(2, device=model.device)
    denoise = make_denoise(unet, scheduler, cond, guidance_scale=2.0)
    latents = torch.randn(1, model.latent_channels, side, side, device=model.device, dtype=model.dtype)  # (1, C, h, w)
    start = time.perf_counter()
    denoise(latents, scheduler.timesteps[0])
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start
