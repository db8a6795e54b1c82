"""Live previews while the loop denoises: the model's estimate of the clean latents (x0), mapped to RGB by a
linear map fitted once per VAE, pasted over the source outside the mask. No VAE decode, a few ms a step."""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

PREVIEW_SIDE = 256  # longest side of a preview image, in pixels (previews are small: they only show the forming)
CHART_CELLS = 8  # the calibration chart is CHART_CELLS x CHART_CELLS flat colour patches
CELL_LATENTS = 4  # each patch spans this many latents per side, so most latents see a flat colour

_maps: "weakref.WeakKeyDictionary[Any, torch.Tensor]" = weakref.WeakKeyDictionary()  # VAE -> (C + 1, 3) map
_lock = threading.Lock()


def predicted_x0(output: Any, scheduler: Any, noise_pred: torch.Tensor, t: torch.Tensor,
                 latents: torch.Tensor) -> torch.Tensor:
    """The clean-latent estimate of one scheduler step: its `pred_original_sample`, or for schedulers without
    one (DPM++) the same quantity from `alphas_cumprod` and the model's prediction type."""
    x0 = getattr(output, "pred_original_sample", None)
    if x0 is not None:
        return x0
    a = scheduler.alphas_cumprod.to(latents.device)[int(t)].float()
    x, out = latents.float(), noise_pred.float()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (x - (1 - a).sqrt() * out) / a.sqrt()
    if kind == "v_prediction":
        return a.sqrt() * x - (1 - a).sqrt() * out
    return out  # "sample"


def colour_chart(cell: int) -> np.ndarray:
    """(H, W, 3) uint8: flat patches of `cell` px spanning hues, greys, darks and lights."""
    n = CHART_CELLS
    colours = []
    for k in range(n * n):
        row, col = divmod(k, n)
        if row == 0:  # greys from black to white
            colours.append([col / (n - 1)] * 3)
            continue
        hue = col / n
        value = (1.0, 0.7, 0.4, 1.0, 1.0, 0.85, 0.55)[(row - 1) % 7]
        sat = (1.0, 1.0, 1.0, 0.5, 0.25, 0.7, 0.5)[(row - 1) % 7]
        rgb = np.clip(np.abs(((hue * 6 + np.array([0, 4, 2])) % 6) - 3) - 1, 0, 1)  # hsv -> rgb at s=v=1
        colours.append(value * (1 - sat + sat * rgb))
    grid = (np.array(colours).reshape(n, n, 3) * 255).round().astype(np.uint8)
    return np.repeat(np.repeat(grid, cell, 0), cell, 1)


def latent_rgb_map(vae: Any, encode: Callable[[torch.Tensor], torch.Tensor], factor: int) -> torch.Tensor:
    """(C + 1, 3) least-squares map from scaled latents (plus a bias) to RGB in [-1, 1], fitted on a colour
    chart encoded by `encode` ((1, 3, H, W) in [-1, 1] -> scaled latents); computed once per VAE."""
    with _lock:
        cached = _maps.get(vae)
        if cached is not None:
            return cached
        chart = colour_chart(CELL_LATENTS * factor)
        x = torch.from_numpy(chart.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]  # (1, 3, H, W)
        z = encode(x).float().cpu()[0]  # (C, h, w)
        target = F.avg_pool2d(x, factor)[0]  # (3, h, w): the colour each latent covers
        a = torch.cat([z.flatten(1), torch.ones(1, z[0].numel())]).T  # (h*w, C + 1)
        b = target.flatten(1).T  # (h*w, 3)
        ridge = 1e-3 * torch.eye(a.shape[1])
        weights = torch.linalg.solve(a.T @ a + ridge, a.T @ b)  # (C + 1, 3)
        _maps[vae] = weights
        return weights


class Previewer:
    """Makes the preview images of one edit: x0 estimates -> RGB inside the mask, the source outside."""

    def __init__(self, weights: torch.Tensor, source: Image.Image, mask: np.ndarray,
                 decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        """`source`: the work-size RGB image; `mask`: its (H, W) bool edit mask; `decode`: a tiny decoder's
        (latents -> images in [-1, 1]) to show instead of the linear map, fed latents shrunk to the preview's
        size so it costs a fraction of a full-size tiny decode."""
        w, h = source.size
        scale = min(1.0, PREVIEW_SIDE / max(w, h))
        self.size = (max(1, round(w * scale)), max(1, round(h * scale)))
        self.weights = weights
        self.decode = decode
        self.work_width = max(w, h)
        self.source = np.asarray(source.convert("RGB").resize(self.size, Image.BILINEAR), np.float32)
        m = Image.fromarray(mask.astype(np.uint8) * 255).resize(self.size, Image.BILINEAR)
        self.alpha = np.asarray(m, np.float32)[..., None] / 255  # (h, w, 1), 1 = edit

    def __call__(self, x0: torch.Tensor) -> list[Image.Image]:
        """(B, C, h, w) latents -> B small RGB previews."""
        if self.decode is not None:
            rgb = self._decoded(x0)
        else:
            z = x0.detach().float().cpu()
            rgb = torch.einsum("bchw,cd->bdhw", z, self.weights[:-1]) + self.weights[-1][None, :, None, None]
        rgb = F.interpolate(rgb, size=self.size[::-1], mode="bilinear", align_corners=False)
        rgb = ((rgb.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).numpy()  # (B, h, w, 3)
        out = self.alpha * rgb + (1 - self.alpha) * self.source
        return [Image.fromarray(im.round().astype(np.uint8)) for im in out]

    def _decoded(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 latents resized so that the tiny decoder's output is about the preview's size, decoded (B, 3, h, w)."""
        shrink = max(1, round(self.work_width / max(self.size)))  # work pixels per preview pixel
        z = F.interpolate(x0.float(), scale_factor=1 / shrink, mode="area") if shrink > 1 else x0
        return self.decode(z).float().cpu()
