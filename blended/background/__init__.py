"""Background reconstruction (paper §4.2): the VAE is lossy, so what lies outside the mask comes back
changed after decoding (faces, text, texture). Five remedies, from free to per-edit training:

    none     the decoded candidates as they are
    stitch   source pixels outside the mask, the candidate inside, a feathered seam just outside the mask
    poisson  gradient-domain cloning of the masked region into the source (OpenCV `seamlessClone`)
    latent   optimise the latents so that the frozen decoder gives the source outside, the candidate inside
    decoder  fine-tune a per-edit copy of the decoder to do the same, then decode the candidates' latents
             (one copy for all the candidates of the edit by default: their outside latents are the same)

`latent` and `decoder` work on a window of the latents: the mask's box plus a margin of latent
pixels. Only the window goes through the decoder's up blocks (the front, with its attention, runs on
the whole latents; GroupNorm statistics are pinned to the whole image's), so it decodes as the whole
image would. The decoded window is pasted over the source, its outer half fading into it: outside the
window the source is kept exactly. A margin that covers the image gives the paper's whole-image version.
By default the result then keeps the candidate deep inside the mask (`keep_inside`) and the source
beyond a seam band of `feather` pixels outside it (`exact_outside`): the optimised decode only makes
the transition.

The package: `registry` (the methods by name, `reconstruct`), `compositing` (stitch, poisson, the paste and the
final composite), `window` (the window and the strips around the seam band), `decoder` (the staged decoder with
pinned GroupNorm statistics), `fitting` (the one Adam loop), `latent` and `finetune` (the two methods that use it).
"""

from __future__ import annotations

from .compositing import feather_weights, inner_weights, keep_source_and_candidate, paste, poisson, shown, stitch
from .decoder import (CPU_ACTIVATION_BYTES, CUDA_FREE_SHARE, DecodeStats, LatentDecoder, PinnedGroupNorm,
                      activation_bytes, needs_checkpointing)
from .finetune import decoder_settings, finetune_decoder
from .fitting import MIN_IMPROVEMENT, Progress, ShouldStop, _set_lr, fit, lr_factor
from .latent import latent_settings, optimize_latents
from .registry import PRESERVE_METHOD, METHODS, BackgroundMethod, get_method, reconstruct
from .window import (STRIP_CELL, STRIPS_WORTH, Strip, Window, band_strips, latent_window, receptive_context,
                     window_margin)

__all__ = [
    # the registry and the one way through it
    "BackgroundMethod", "METHODS", "PRESERVE_METHOD", "get_method", "reconstruct",
    # compositing
    "feather_weights", "inner_weights", "keep_source_and_candidate", "paste", "poisson", "shown", "stitch",
    # the window
    "STRIP_CELL", "STRIPS_WORTH", "Strip", "Window", "band_strips", "latent_window", "receptive_context",
    "window_margin",
    # the decoder
    "CPU_ACTIVATION_BYTES", "CUDA_FREE_SHARE", "DecodeStats", "LatentDecoder", "PinnedGroupNorm", "activation_bytes",
    "needs_checkpointing",
    # the fitting loop and the two methods that use it
    "MIN_IMPROVEMENT", "Progress", "ShouldStop", "fit", "lr_factor", "latent_settings", "optimize_latents",
    "decoder_settings", "finetune_decoder",
]
