"""The blending loop of Blended Latent Diffusion (paper Alg. 1), a plain function over callables."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .errors import EditCancelled

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (latents, t) -> noise_pred (guided)
Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (noise_pred, t, latents) -> latents
AddNoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (clean, noise, t) -> noised

STARTS = ("source", "noise")  # the first latents: z_init noised to the first timestep, or pure noise
BACKGROUND_TIMESTEPS = ("next", "own")  # the background's timestep after step i: t_{i+1} (ours) or t_i (paper's code)


def pure_noise(add_noise: AddNoise, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`noise` scaled to the spread of a noised unit-variance image at `t`, in the scheduler's own space
    (1 for DDIM-like schedulers, sqrt(sigma^2 + 1) for Euler-like ones): what text-to-image starts from."""
    one, zero = torch.ones_like(noise[:1]), torch.zeros_like(noise[:1])
    scale = (add_noise(one, zero, t) ** 2 + add_noise(zero, one, t) ** 2).sqrt()
    return noise * scale


def blend_loop(
    denoise: Denoise,
    step: Step,
    add_noise: AddNoise,
    source: torch.Tensor,
    noise: torch.Tensor,
    masks: Sequence[torch.Tensor],
    timesteps: torch.Tensor,
    *,
    start: str = "source",
    fresh_noise: Optional[Callable[[int], torch.Tensor]] = None,
    background_timestep: str = "next",
    on_step: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
    should_stop: Optional[Callable[[], bool]] = None,
) -> torch.Tensor:
    """Denoise inside the mask while keeping the source outside it.

    Args:
        denoise: the guided model, `(latents, t) -> noise_pred`.
        step: one scheduler step, `(noise_pred, t, latents) -> latents` at the previous timestep.
        add_noise: the forward process `q(z_t | z_0)`, `(clean, noise, t) -> noised`, correct for any `t`
            (a scheduler instance that has taken no step, see `editor.schedule`).
        source: `z_init`, the encoded source image, (1 or B, C, h, w).
        noise: (B, C, h, w) Gaussian noise, one sample per candidate: the start, and the background's
            noise at every step unless `fresh_noise` is given (with a deterministic scheduler the
            background then follows the source's own trajectory).
        masks: one (1, 1, h, w) latent mask per timestep, 1 = edit (`masks.mask_schedule`).
        timesteps: the timesteps actually run (those after `blend_start`).
        start: "source" starts from `source` noised to the first timestep (ours); "noise" from pure
            noise (the paper's code).
        fresh_noise: `i -> (B, C, h, w)` noise for the background after step i (the paper's code draws
            it fresh at every step); None reuses `noise`.
        background_timestep: after the step from t_i to t_{i+1}, the background is the source noised to
            "next" = t_{i+1}, the latents' own level, and the clean source after the last step (ours);
            or to "own" = t_i, one step noisier, as in the paper's code.
        on_step: called with (index, t, latents) after each blended step.
        should_stop: polled before each step; True raises `EditCancelled`.

    Returns:
        (B, C, h, w) latents; outside the last mask they equal `source` exactly ("next") or the source
        noised to the last timestep ("own").
    """
    if start not in STARTS:
        raise ValueError(f"start must be one of {', '.join(STARTS)}")
    if background_timestep not in BACKGROUND_TIMESTEPS:
        raise ValueError(f"background_timestep must be one of {', '.join(BACKGROUND_TIMESTEPS)}")
    source = source.expand_as(noise)
    # 1. the start: the source noised to the first timestep used, or pure noise at that level
    latents = add_noise(source, noise, timesteps[:1]) if start == "source" else pure_noise(add_noise, noise, timesteps[:1])
    for i, t in enumerate(timesteps):
        if should_stop is not None and should_stop():
            raise EditCancelled("the edit was stopped")
        # 2. one denoising step of the whole latent image
        latents = step(denoise(latents, t), t, latents)
        # 3. the background: the source noised to the next timestep (clean after the last step) or to t itself
        eps = noise if fresh_noise is None else fresh_noise(i)
        if background_timestep == "own":
            background = add_noise(source, eps, timesteps[i : i + 1])
        else:
            background = add_noise(source, eps, timesteps[i + 1 : i + 2]) if i + 1 < len(timesteps) else source
        # 4. blend
        latents = masks[i] * latents + (1 - masks[i]) * background
        if on_step is not None:
            on_step(i, t, latents)
    return latents
