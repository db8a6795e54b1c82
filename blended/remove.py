"""Removing what the mask covers without a prompt (issue 29): the hole pre-filled from its surroundings (OpenCV's
inpainting, Telea or Navier-Stokes), the blend started from the pre-fill's latents at a partial strength and
denoised with a background prompt (may be empty), the candidates ranked by how little of the object is left.

Prompting "background" rarely works in Blended Latent Diffusion: from noise, the model paints a new object. The
pre-fill gives the loop a start without the object (as LaMa- or Telea-filled starts do in other tools), and the
loop only harmonises it; measured in docs/remove.md.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .config import EditConfig

FILL_FLAGS = {"telea": "INPAINT_TELEA", "ns": "INPAINT_NS"}  # remove_fill -> cv2 flag (config.REMOVE_FILLS)
FILL_RADIUS = 3  # pixels around each filled pixel that OpenCV's inpainting reads (its documentation's example)
RANKINGS = ("surroundings", "removed", "both")  # what `RemovalRanker` sorts by (measured: docs/remove.md)
DEFAULT_RANKING = "surroundings"


def prefill(image: Image.Image, mask: np.ndarray, method: str = "telea", radius: int = FILL_RADIUS) -> Image.Image:
    """`image` (RGB) with the pixels where `mask` ((H, W) bool, True = fill) is True painted in from their
    surroundings by `cv2.inpaint` ("telea": Telea 2004, fast marching; "ns": Navier-Stokes); every other pixel is
    the image's own."""
    import cv2

    if method not in FILL_FLAGS:
        raise ValueError(f"remove_fill must be one of {', '.join(FILL_FLAGS)}")
    a = np.asarray(image.convert("RGB"))
    hole = np.asarray(mask, bool)
    if hole.shape != a.shape[:2]:
        raise ValueError(f"the mask is {hole.shape[::-1]} but the image is {image.size}")
    if not hole.any():
        return image.convert("RGB").copy()
    filled = cv2.inpaint(np.ascontiguousarray(a), hole.astype(np.uint8) * 255, radius, getattr(cv2, FILL_FLAGS[method]))
    return Image.fromarray(np.where(hole[..., None], filled, a))


def loop_start(cfg: EditConfig) -> float:
    """The `blend_start` the loop runs with: 1 - `remove_strength` for a removal, else `blend_start`."""
    return 1.0 - cfg.remove_strength if cfg.remove else cfg.blend_start


def prefill_only(cfg: EditConfig) -> bool:
    """True when the edit is the pre-fill alone (`remove` at `remove_strength` 0: no diffusion)."""
    return bool(cfg.remove) and cfg.remove_strength == 0


def prefilled(model: Any, image: Image.Image, support: np.ndarray, z_init: torch.Tensor, mask: torch.Tensor,
              cfg: EditConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The latents a removal blends with, and the pre-fill itself.

    Args:
        model: the LoadedModel (its `encode`).
        image: the region at work size (RGB, h x w).
        support: (h, w) bool, the pixels the edit may change: the hole that is pre-filled.
        z_init: (1, C, h/f, w/f) the source's latents.
        mask: (1, 1, h/f, w/f) the loop's last (true) latent mask, 1 = edit.
        cfg: the edit's settings (`remove_fill`).

    Returns:
        (z_start, x_fill): the pre-fill's latents inside `mask` and the source's, exactly, outside it (the loop
        starts from them noised and keeps them outside the mask, so the object never comes back from the
        background it blends with); the pre-filled image (1, 3, h, w) in [-1, 1].
    """
    filled = prefill(image, support, cfg.remove_fill)
    x_fill = torch.from_numpy(np.asarray(filled, np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    x_fill = x_fill.to(z_init.device)
    if prefill_only(cfg):  # no loop: no latents needed
        return z_init, x_fill
    z_fill = model.encode(x_fill)
    return mask * z_fill + (1 - mask) * z_init, x_fill


class RemovalRanker:
    """Ranks the candidates of a removal by how little of the object is left, with a CLIP ranker's image tower.

    Each candidate's crop around the mask (`ranking.crop_box`) is compared with two crops of the source: the
    source itself, with the object (`removed`: the cosine to it, lower is better) and the source pre-filled
    (`surroundings`: the cosine to it, higher is better). `score` is one of RANKINGS: `surroundings`,
    `-removed` or their sum (`both`). It has the `.score(images, mask, prompt)` of `ranking.Ranker`.
    """

    def __init__(self, ranker: Any, source: Image.Image, fill: str = "telea", by: str = DEFAULT_RANKING):
        if by not in RANKINGS:
            raise ValueError(f"the removal ranking must be one of {', '.join(RANKINGS)}")
        self.ranker, self.source, self.fill, self.by = ranker, source.convert("RGB"), fill, by

    def score(self, images: Sequence[Image.Image], mask: Any, prompt: str = "") -> list[dict[str, float]]:
        """One dict per image, in input order: `removed`, `surroundings` (cosines) and `score` (higher =
        less object left). `mask`: (H, W) bool, True = removed; `prompt` is not used."""
        from .ranking import crop_box

        if not images:
            return []
        hole = np.asarray(mask, bool)
        box = crop_box(hole)
        src = self.source.crop(box)
        refs = self.ranker.embed_images([src, prefill(src, hole[box[1]:box[3], box[0]:box[2]], self.fill)])
        cands = self.ranker.embed_images([im.convert("RGB").crop(box) for im in images])  # (N, D)
        removed, surroundings = (cands @ refs[0]).tolist(), (cands @ refs[1]).tolist()
        combined = {"surroundings": surroundings, "removed": [-r for r in removed],
                    "both": [s - r for s, r in zip(surroundings, removed)]}[self.by]
        return [{"removed": r, "surroundings": s, "score": c} for r, s, c in zip(removed, surroundings, combined)]


def removal_ranker(ranker: Any, source: Image.Image, cfg: EditConfig) -> Optional[Any]:
    """The ranker an edit sorts its candidates with: a `RemovalRanker` around `ranker` for a removal, else
    `ranker` itself (None stays None: no ranking)."""
    if ranker is None or not cfg.remove:
        return ranker
    return RemovalRanker(ranker, source, cfg.remove_fill)
