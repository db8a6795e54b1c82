"""The `latent` method (paper §4.2): optimise the window's latents so that the frozen decoder gives the source
outside the mask and the candidate inside."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..config import EditConfig
from . import fitting
from .compositing import paste
from .decoder import LatentDecoder, device_of, needs_checkpointing
from .fitting import Progress, ShouldStop, StopEach, window_loss, window_targets
from .window import latent_window, window_margin


def latent_settings(config: EditConfig, factor: int) -> dict[str, Any]:
    """`optimize_latents` arguments from an edit's settings (`factor`: pixels per latent)."""
    return dict(steps=config.latent_steps, lr=config.latent_lr, lam=config.decoder_lambda,
                margin=window_margin(config, factor), patience=config.decoder_patience, batch_size=config.batch_size)


def optimize_latents(vae: nn.Module, latents: torch.Tensor, decoded: torch.Tensor, source: torch.Tensor,
                     mask: torch.Tensor, *, steps: int = 100, lr: float = 0.05, lam: float = 100.0, margin: int = 4,
                     patience: int = 10, batch_size: int = 4, checkpointing: Optional[bool] = None,
                     stats: Optional[dict[str, torch.Tensor]] = None, progress: Optional[Progress] = None,
                     should_stop: Optional[ShouldStop] = None) -> torch.Tensor:
    """Background reconstruction by latent optimisation (paper §4.2): Adam on the window's latents,
    starting from the candidates', so that the frozen decoder (an fp32 copy) reproduces the candidate
    inside the mask and the source outside it. Shapes as in `reconstruct`; `checkpointing` and `stats` as in
    `finetune_decoder`; returns (B, 3, H, W) in [-1, 1]."""
    from torch.func import functional_call

    dev = device_of(vae)
    latent_size = tuple(latents.shape[-2:])
    decoded, source, mask = decoded.float().to(dev), source.float().to(dev), mask.float().to(dev)
    window = latent_window(mask, latent_size, margin)
    base = LatentDecoder(vae)
    B = latents.shape[0]
    rows = min(batch_size, B)  # decoded together in each step
    base.checkpointing = needs_checkpointing(base, window, dev, rows) if checkpointing is None else checkpointing
    cand, src, w_in, w_out = window_targets(window, decoded, source, mask, lam)
    latents = latents.float().to(dev)
    groups = [list(range(i, min(i + batch_size, B))) for i in range(0, B, batch_size)]
    total, outs = steps * len(groups), []
    sl = (..., slice(window.top, window.bottom), slice(window.left, window.right))
    for g, idx in enumerate(groups):
        pinned = base.statistics(latents[idx], stats, idx)
        z = latents[idx][sl].clone().requires_grad_(True)  # (G, C, window)

        def decode(z):
            whole = latents[idx].clone()
            whole[sl] = z  # the window's latents in the whole latents: the front sees everything
            return functional_call(base, pinned, (whole, 0, None, window))

        stopper = StopEach(len(idx), patience, lambda i: z[i].detach().clone())
        fitting.fit([z], lambda step: window_loss(decode(z), cand[idx], src, w_in, w_out), stopper, steps=steps,
                    lr=lr, progress=progress, should_stop=should_stop, done=g * steps, total=total)
        with torch.no_grad():
            for i, zi in stopper.kept.items():  # candidates that stopped early keep their latents of then
                z[i] = zi
            outs.append(decode(z))
    if progress is not None:
        progress(total, total)
    return paste(window, torch.cat(outs), source, latent_size)
