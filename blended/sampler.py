"""The blending loop of Blended Latent Diffusion (paper Alg. 1), a plain function over callables."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .errors import EditCancelled

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (latents, t) -> noise_pred (guided)
Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (noise_pred, t, latents) -> latents
AddNoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (clean, noise, t) -> noised


def blend_loop(
    denoise: Denoise,
    step: Step,
    add_noise: AddNoise,
    source: torch.Tensor,
    noise: torch.Tensor,
    masks: Sequence[torch.Tensor],
    timesteps: torch.Tensor,
    *,
    on_step: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
    should_stop: Optional[Callable[[], bool]] = None,
) -> torch.Tensor:
    """Denoise inside the mask while keeping the source outside it.

    Args:
        denoise: the guided model, `(latents, t) -> noise_pred`.
        step: one scheduler step, `(noise_pred, t, latents) -> latents` at the previous timestep.
        add_noise: the forward process `q(z_t | z_0)`, `(clean, noise, t) -> noised`.
        source: `z_init`, the encoded source image, (1 or B, C, h, w).
        noise: (B, C, h, w) Gaussian noise, one sample per candidate; reused at every timestep, so
            with a deterministic scheduler the background follows the source's own trajectory.
        masks: one (1, 1, h, w) latent mask per timestep, 1 = edit (the shrinking schedule).
        timesteps: the timesteps actually run (those after `blend_start`).
        on_step: called with (index, t, latents) after each blended step.
        should_stop: polled before each step; True raises `EditCancelled`.

    Returns:
        (B, C, h, w) latents; outside the last mask they equal `source` exactly.
    """
    source = source.expand_as(noise)
    # 1. start from the source noised to the first timestep used
    latents = add_noise(source, noise, timesteps[:1])
    for i, t in enumerate(timesteps):
        if should_stop is not None and should_stop():
            raise EditCancelled("the edit was stopped")
        # 2. one denoising step of the whole latent image
        latents = step(denoise(latents, t), t, latents)
        # 3. the background: the source noised to the next timestep, the clean source after the last step
        background = add_noise(source, noise, timesteps[i + 1 : i + 2]) if i + 1 < len(timesteps) else source
        # 4. blend
        latents = masks[i] * latents + (1 - masks[i]) * background
        if on_step is not None:
            on_step(i, t, latents)
    return latents
