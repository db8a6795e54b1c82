"""The window of the latents that `latent` and `decoder` optimise (the mask's box plus a margin), and the strips
around the seam band that `decoder_loss="band"` trains on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..config import EditConfig

STRIPS_WORTH = 0.85  # `decoder_loss="band"`: train on strips around the band when they hold < this share of the window
STRIP_CELL = 4  # pixels per cell of the grid on which the strips' hole is found


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


# -- strips around the seam band ----------------------------------------------------------------------

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
