"""The background methods by name, each with what it needs (STYLE 13), and `reconstruct`: the one way an edit runs
one of them. A method is found in `METHODS`; an unknown name is refused there (`get_method`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..config import EditConfig
from ..errors import InputError
from .compositing import keep_source_and_candidate, poisson, shown, stitch
from .finetune import decoder_settings, finetune_decoder
from .fitting import Progress, ShouldStop
from .latent import latent_settings, optimize_latents


@dataclass(frozen=True)
class BackgroundMethod:
    """A background method: how it runs and what the edit around it must know about it. `run` is called by
    `reconstruct` with its keyword arguments (vae, latents, decoded, source, mask, config, composite, stats,
    progress, should_stop; decoded and source as floats, the mask as {0, 1}) and returns (B, 3, H, W) in [-1, 1]."""

    name: str
    run: Callable[..., torch.Tensor]  # the method itself
    help: str  # one line for docs and the UI
    needs_stats: bool = False  # wants the decoder's GroupNorm statistics recorded during the edit's own decode
    memory_fallback: bool = False  # out of memory -> the edit goes on with the plain composite and a note
    keeps_outside: bool = True  # False only for "none" (the paper's raw decode; no exact composite)
    steps_setting: Optional[str] = None  # the EditConfig field counting its optimisation steps (servers cap it)


def _none(*, decoded: torch.Tensor, **_) -> torch.Tensor:
    return decoded


def _stitch(*, decoded: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, config: EditConfig,
            composite: bool, **_) -> torch.Tensor:
    return stitch(decoded, source, mask, config.feather) if composite else decoded


def _poisson(*, decoded: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, **_) -> torch.Tensor:
    return poisson(decoded, source, mask)


def _latent(*, vae: nn.Module, latents: torch.Tensor, decoded: torch.Tensor, source: torch.Tensor,
            mask: torch.Tensor, config: EditConfig, composite: bool, stats, progress, should_stop) -> torch.Tensor:
    factor = decoded.shape[-1] // latents.shape[-1]
    out = optimize_latents(vae, latents, decoded, source, mask, **latent_settings(config, factor),
                           stats=stats, progress=progress, should_stop=should_stop)
    return keep_source_and_candidate(out, decoded, source, mask, config, composite)


def _decoder(*, vae: nn.Module, latents: torch.Tensor, decoded: torch.Tensor, source: torch.Tensor,
             mask: torch.Tensor, config: EditConfig, composite: bool, stats, progress, should_stop) -> torch.Tensor:
    factor = decoded.shape[-1] // latents.shape[-1]
    focus = shown(mask, config) if config.decoder_loss == "band" else None
    out = finetune_decoder(vae, latents, decoded, source, mask, **decoder_settings(config, factor),
                           focus=focus, stats=stats, progress=progress, should_stop=should_stop)
    return keep_source_and_candidate(out, decoded, source, mask, config, composite)


METHODS: dict[str, BackgroundMethod] = {m.name: m for m in (  # in the order of blended.config.BACKGROUND_METHODS
    BackgroundMethod("none", _none, "the decoded candidates as they are (the paper's raw decode)",
                     keeps_outside=False),
    BackgroundMethod("stitch", _stitch, "source pixels outside the mask, the candidate inside, a feathered seam "
                     "just outside the mask"),
    BackgroundMethod("poisson", _poisson, "gradient-domain cloning of the masked region into the source "
                     "(OpenCV seamlessClone)"),
    BackgroundMethod("latent", _latent, "optimise the latents so that the frozen decoder gives the source outside, "
                     "the candidate inside", needs_stats=True, memory_fallback=True, steps_setting="latent_steps"),
    BackgroundMethod("decoder", _decoder, "fine-tune a per-edit copy of the decoder to give the source outside, "
                     "the candidate inside", needs_stats=True, memory_fallback=True, steps_setting="decoder_steps"),
)}
PRESERVE_METHOD = "decoder"  # what the app's "Preserve faces and text" checkbox stands for


def get_method(name: str) -> BackgroundMethod:
    """The background method called `name`; an unknown name raises `InputError` naming the known ones."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise InputError(f"unknown background method '{name}': use one of {', '.join(METHODS)}") from None


def reconstruct(method: str, *, vae: nn.Module, latents: torch.Tensor, decoded: torch.Tensor, source: torch.Tensor,
                mask: torch.Tensor, config: EditConfig, progress: Optional[Progress] = None,
                should_stop: Optional[ShouldStop] = None, composite: bool = True,
                stats: Optional[dict[str, torch.Tensor]] = None) -> torch.Tensor:
    """Make the candidates keep the source outside the mask (paper §4.2), by the method called `method`.

    Args:
        method: a name in `METHODS` (`blended.config.BACKGROUND_METHODS`); another raises `InputError`.
        vae: the model's VAE; `latent` and `decoder` read its decoder (never change it), the others ignore it.
        latents: (B, C, h, w) final scaled latents of the candidates.
        decoded: (B, 3, H, W) in [-1, 1], the candidates decoded from `latents`.
        source: (1, 3, H, W) in [-1, 1], the source image at work size.
        mask: (1, 1, H, W) in {0, 1}, 1 = edited region.
        config: the edit's settings (`feather`, `decoder_*`, `latent_*`).
        progress: called with (done, total) optimisation steps.
        should_stop: polled before every optimisation step; True raises `EditCancelled`.
        composite: finish with the source beyond the seam band (`stitch`; `exact_outside` for `latent` and
            `decoder`). False leaves that last step to the caller, who does it at the upload's own
            resolution (`blended.images.composite`, as `Editor.edit` does): `stitch` then returns the
            candidates as they are.
        stats: `latent` and `decoder` (`needs_stats`): the decoder's GroupNorm statistics recorded while `decoded`
            was made (`DecodeStats`); None = they are recorded here, with one more decode of each candidate.

    Returns:
        (B, 3, H, W) float images in [-1, 1].
    """
    chosen = get_method(method)
    _check_shapes(latents, decoded, source, mask)
    decoded, source, mask = decoded.float(), source.float(), (mask.float() > 0.5).float()
    if chosen.keeps_outside and mask.sum() == 0:  # nothing edited: the source itself
        return source.expand_as(decoded).clone()
    if chosen.keeps_outside and mask.min() == 1:  # everything edited: no background to keep
        return decoded
    return chosen.run(vae=vae, latents=latents, decoded=decoded, source=source, mask=mask, config=config,
                      composite=composite, stats=stats, progress=progress, should_stop=should_stop)


def _check_shapes(latents: torch.Tensor, decoded: torch.Tensor, source: torch.Tensor, mask: torch.Tensor) -> None:
    """Shapes as `reconstruct` documents them; a ValueError (a caller's bug, not the user's) otherwise."""
    B, _, H, W = decoded.shape
    if latents.dim() != 4 or latents.shape[0] != B:
        raise ValueError(f"latents {tuple(latents.shape)} do not match decoded {tuple(decoded.shape)}")
    if source.shape != (1, 3, H, W) or mask.shape != (1, 1, H, W):
        raise ValueError(f"source {tuple(source.shape)} and mask {tuple(mask.shape)} must be (1, 3, {H}, {W}) "
                         f"and (1, 1, {H}, {W})")
    if H % latents.shape[2] or W % latents.shape[3] or H // latents.shape[2] != W // latents.shape[3]:
        raise ValueError(f"latents {tuple(latents.shape)} do not tile images of {H}x{W}")
