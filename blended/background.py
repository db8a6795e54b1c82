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
"""

from __future__ import annotations

import copy
import math
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from .config import BACKGROUND_METHODS, DECODER_SCHEDULES, EditConfig
from .errors import EditCancelled, InputError
from .images import seam_weights

Progress = Callable[[int, int], None]  # (done, total) optimisation steps
ShouldStop = Callable[[], bool]

CPU_ACTIVATION_BYTES = 2 * 2**30  # on the CPU, `latent`/`decoder` recompute activations in backward above this estimate
CUDA_FREE_SHARE = 0.5  # on CUDA, above this share of the free device memory
STRIPS_WORTH = 0.85  # `decoder_loss="band"`: train on strips around the band when they hold < this share of the window
STRIP_CELL = 4  # pixels per cell of the grid on which the strips' hole is found
MIN_IMPROVEMENT = 0.1  # early stopping: a candidate is done when `patience` steps lowered its loss by less than this


def reconstruct(method: str, *, editor: Any, latents: torch.Tensor, decoded: torch.Tensor, source: torch.Tensor,
                mask: torch.Tensor, config: EditConfig, progress: Optional[Progress] = None,
                should_stop: Optional[ShouldStop] = None, composite: bool = True,
                stats: Optional[dict[str, torch.Tensor]] = None) -> torch.Tensor:
    """Make the candidates keep the source outside the mask.

    Args:
        method: one of `BACKGROUND_METHODS`.
        editor: the `Editor`; its `model.pipe.vae` is read (never changed) by `latent` and `decoder`.
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
        stats: `latent` and `decoder`: the decoder's GroupNorm statistics recorded while `decoded` was made
            (`DecodeStats`); None = they are recorded here, with one more decode of each candidate.

    Returns:
        (B, 3, H, W) float images in [-1, 1].
    """
    if method not in BACKGROUND_METHODS:
        raise InputError(f"unknown background method '{method}': use one of {', '.join(BACKGROUND_METHODS)}")
    _check_shapes(latents, decoded, source, mask)
    decoded, source, mask = decoded.float(), source.float(), (mask.float() > 0.5).float()
    if method == "none":
        return decoded
    if mask.sum() == 0:  # nothing edited: the source itself
        return source.expand_as(decoded).clone()
    if mask.min() == 1:  # everything edited: no background to keep
        return decoded
    if method == "stitch":
        return stitch(decoded, source, mask, config.feather) if composite else decoded
    if method == "poisson":
        return poisson(decoded, source, mask)
    vae = editor.model.pipe.vae
    factor = decoded.shape[-1] // latents.shape[-1]
    if method == "latent":
        out = optimize_latents(vae, latents, decoded, source, mask, **latent_settings(config, factor),
                               stats=stats, progress=progress, should_stop=should_stop)
    else:
        focus = shown(mask, config) if config.decoder_loss == "band" else None
        out = finetune_decoder(vae, latents, decoded, source, mask, **decoder_settings(config, factor),
                               focus=focus, stats=stats, progress=progress, should_stop=should_stop)
    if config.keep_inside:  # the optimised decode supplies the outside and the border; inside, the candidate
        w = inner_weights(mask, max(1, config.feather // 2))
        out = w * decoded + (1 - w) * out
    if config.exact_outside and composite:  # ... and only the seam band outside: beyond `feather` px, the source exactly
        v = feather_weights(mask, config.feather)
        out = v * out + (1 - v) * source
    return out


def shown(mask: torch.Tensor, config: EditConfig) -> torch.Tensor:
    """(1, 1, H, W) 1 where the result shows the optimised decode, 0 where it does not: with `keep_inside` not
    from `feather / 2` px inside the mask on (the candidate itself), with `exact_outside` not beyond the seam band
    (the source itself). `decoder_loss="band"` fits the decoder there only."""
    use = torch.ones_like(mask)
    if config.keep_inside:
        use = use * (inner_weights(mask, max(1, config.feather // 2)) < 1)
    if config.exact_outside:
        use = use * (feather_weights(mask, config.feather) > 0)
    return use


def window_margin(config: EditConfig, factor: int, band: bool = False) -> int:
    """Latent pixels decoded around the mask's box: `decoder_margin`, or when 0 (auto) enough for the seam band
    and as much again for the window's fade (at least 2): 2 latents at SD's x8 with an 8 px band, 4 at x4.
    Without `exact_outside` the whole window is used, and auto is 4. `band` (`decoder` with `decoder_loss="band"`):
    the fit and the result see only the seam band, so the window is just the band (at least 1 latent: 1 at SD's
    x8, 2 at x4), its fade within the band's outer half, where the band already fades into the source."""
    if config.decoder_margin > 0:
        return config.decoder_margin
    if not config.exact_outside:
        return 4
    if band:
        return max(1, -(-config.feather // factor))
    return max(2, -(-2 * config.feather // factor))


def latent_settings(config: EditConfig, factor: int) -> dict[str, Any]:
    """`optimize_latents` arguments from an edit's settings (`factor`: pixels per latent)."""
    return dict(steps=config.latent_steps, lr=config.latent_lr, lam=config.decoder_lambda,
                margin=window_margin(config, factor), patience=config.decoder_patience, batch_size=config.batch_size)


def decoder_settings(config: EditConfig, factor: int) -> dict[str, Any]:
    """`finetune_decoder` arguments from an edit's settings (`factor`: pixels per latent)."""
    return dict(steps=config.decoder_steps, lr=config.decoder_lr, lam=config.decoder_lambda,
                margin=window_margin(config, factor, band=config.decoder_loss == "band"),
                patience=config.decoder_patience, batch_size=config.batch_size, blocks=config.decoder_blocks,
                share=config.decoder_shared, schedule=config.decoder_schedule)


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """The learning rate of Adam step `step` (0-based) of `steps`, as a share of the peak: 1 throughout for
    "constant" (the paper); "linear" and "cosine" fall from 1 at the first step towards 0 after the last, so the
    last steps refine instead of jumping around the minimum at the full rate (docs/fewstep.md measures it)."""
    if schedule == "constant":
        return 1.0
    done = step / max(steps, 1)
    if schedule == "linear":
        return 1.0 - done
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * done))
    raise ValueError(f"unknown decoder_schedule '{schedule}': use one of {', '.join(DECODER_SCHEDULES)}")


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def inner_weights(mask: torch.Tensor, width: int) -> torch.Tensor:
    """(1, 1, H, W) weights of the candidate for `keep_inside`: 0 outside the mask and on its border,
    rising linearly to 1 at `width` pixels inside it (Euclidean distance)."""
    import cv2

    inside = (mask[0, 0] > 0.5).cpu().numpy().astype(np.uint8)
    dist = cv2.distanceTransform(inside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)  # 0 outside, >= 1 inside
    w = np.clip((dist - 1.0) / width, 0.0, 1.0).astype(np.float32)
    return torch.from_numpy(w)[None, None].to(mask.device)


def _check_shapes(latents: torch.Tensor, decoded: torch.Tensor, source: torch.Tensor, mask: torch.Tensor) -> None:
    B, _, H, W = decoded.shape
    if latents.dim() != 4 or latents.shape[0] != B:
        raise ValueError(f"latents {tuple(latents.shape)} do not match decoded {tuple(decoded.shape)}")
    if source.shape != (1, 3, H, W) or mask.shape != (1, 1, H, W):
        raise ValueError(f"source {tuple(source.shape)} and mask {tuple(mask.shape)} must be (1, 3, {H}, {W}) "
                         f"and (1, 1, {H}, {W})")
    if H % latents.shape[2] or W % latents.shape[3] or H // latents.shape[2] != W // latents.shape[3]:
        raise ValueError(f"latents {tuple(latents.shape)} do not tile images of {H}x{W}")


# -- stitch ----------------------------------------------------------------------------------------

def feather_weights(mask: torch.Tensor, feather: int) -> torch.Tensor:
    """(1, 1, H, W) weights of the candidate: 1 inside the mask, falling linearly to 0 over `feather` pixels
    outside it (Euclidean distance), 0 beyond (`blended.images.seam_weights`)."""
    w = seam_weights((mask[0, 0] > 0.5).cpu().numpy(), feather)
    return torch.from_numpy(w)[None, None].to(mask.device)


def stitch(decoded: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, feather: int) -> torch.Tensor:
    """Candidate inside the mask, source outside the mask and its `feather`-pixel seam (pixel-exact there)."""
    w = feather_weights(mask, feather)
    return w * decoded + (1 - w) * source


# -- poisson ---------------------------------------------------------------------------------------

def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def poisson(decoded: torch.Tensor, source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Gradient-domain blending (Pérez et al. 2003) of each candidate's masked region into the source.

    OpenCV's `seamlessClone` (NORMAL_CLONE) keeps the outermost image row/column as a fixed boundary,
    so a mask touching the image border would fade the edit into the source there. Image and mask are
    therefore mirrored past the border first: the border behaves like a free (Neumann) edge.
    """
    import cv2

    _, _, H, W = decoded.shape
    m = (mask[0, 0] > 0.5).cpu().numpy().astype(np.uint8) * 255
    touches = bool(m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())
    pad = max(1, min(H, W) // 2) if touches else 0
    dst = _to_uint8(source[0])
    if pad:
        m = cv2.copyMakeBorder(m, pad, pad, pad, pad, cv2.BORDER_REFLECT)
        dst = cv2.copyMakeBorder(dst, pad, pad, pad, pad, cv2.BORDER_REFLECT)
    x, y, w, h = cv2.boundingRect(m)
    center = (x + w // 2, y + h // 2)  # seamlessClone centres the mask's box here: same place as in the source
    out = []
    for cand in decoded:
        src = _to_uint8(cand)
        if pad:
            src = cv2.copyMakeBorder(src, pad, pad, pad, pad, cv2.BORDER_REFLECT)
        blended = cv2.seamlessClone(src, dst, m.copy(), center, cv2.NORMAL_CLONE)  # it writes into its mask
        blended = blended[pad:pad + H, pad:pad + W]
        out.append(torch.from_numpy(blended.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1))
    cloned = torch.stack(out).to(decoded.device)
    return mask * cloned + (1 - mask) * source  # the source outside, exactly


# -- the window that `latent` and `decoder` optimise ------------------------------------------------

@dataclass(frozen=True)
class Window:
    """Latent rows top:bottom and columns left:right (the mask's box plus a margin) and the pixels under them."""

    top: int
    left: int
    bottom: int
    right: int
    factor: int  # pixels per latent along one side
    fade: int  # pixels over which the decoded window fades into the source at sides inside the image

    def latents(self, z: torch.Tensor) -> torch.Tensor:
        return z[..., self.top:self.bottom, self.left:self.right]

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        f = self.factor
        return x[..., self.top * f:self.bottom * f, self.left * f:self.right * f]

    def weights(self, latent_size: tuple[int, int], device: torch.device) -> torch.Tensor:
        """(1, 1, hp, wp) paste weights: 1 inside, ramping to 0 at window sides that are not image borders."""
        f, (h, w) = self.factor, latent_size
        hp, wp = (self.bottom - self.top) * f, (self.right - self.left) * f
        ys = torch.arange(hp, device=device, dtype=torch.float32)[:, None] + 0.5
        xs = torch.arange(wp, device=device, dtype=torch.float32)[None, :] + 0.5
        far = torch.tensor(float("inf"), device=device)
        d = torch.minimum(
            torch.minimum(ys if self.top > 0 else far, (hp - ys) if self.bottom < h else far),
            torch.minimum(xs if self.left > 0 else far, (wp - xs) if self.right < w else far))
        return (d / self.fade).clamp(0, 1)[None, None] if self.fade > 0 else torch.ones(1, 1, hp, wp, device=device)


def latent_window(mask: torch.Tensor, latent_size: tuple[int, int], margin: int) -> Window:
    """The mask's box in latent pixels grown by `margin` on each side (clipped to the image); the outer
    half of the margin is the fade."""
    h, w = latent_size
    f = mask.shape[-1] // w
    rows = torch.nonzero(mask[0, 0].amax(dim=1) > 0.5).flatten()
    cols = torch.nonzero(mask[0, 0].amax(dim=0) > 0.5).flatten()
    top, bottom = int(rows[0]) // f, -(-(int(rows[-1]) + 1) // f)
    left, right = int(cols[0]) // f, -(-(int(cols[-1]) + 1) // f)
    return Window(top=max(top - margin, 0), left=max(left - margin, 0), bottom=min(bottom + margin, h),
                  right=min(right + margin, w), factor=f, fade=margin * f // 2)


def paste(window: Window, inner: torch.Tensor, source: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """The source with the decoded window (B, 3, hp, wp) pasted in, fading into the source at its sides."""
    out = source.expand(inner.shape[0], -1, -1, -1).clone()
    weights = window.weights(latent_size, inner.device)
    under = window.pixels(out)
    under.copy_(weights * inner + (1 - weights) * under)
    return out


# -- latent optimisation and decoder fine-tuning -----------------------------------------------------

@dataclass(frozen=True)
class Strip:
    """A crop of the window that the trained stages run on: input rows/cols, the valid part of its output
    (`keep_*`, relative to the crop) and where that part lies in the window (`out_*`)."""

    rows: slice
    cols: slice
    keep_rows: slice
    keep_cols: slice
    out_rows: slice
    out_cols: slice


def receptive_context(modules: list[nn.Module]) -> Optional[int]:
    """Pixels each side that an output pixel of `modules` (run in turn, at one resolution) can see: the sum of
    their convolutions' reach (an upper bound). None when one of them mixes the whole image (attention)."""
    reach = 0
    for module in modules:
        for sub in module.modules():
            if "attention" in type(sub).__name__.lower():
                return None
            if isinstance(sub, nn.Conv2d):
                reach += max(d * (k - 1) // 2 for d, k in zip(sub.dilation, sub.kernel_size))
    return reach


def _largest_empty_rectangle(used: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the largest axis-aligned rectangle of False in the (h, w) bool `used`
    (the classic histogram-and-stack method, one pass over the rows)."""
    h, w = used.shape
    heights = np.zeros(w + 1, dtype=np.int64)  # a sentinel 0 at the end
    best, box = 0, (0, 0, 0, 0)
    for row in range(h):
        heights[:w] = np.where(used[row], 0, heights[:w] + 1)
        stack: list[int] = []
        for col in range(w + 1):
            while stack and heights[stack[-1]] >= heights[col]:
                height = int(heights[stack.pop()])
                left = stack[-1] + 1 if stack else 0
                if height * (col - left) > best:
                    best, box = height * (col - left), (row + 1 - height, left, row + 1, col)
            stack.append(col)
    return box


def band_strips(used: np.ndarray, context: int) -> Optional[list[Strip]]:
    """Four strips of the window ((h, w) bool `used`: the pixels with loss weight) that leave out the largest
    rectangle without loss weight, shrunk by `context` so that every used pixel's output is exact; each strip
    reaches `context` pixels past its cut sides and keeps only the outputs that do not see the cut. None when
    they would not save enough (`STRIPS_WORTH`)."""
    h, w = used.shape
    cell = STRIP_CELL  # found on a coarse grid (a cell is used when any of its pixels is): fast, and never too big
    coarse = np.pad(used, ((0, -h % cell), (0, -w % cell))).reshape(-(-h // cell), cell, -(-w // cell), cell)
    top, left, bottom, right = (v * cell for v in _largest_empty_rectangle(coarse.any(axis=(1, 3))))
    top, left, bottom, right = top + context, left + context, min(bottom, h) - context, min(right, w) - context
    if bottom <= top or right <= left:
        return None
    c, all_ = context, slice(None)
    strips = [
        Strip(slice(0, top + c), all_, slice(0, top), all_, slice(0, top), all_),
        Strip(slice(bottom - c, h), all_, slice(c, None), all_, slice(bottom, h), all_),
        Strip(slice(top - c, bottom + c), slice(0, left + c), slice(c, c + bottom - top), slice(0, left),
              slice(top, bottom), slice(0, left)),
        Strip(slice(top - c, bottom + c), slice(right - c, w), slice(c, c + bottom - top), slice(c, None),
              slice(top, bottom), slice(right, w)),
    ]
    strips = [st for st in strips if st.out_rows.stop > st.out_rows.start and
              (st.out_cols == all_ or st.out_cols.stop > st.out_cols.start)]
    size = sum((st.rows.stop - st.rows.start) * ((st.cols.stop or w) - (st.cols.start or 0)) for st in strips)
    return strips if size < STRIPS_WORTH * h * w else None


class PinnedGroupNorm(nn.Module):
    """GroupNorm that normalises with statistics recorded once on the whole image (like BatchNorm in eval mode).

    Decoding only a window of the latents would otherwise change every GroupNorm's statistics, so even
    the inside of the mask would come out different from the candidate. Same `weight` / `bias` names as
    the `nn.GroupNorm` it replaces; `mean` / `var` buffers are (B, groups), one row per candidate.
    """

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.num_groups, self.eps = norm.num_groups, norm.eps
        self.weight, self.bias = norm.weight, norm.bias
        self.register_buffer("mean", None)
        self.register_buffer("var", None)
        self.recording = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        groups = x.reshape(b, self.num_groups, -1)
        if self.recording or self.mean is None:  # nothing pinned: a plain GroupNorm
            mean, var = groups.mean(-1), groups.var(-1, unbiased=False)
            if self.recording:
                self.mean, self.var = mean.detach(), var.detach()
        else:
            mean, var = self.mean, self.var
        # one multiply-add per element: (x - mean) * rsqrt(var + eps) * weight + bias, folded into a per-channel
        # scale and shift, so that backprop keeps one image-sized tensor per norm instead of four
        per_channel = c // self.num_groups
        scale = torch.rsqrt(var + self.eps).repeat_interleave(per_channel, 1) * self.weight  # (B, C)
        shift = self.bias - mean.repeat_interleave(per_channel, 1) * scale
        shape = (b, c) + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.reshape(shape), x, scale.reshape(shape))


class LatentDecoder(nn.Module):
    """Scaled latents -> images in [-1, 1]: an fp32 copy of the VAE's `post_quant_conv` and `decoder`, run as
    `vae.decode` runs them, in stages, so that a window of the image can be decoded alone.

    Stages: 0 = unscale + post_quant_conv + conv_in + mid block (at latent resolution, cheap; it holds
    the decoder's attention, so it always runs on the whole latents); 1..n = the n up blocks; n + 1 =
    the output norm and conv. The copy is frozen; callers train it through `torch.func.functional_call`.
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        post_quant_conv = getattr(vae, "post_quant_conv", None)
        self.post_quant_conv = copy.deepcopy(post_quant_conv).float() if post_quant_conv is not None else None
        self.decoder = copy.deepcopy(vae.decoder).float()
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.eval().requires_grad_(False)
        # after the front, GroupNorm statistics are pinned to the whole image's (see `record`)
        for module in self.stage_modules(1):
            for name, child in list(module.named_modules()):
                if isinstance(child, nn.GroupNorm):
                    parent = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
                    setattr(parent, name.rsplit(".", 1)[-1], PinnedGroupNorm(child))
        d = self.decoder
        if isinstance(d.conv_norm_out, nn.GroupNorm):
            d.conv_norm_out = PinnedGroupNorm(d.conv_norm_out)
        self.pinned = {n: m for n, m in self.named_modules() if isinstance(m, PinnedGroupNorm)}
        self.checkpointing = False  # recompute the up blocks' activations in backward (memory for time)

    @property
    def num_stages(self) -> int:
        return len(self.decoder.up_blocks) + 2

    def stage_modules(self, start: int) -> list[nn.Module]:
        """The modules with weights in stages `start` and later."""
        d = self.decoder
        front = [m for m in (self.post_quant_conv, d.conv_in, d.mid_block) if m is not None]
        stages = [front] + [[b] for b in d.up_blocks] + [[d.conv_norm_out, d.conv_out]]
        return [m for mods in stages[start:] for m in mods]

    @torch.no_grad()
    def record(self, latents: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Decode the whole latents (B, C, h, w), recording every pinned norm's statistics.

        Returns the images and the statistics as {buffer name: (B, groups)}, for `functional_call`.
        """
        for m in self.pinned.values():
            m.recording = True
        try:
            images = self(latents)
        finally:
            for m in self.pinned.values():
                m.recording = False
        stats = {f"{n}.{k}": getattr(m, k) for n, m in self.pinned.items() for k in ("mean", "var")}
        for m in self.pinned.values():
            m.mean = m.var = None
        return images, stats

    def statistics(self, latents: torch.Tensor, given: Optional[dict[str, torch.Tensor]] = None,
                   idx: Optional[list[int]] = None) -> dict[str, torch.Tensor]:
        """The pinned statistics of `latents`: rows `idx` of `given` (`DecodeStats.stats`, recorded while the edit
        decoded them) when they cover every pinned norm, else `record`'s (one more whole-image decode)."""
        names = {f"{n}.{k}" for n in self.pinned for k in ("mean", "var")}
        if given is not None and set(given) == names:
            dev = next(iter(self.decoder.parameters())).device
            return {k: (v if idx is None else v[idx]).to(dev, torch.float32) for k, v in given.items()}
        return self.record(latents)[1]

    def forward(self, x: torch.Tensor, start: int = 0, stop: Optional[int] = None,
                window: Optional["Window"] = None) -> torch.Tensor:
        """Run stages start..stop-1 on x (whole scaled latents when start == 0); with `window`, the front's
        output is cut to the window and the rest runs on that crop only."""
        d, stop = self.decoder, self.num_stages if stop is None else stop
        for i in range(start, stop):
            if i == 0:
                x = x / self.scaling_factor + self.shift_factor
                if self.post_quant_conv is not None:
                    x = self.post_quant_conv(x)
                x = d.conv_in(x)
                x = self._checkpointed(d.mid_block, x, None) if self._checkpoint() else d.mid_block(x, None)  # (B, C', h, w)
                if window is not None:
                    x = window.latents(x)
            elif i <= len(d.up_blocks):
                x = self._run(d.up_blocks[i - 1], x)
            elif self._checkpoint():
                x = self._checkpointed(nn.Sequential(d.conv_norm_out, d.conv_act, d.conv_out), x)
            else:
                x = d.conv_out(d.conv_act(d.conv_norm_out(x)))
        return x

    def _checkpoint(self) -> bool:
        return self.checkpointing and torch.is_grad_enabled()

    def _run(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One up block; with `checkpointing` under autograd, each resnet and upsampler of it is recomputed in
        the backward pass instead of keeping its activations (the whole block when it has attention)."""
        if not self._checkpoint():
            return block(x, None)
        if getattr(block, "attentions", None) is not None or not hasattr(block, "resnets"):
            return self._checkpointed(block, x, None)
        for resnet in block.resnets:
            x = self._checkpointed(resnet, x, None)
        for up in block.upsamplers or []:
            x = self._checkpointed(up, x)
        return x

    @staticmethod
    def _checkpointed(module: nn.Module, x: torch.Tensor, *args: Any) -> torch.Tensor:
        """`module(x, *args)` under activation checkpointing. The weights and pinned statistics in use now (those
        `functional_call` swapped in) are handed to the recomputation explicitly: by the time the backward
        pass reruns the module, it holds its own tensors again."""
        from torch.func import functional_call
        from torch.utils.checkpoint import checkpoint

        tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        return checkpoint(lambda x: functional_call(module, tensors, (x, *args)), x, use_reentrant=False)


class DecodeStats:
    """Records, while the edit decodes its candidates with the shared VAE, the GroupNorm statistics that
    `LatentDecoder.record` would otherwise compute with one more whole-image decode per candidate (on the SD
    graph at 256 px that pass was half the time of a 4-step edit). Forward hooks on the norms of the VAE
    decoder's up blocks and output layer keep each norm input's per-group mean and variance (fp32).

    The VAE is shared by every edit in the process, so a hook only records calls from the thread that
    opened it; `stats` checks that every norm saw each candidate once and that all values are finite,
    and otherwise returns None (the caller then records them itself, as before). Tiled decoding
    normalises each tile on its own: nothing is recorded then.

        with DecodeStats(vae) as rec:
            decoded = vae.decode(...)
        stats = rec.stats(batch)  # {LatentDecoder buffer name: (batch, groups)} or None
    """

    def __init__(self, vae: nn.Module):
        self.vae, self.handles, self.values = vae, [], {}
        self.thread = threading.get_ident()

    def __enter__(self) -> "DecodeStats":
        if getattr(self.vae, "use_tiling", False) or not hasattr(self.vae, "decoder"):
            return self
        d = self.vae.decoder
        for prefix, module in [(f"decoder.up_blocks.{i}", b) for i, b in enumerate(d.up_blocks)] + \
                [("decoder.conv_norm_out", d.conv_norm_out)]:
            for name, child in module.named_modules():
                if isinstance(child, nn.GroupNorm):
                    full = f"{prefix}.{name}" if name else prefix
                    self.handles.append(child.register_forward_hook(self._hook(full, child.num_groups)))
        return self

    def _hook(self, name: str, groups: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if threading.get_ident() != self.thread:
                return  # another edit decoding with the same VAE
            x = args[0].detach()
            n, c = x.shape[:2]
            # GroupNorm's own kernel without the affine part: the statistics exactly as the decode computed them,
            # in half the time of var_mean (the decode's norm itself does not hand them out)
            try:
                _, mean, rstd = torch.native_group_norm(x, None, None, n, c, x[0, 0].numel(), groups, module.eps)
                mean, var = mean.float().reshape(n, groups), rstd.float().reshape(n, groups) ** -2 - module.eps
            except RuntimeError:  # a dtype or backend without that kernel: the same statistics, in fp32
                var, mean = torch.var_mean(x.float().reshape(n, groups, -1), dim=-1, correction=0)
            self.values.setdefault(name, []).append((mean, var))
        return hook

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def stats(self, batch: int) -> Optional[dict[str, torch.Tensor]]:
        """{buffer name: (batch, groups)} in the form `LatentDecoder.record` returns, or None when anything is
        missing or not finite."""
        if not self.values:
            return None
        out = {}
        for name, calls in self.values.items():
            mean, var = torch.cat([m for m, _ in calls]), torch.cat([v for _, v in calls])
            if mean.shape[0] != batch or not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
                return None
            out[f"{name}.mean"], out[f"{name}.var"] = mean, var
        return out


class _Plateau:
    """Per-candidate early stopping: done once the loss fell by less than MIN_IMPROVEMENT (relative) over the
    last `patience` steps (0 = never)."""

    def __init__(self, n: int, patience: int):
        self.patience, self.history = patience, [[] for _ in range(n)]
        self.done = [False] * n

    def update(self, losses: list[float]) -> list[int]:
        """Record one step's losses; return the candidates that just became done."""
        newly = []
        for i, loss in enumerate(losses):
            if self.done[i] or self.patience <= 0:
                continue
            h = self.history[i]
            h.append(loss)
            if len(h) > self.patience and h[-1] > (1 - MIN_IMPROVEMENT) * h[-1 - self.patience]:
                self.done[i] = True
                newly.append(i)
        return newly


def _targets(window: Window, decoded: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, lam: float,
             focus: Optional[torch.Tensor] = None):
    """Window crops of the candidates, the source and the weights of both loss terms (only where `focus` is 1,
    when given)."""
    m = window.pixels(mask)  # (1, 1, hp, wp)
    f = window.pixels(focus) if focus is not None else torch.ones_like(m)
    return window.pixels(decoded), window.pixels(source), m * f, lam * (1 - m) * f


def _loss(out: torch.Tensor, cand: torch.Tensor, src: torch.Tensor, w_in: torch.Tensor,
          w_out: torch.Tensor) -> torch.Tensor:
    """Per-candidate loss (B,): MSE to the candidate inside the mask + λ MSE to the source outside (paper §4.2),
    both summed over the window and divided by its size."""
    return (w_in * (out - cand) ** 2 + w_out * (out - src) ** 2).mean(dim=(1, 2, 3))


def _stop_check(should_stop: Optional[ShouldStop]) -> None:
    if should_stop is not None and should_stop():
        raise EditCancelled("the edit was stopped")


def _device_of(vae: nn.Module) -> torch.device:
    return next(vae.parameters()).device


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

    dev = _device_of(vae)
    latent_size = tuple(latents.shape[-2:])
    decoded, source, mask = decoded.float().to(dev), source.float().to(dev), mask.float().to(dev)
    window = latent_window(mask, latent_size, margin)
    base = LatentDecoder(vae)
    B = latents.shape[0]
    rows = min(batch_size, B)  # decoded together in each step
    base.checkpointing = needs_checkpointing(base, window, dev, rows) if checkpointing is None else checkpointing
    cand, src, w_in, w_out = _targets(window, decoded, source, mask, lam)
    latents = latents.float().to(dev)
    groups = [list(range(i, min(i + batch_size, B))) for i in range(0, B, batch_size)]
    total, outs = steps * len(groups), []
    sl = (..., slice(window.top, window.bottom), slice(window.left, window.right))
    with torch.enable_grad():
        for g, idx in enumerate(groups):
            pinned = base.statistics(latents[idx], stats, idx)
            z = latents[idx][sl].clone().requires_grad_(True)  # (G, C, window)

            def decode(z):
                whole = latents[idx].clone()
                whole[sl] = z  # the window's latents in the whole latents: the front sees everything
                return functional_call(base, pinned, (whole, 0, None, window))

            opt = torch.optim.Adam([z], lr=lr)
            plateau, kept = _Plateau(len(idx), patience), {}
            for step in range(steps):
                _stop_check(should_stop)
                per = _loss(decode(z), cand[idx], src, w_in, w_out)
                opt.zero_grad(set_to_none=True)
                per.sum().backward()  # a sum: each candidate's latents get their own gradient
                opt.step()
                for i in plateau.update(per.tolist()):
                    kept[i] = z[i].detach().clone()
                if progress is not None:
                    progress(g * steps + step + 1, total)
                if all(plateau.done):
                    break
            with torch.no_grad():
                for i, zi in kept.items():  # candidates that stopped early keep their latents of then
                    z[i] = zi
                outs.append(decode(z))
    if progress is not None:
        progress(total, total)
    return paste(window, torch.cat(outs), source, latent_size)


def activation_bytes(base: LatentDecoder, window: Window, rows: int = 1) -> int:
    """Rough bytes that autograd keeps for one candidate's decode of `window` without checkpointing: about
    eight fp32 maps per resnet of each up block at its resolution (docs/fewstep.md checks it against
    bench/decoder_memory.py's measurements)."""
    blocks = base.decoder.up_blocks
    pixels = (window.bottom - window.top) * (window.right - window.left) * window.factor ** 2  # output pixels
    maps = 0
    for k, block in enumerate(blocks):
        shrink = 4 ** max(len(blocks) - 1 - k, 0)  # up block k runs at 1 / 2^(n-1-k) of the output's side
        maps += len(block.resnets) * 8 * block.resnets[0].out_channels * pixels // shrink
    return 4 * maps * rows


def needs_checkpointing(base: LatentDecoder, window: Window, device: torch.device, rows: int = 1) -> bool:
    """Whether backprop through `window` should recompute activations: on CUDA when their estimate
    (`activation_bytes`) exceeds `CUDA_FREE_SHARE` of the free memory, elsewhere above `CPU_ACTIVATION_BYTES`.
    Checkpointing costs about one more decoder pass per step, so it runs only when memory asks for it."""
    need = activation_bytes(base, window, rows)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return need > CUDA_FREE_SHARE * free
    return need > CPU_ACTIVATION_BYTES


def _decode_each(base: LatentDecoder, tensors: dict[str, torch.Tensor], x: torch.Tensor, start: int,
                 window: Window, stop: Optional[int] = None) -> torch.Tensor:
    """Run `base` on x[i] with the i-th slice of each stacked tensor (G, ...) it is given (weights, pinned
    statistics) swapped in; vectorised with vmap when G > 1."""
    from torch.func import functional_call, vmap

    if x.shape[0] == 1:
        return functional_call(base, {k: v[0] for k, v in tensors.items()}, (x, start, stop, window))
    with warnings.catch_warnings():  # attention has no vmap batching rule on some backends: a loop, still right
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        return vmap(lambda t, xi: functional_call(base, t, (xi[None], start, stop, window))[0])(tensors, x)


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
    from torch.func import functional_call

    dev = _device_of(vae)
    latent_size = tuple(latents.shape[-2:])
    decoded, source, mask = decoded.float().to(dev), source.float().to(dev), mask.float().to(dev)
    window = latent_window(mask, latent_size, margin)
    base = LatentDecoder(vae)  # fp32 copy; functional_call swaps in each candidate's weights
    base.checkpointing = needs_checkpointing(base, window, dev) if checkpointing is None else checkpointing
    start = 0 if blocks <= 0 else max(base.num_stages - 1 - blocks, 0)  # first trained stage
    tuned = {id(p) for m in base.stage_modules(start) for p in m.parameters()}
    focus = focus.float().to(dev) if focus is not None else None
    cand, src, w_in, w_out = _targets(window, decoded, source, mask, lam, focus)
    latents = latents.float().to(dev)
    B = latents.shape[0]
    if share:
        # several candidates per step on CUDA, one on the CPU and for large windows (memory: docs/benchmarks.md)
        per_step = min(batch_size, B) if dev.type == "cuda" and not base.checkpointing else 1
        out = _finetune_shared(base, start, tuned, latents, (cand, src, w_in, w_out), window, steps=steps, lr=lr,
                               patience=patience, per_step=per_step, batch_size=batch_size, schedule=schedule,
                               stats=stats, progress=progress, should_stop=should_stop)
        return paste(window, out, source, latent_size)
    if vectorize is None:
        vectorize = dev.type == "cuda"
    size = batch_size if vectorize else 1
    base.checkpointing = base.checkpointing and not vectorize
    groups = [list(range(i, min(i + size, B))) for i in range(0, B, size)]
    total, outs = steps * len(groups), []
    with torch.enable_grad():
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
            opt = torch.optim.Adam(params.values(), lr=lr)
            plateau, kept = _Plateau(len(idx), patience), {}
            for step in range(steps):
                _stop_check(should_stop)
                out = _decode_each(base, {**params, **pinned}, x, start, window)  # (G, 3, hp, wp)
                per = _loss(out, cand[idx], src, w_in, w_out)  # (G,)
                opt.zero_grad(set_to_none=True)
                per.sum().backward()  # a sum: each copy gets exactly its own candidate's gradient
                _set_lr(opt, lr * lr_factor(schedule, step, steps))
                opt.step()
                for i in plateau.update(per.tolist()):
                    kept[i] = {k: v[i].detach().clone() for k, v in params.items()}
                if progress is not None:
                    progress(g * steps + step + 1, total)
                if all(plateau.done):
                    break
            with torch.no_grad():
                for i, weights in kept.items():  # copies that stopped early keep their weights of then
                    for k, v in weights.items():
                        params[k][i] = v
                outs.append(_decode_each(base, {**params, **pinned}, x, start, window))
            del params, opt
    if progress is not None:
        progress(total, total)
    return paste(window, torch.cat(outs).float(), source, latent_size)


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
    opt = torch.optim.Adam(params.values(), lr=lr)
    plateau, latest = _Plateau(1, patience), [None] * B
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
            return _loss(decode(idx), cand[idx], src, w_in, w_out)
        # only the strips around the band that the loss sees, each output pixel once: the same sum as the whole
        # window's (the window's pixels without loss weight are all that is left out), divided by the same size
        total = 0.0
        for st in strips:
            out = decode(idx, st.rows, st.cols)[..., st.keep_rows, st.keep_cols]
            at = (..., st.out_rows, st.out_cols)
            total = total + _loss(out, cand[idx][at], src[at], w_in[at], w_out[at]) * out[0].numel()
        return total / cand[0].numel()

    with torch.enable_grad():
        for step in range(steps):
            _stop_check(should_stop)
            idx = [(step * per_step + j) % B for j in range(per_step)]  # the candidates in turn
            per = losses(idx)  # (per_step,)
            opt.zero_grad(set_to_none=True)
            per.mean().backward()
            _set_lr(opt, lr * lr_factor(schedule, step, steps))
            opt.step()
            for i, loss in zip(idx, per.tolist()):
                latest[i] = loss
            if progress is not None:
                progress(step + 1, steps)
            if None not in latest and plateau.update([sum(latest) / B]):
                break
    with torch.no_grad():
        outs = [decode(idx) for idx in chunks]
    if progress is not None:
        progress(steps, steps)
    return torch.cat(outs).float()
