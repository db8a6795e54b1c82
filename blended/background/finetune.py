"""The `decoder` method (paper §4.2): fine-tune a per-edit copy of the decoder so that it decodes the candidates'
latents to the source outside the mask and to the candidates inside, then decode them with it."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..config import EditConfig
from . import fitting
from .compositing import paste
from .decoder import LatentDecoder, decode_each, device_of, needs_checkpointing
from .fitting import Progress, ShouldStop, StopEach, StopShared, window_loss, window_targets
from .window import Window, band_strips, latent_window, receptive_context, window_margin


def decoder_settings(config: EditConfig, factor: int) -> dict[str, Any]:
    """`finetune_decoder` arguments from an edit's settings (`factor`: pixels per latent)."""
    return dict(steps=config.decoder_steps, lr=config.decoder_lr, lam=config.decoder_lambda,
                margin=window_margin(config, factor, band=config.decoder_loss == "band"),
                patience=config.decoder_patience, batch_size=config.batch_size, blocks=config.decoder_blocks,
                share=config.decoder_shared, schedule=config.decoder_schedule)


def finetune_decoder(vae: nn.Module, latents: torch.Tensor, decoded: torch.Tensor, source: torch.Tensor,
                     mask: torch.Tensor, *, steps: int = 75, lr: float = 1e-4, lam: float = 100.0, margin: int = 4,
                     patience: int = 10, batch_size: int = 4, blocks: int = 0, share: bool = True,
                     schedule: str = "constant", focus: Optional[torch.Tensor] = None, vectorize: Optional[bool] = None,
                     checkpointing: Optional[bool] = None,
                     stats: Optional[dict[str, torch.Tensor]] = None, progress: Optional[Progress] = None,
                     should_stop: Optional[ShouldStop] = None) -> torch.Tensor:
    """Background reconstruction by per-edit decoder fine-tuning (paper §4.2): an fp32 copy of the decoder,
    trained with Adam so that it decodes the candidates' latents to the candidates inside the mask and to the
    source outside, then decodes them. The shared VAE is never modified.

    Args:
        steps: Adam steps of each copy (with `share`, of the one copy).
        schedule: the learning rate over the steps (`lr_factor`): "constant" (the paper) or a decay from `lr`.
        focus: (1, 1, H, W) 1 where the loss counts (`shown`: the pixels the result takes from the decode);
            None = the whole window (the paper).
        share: one copy for the whole edit, trained on the candidates in turn (one per step on the CPU, up to
            `batch_size` per step on CUDA): the outside latents are the same `z_init` in every candidate, so
            one copy learns the source's background once instead of once per candidate. False: a copy per
            candidate, the paper's per-image fine-tuning applied to each.
        vectorize: without `share`, train up to `batch_size` copies at once with `torch.func.vmap` (one Adam
            over stacked weights: per-element, so the same as separate runs); default on CUDA only.
        checkpointing: recompute the decoder's activations in the backward pass (each resnet of the up blocks,
            the mid block, the output layers) instead of keeping them: the same gradients, a fraction of the
            memory, some more time (docs/benchmarks.md). Default: when memory asks for it (`needs_checkpointing`:
            free CUDA memory, a size rule on the CPU). Not with vectorised copies.
        stats: the pinned GroupNorm statistics of the candidates, recorded while the edit decoded them
            (`DecodeStats`); None = one more whole-image decode per candidate records them here.
        Others as in `reconstruct`.

    Returns:
        (B, 3, H, W) in [-1, 1].
    """
    dev = device_of(vae)
    latent_size = tuple(latents.shape[-2:])
    decoded, source, mask = decoded.float().to(dev), source.float().to(dev), mask.float().to(dev)
    window = latent_window(mask, latent_size, margin)
    base = LatentDecoder(vae)  # fp32 copy; functional_call swaps in each candidate's weights
    base.checkpointing = needs_checkpointing(base, window, dev) if checkpointing is None else checkpointing
    start = 0 if blocks <= 0 else max(base.num_stages - 1 - blocks, 0)  # first trained stage
    tuned = {id(p) for m in base.stage_modules(start) for p in m.parameters()}
    focus = focus.float().to(dev) if focus is not None else None
    targets = window_targets(window, decoded, source, mask, lam, focus)
    latents = latents.float().to(dev)
    common = dict(steps=steps, lr=lr, patience=patience, schedule=schedule, stats=stats, progress=progress,
                  should_stop=should_stop)
    if share:
        # several candidates per step on CUDA, one on the CPU and for large windows (memory: docs/benchmarks.md)
        per_step = min(batch_size, latents.shape[0]) if dev.type == "cuda" and not base.checkpointing else 1
        out = _finetune_shared(base, start, tuned, latents, targets, window, per_step=per_step,
                               batch_size=batch_size, **common)
    else:
        if vectorize is None:
            vectorize = dev.type == "cuda"
        base.checkpointing = base.checkpointing and not vectorize
        out = _finetune_copies(base, start, tuned, latents, targets, window, size=batch_size if vectorize else 1,
                               **common)
    return paste(window, out, source, latent_size)


def _finetune_copies(base: LatentDecoder, start: int, tuned: set[int], latents: torch.Tensor, targets: tuple,
                     window: Window, *, size: int, steps: int, lr: float, patience: int, schedule: str,
                     stats: Optional[dict[str, torch.Tensor]], progress: Optional[Progress],
                     should_stop: Optional[ShouldStop]) -> torch.Tensor:
    """A copy of the trained stages per candidate (the paper's per-image fine-tuning), `size` of them trained at
    once (vmap); returns the candidates' decoded windows (B, 3, hp, wp). Each copy stops early on its own."""
    from torch.func import functional_call

    cand, src, w_in, w_out = targets
    B = latents.shape[0]
    groups = [list(range(i, min(i + size, B))) for i in range(0, B, size)]
    total, outs = steps * len(groups), []
    for g, idx in enumerate(groups):
        pinned = base.statistics(latents[idx], stats, idx)  # {name: (G, groups)}
        x = latents[idx]
        if start > 0:  # the frozen stages, once: the front on the whole latents, the rest on the window
            with torch.no_grad():
                x = functional_call(base, pinned, (x, 0, start, window))
        pinned = {k: v[:, None] for k, v in pinned.items()}  # (G, 1, groups): one row per copy
        # one copy of the trained weights per candidate, stacked along a new first dimension
        params = {k: v.detach()[None].repeat(len(idx), *[1] * v.dim()).requires_grad_(True)
                  for k, v in base.named_parameters() if id(v) in tuned}

        def losses(step: int) -> torch.Tensor:  # (G,)
            out = decode_each(base, {**params, **pinned}, x, start, window)  # (G, 3, hp, wp)
            return window_loss(out, cand[idx], src, w_in, w_out)

        stopper = StopEach(len(idx), patience, lambda i: {k: v[i].detach().clone() for k, v in params.items()})
        fitting.fit(list(params.values()), losses, stopper, steps=steps, lr=lr, schedule=schedule, progress=progress,
                    should_stop=should_stop, done=g * steps, total=total)
        with torch.no_grad():
            for i, weights in stopper.kept.items():  # copies that stopped early keep their weights of then
                for k, v in weights.items():
                    params[k][i] = v
            outs.append(decode_each(base, {**params, **pinned}, x, start, window))
        del params, stopper
    if progress is not None:
        progress(total, total)
    return torch.cat(outs).float()


def _finetune_shared(base: LatentDecoder, start: int, tuned: set[int], latents: torch.Tensor, targets: tuple,
                     window: Window, *, steps: int, lr: float, patience: int, per_step: int, batch_size: int,
                     schedule: str, stats: Optional[dict[str, torch.Tensor]], progress: Optional[Progress],
                     should_stop: Optional[ShouldStop]) -> torch.Tensor:
    """One per-edit copy of the trained stages, fitted to all candidates in turn; returns their decoded
    windows (B, 3, hp, wp). Early stopping watches the mean of each candidate's latest loss."""
    from torch.func import functional_call

    cand, src, w_in, w_out = targets
    B = latents.shape[0]
    chunks = [list(range(i, min(i + batch_size, B))) for i in range(0, B, batch_size)]
    pinned, fronts = [], []
    for idx in chunks:  # per-candidate GroupNorm statistics; the frozen stages, once
        s = base.statistics(latents[idx], stats, idx)
        pinned.append(s)
        with torch.no_grad():
            fronts.append(functional_call(base, s, (latents[idx], 0, start, window)) if start > 0 else latents[idx])
    stats = {k: torch.cat([s[k] for s in pinned]) for k in pinned[0]}  # {name: (B, groups)}
    x = torch.cat(fronts)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in base.named_parameters() if id(v) in tuned}
    strips = None
    if start > 0 and tuple(x.shape[-2:]) == tuple(cand.shape[-2:]):  # the trained stages at the output's resolution
        context = receptive_context(base.stage_modules(start))
        if context is not None:
            strips = band_strips(((w_in + w_out)[0, 0] > 0).cpu().numpy(), context)

    def decode(idx: list[int], rows: slice = slice(None), cols: slice = slice(None)) -> torch.Tensor:
        """The shared weights, candidates idx's own statistics; the trained stages' input cut to rows, cols."""
        return functional_call(base, {**params, **{k: v[idx] for k, v in stats.items()}},
                               (x[idx][..., rows, cols], start, None, window))

    def losses(idx: list[int]) -> torch.Tensor:  # (len(idx),)
        if strips is None:
            return window_loss(decode(idx), cand[idx], src, w_in, w_out)
        # only the strips around the band that the loss sees, each output pixel once: the same sum as the whole
        # window's (the window's pixels without loss weight are all that is left out), divided by the same size
        total = 0.0
        for st in strips:
            out = decode(idx, st.rows, st.cols)[..., st.keep_rows, st.keep_cols]
            at = (..., st.out_rows, st.out_cols)
            total = total + window_loss(out, cand[idx][at], src[at], w_in[at], w_out[at]) * out[0].numel()
        return total / cand[0].numel()

    def order(step: int) -> list[int]:  # the candidates in turn
        return [(step * per_step + j) % B for j in range(per_step)]

    fitting.fit(list(params.values()), lambda step: losses(order(step)), StopShared(B, patience, order), steps=steps,
                lr=lr, schedule=schedule, average=True, progress=progress, should_stop=should_stop)
    with torch.no_grad():
        outs = [decode(idx) for idx in chunks]
    if progress is not None:
        progress(steps, steps)
    return torch.cat(outs).float()
