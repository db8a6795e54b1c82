"""Latent masks and their per-step schedule: progressive shrinking (paper §4.1), the mask's core, and soft
masks (per-pixel edit strength, Differential Diffusion, Levin & Fried 2023)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .config import LATENT_MASK_MODES  # how a pixel mask becomes a latent mask, see `latent_strength`
from .config import EditConfig
from .errors import InputError
from .images import DEFAULT_MAX_PIXELS, ImageLike, Region, crop_mask, load_mask_values

MASK_SETTINGS = ("mask_threshold", "invert_mask", "mask_grow", "mask_blur", "soft_mask")  # what `EditMasks` reads


@dataclass(frozen=True)
class EditMasks:
    """A mask read once and prepared for one edit, at the upload's full resolution (H, W).

    `target` is the region asked for: the ranking scores it and the loop's core forms content inside it. With
    `mask_blur` or `soft_mask`, `strength` holds per-pixel edit strengths in [0, 1] whose support is everything
    the edit may touch, and the final composite uses them as its weights. The single edit, the multi-mask edit,
    the CLI and the batch all make one with `EditMasks.read` (or `from_values`) and pass it to `Editor.edit`.
    """

    target: np.ndarray  # (H, W) bool, True = edit
    strength: Optional[np.ndarray]  # (H, W) float32 in [0, 1]; None = the hard `target`
    soft: bool  # `soft_mask`: the loop steps by the strengths too (Differential Diffusion)
    settings: tuple  # the values of MASK_SETTINGS it was made with

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), the image's."""
        return self.target.shape[1], self.target.shape[0]

    @property
    def support(self) -> np.ndarray:
        """(H, W) bool: every pixel the edit may change."""
        return self.target if self.strength is None else self.strength > 0

    @classmethod
    def read(cls, mask: ImageLike, size: tuple[int, int], config: EditConfig, *,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> "EditMasks":
        """Read `mask` (white or opaque = edit; its alpha when it has transparency) for an image of `size`."""
        if isinstance(mask, EditMasks):
            return mask.check(size, config)
        return cls.from_values(load_mask_values(mask, size, max_pixels=max_pixels), config)

    @classmethod
    def from_values(cls, values: np.ndarray, config: EditConfig) -> "EditMasks":
        """From a mask's (H, W) values in [0, 1] as read (`load_mask_values`): grown (`mask_grow`, on the edit
        side, in 8-bit steps), inverted, thresholded or made strengths (`soft_mask`, `mask_blur`)."""
        from .select import grow_values

        cfg = config
        if cfg.mask_grow:  # grown or shrunk in the upload's pixels before anything else (blended/select)
            edit = grow_values(1 - values if cfg.invert_mask else values, cfg.mask_grow)
            values = 1 - edit if cfg.invert_mask else edit
            values = np.round(np.clip(values, 0, 1) * 255).astype(np.uint8).astype(np.float32) / 255.0
        strength = None
        if cfg.soft_mask:
            strength = strength_map(1 - values if cfg.invert_mask else values, cfg.mask_blur)
            if not strength.any():
                raise InputError("the mask is empty: paint the region to edit (white or opaque = edit)")
            target = strength >= 0.5
            if not target.any():  # a faint mask: all of it is the target
                target = strength > 0
        else:
            target = values > cfg.mask_threshold
            target = ~target if cfg.invert_mask else target
            if not target.any():
                raise InputError("the mask is empty: paint the region to edit (white or opaque = edit)")
            if cfg.mask_blur > 0:
                strength = strength_map(target, cfg.mask_blur)
        return cls(target, strength, bool(cfg.soft_mask), _mask_settings(cfg))

    def check(self, size: tuple[int, int], config: EditConfig) -> "EditMasks":
        """Self, if it was made for an image of `size` with `config`'s mask settings; else InputError."""
        if self.size != tuple(size):
            raise InputError(f"the mask is {self.size[0]}x{self.size[1]} but the image is {size[0]}x{size[1]}; "
                             "they must be the same size")
        if self.settings != _mask_settings(config):
            raise InputError("the mask was prepared with other mask settings than the edit's "
                             f"({', '.join(MASK_SETTINGS)}); prepare it with the edit's settings")
        return self

    def at_work(self, region: Region) -> "WorkMasks":
        """The masks of the region that is edited, at its work size."""
        crop = crop_mask(self.support, region)
        work_target = crop if self.strength is None else \
            crop_strength(self.target.astype(np.float32), region.box, region.work_size) > 0
        # the loop's strengths: per pixel with `soft_mask` (Differential Diffusion); else the target, hard
        # (`mask_blur` alone softens only the final composite: docs/benchmarks.md, "Soft masks")
        loop = crop_strength(self.strength, region.box, region.work_size) if self.soft else work_target
        return WorkMasks(support=crop, target=work_target, strength=loop)

    def composite_weights(self, region: Region, feather: int) -> np.ndarray:
        """(h, w) weights of the edit in the region's box, in the upload's own pixels: the seam band of `feather`
        px for a hard mask, a soft mask's own strengths otherwise."""
        from .images import seam_weights

        l, t, r, b = region.box
        return seam_weights(self.support[t:b, l:r], feather) if self.strength is None else self.strength[t:b, l:r]


@dataclass(frozen=True)
class WorkMasks:
    """An `EditMasks` in the edited region at work size (h, w)."""

    support: np.ndarray  # (h, w) bool: every pixel the edit may touch
    target: np.ndarray  # (h, w) bool: the region asked for
    strength: Any  # (h, w): float strengths with `soft_mask`, else `target`


def _mask_settings(config: EditConfig) -> tuple:
    return tuple(getattr(config, name) for name in MASK_SETTINGS)


def strength_map(mask: np.ndarray, blur: float = 0.0) -> np.ndarray:
    """(H, W) mask (bool, or float edit strengths in [0, 1]) -> float32 strengths in [0, 1], quantised to
    1/255 like an 8-bit mask.

    `blur` > 0 softens the edge outwards: pixels outside the mask take a Gaussian blur of it (standard
    deviation `blur` pixels, kernel 2 * round(2.5 * blur) + 1, A1111's "mask blur"), about 0.5 at the edge
    and exactly 0 some 2.5 * blur pixels out, so they change only in the last half of the steps or less
    and keep the source's structure; the mask's own pixels keep their strength. (A1111's blur also weakens
    the inside of the mask, which costs new objects their place on small masks: docs/benchmarks.md.)
    """
    s = np.asarray(mask, dtype=np.float32)
    if blur > 0:
        import cv2

        k = 2 * int(2.5 * blur + 0.5) + 1
        s = np.where(s > 0, s, cv2.GaussianBlur(s, (k, k), blur, borderType=cv2.BORDER_REPLICATE))
    return np.round(np.clip(s, 0.0, 1.0) * 255.0) / np.float32(255.0)


def latent_strength(strength: np.ndarray, factor: int, mode: str = "any") -> torch.Tensor:
    """(H, W) pixel strengths -> (1, 1, H/f, W/f) latent strengths. "any": the strongest pixel under a
    latent (a latent is edited if any pixel under it is); "core": the weakest (only latents wholly inside
    a hard mask); "nearest": the pixel at the latent's centre (the paper's code, PIL NEAREST)."""
    s = torch.from_numpy(np.ascontiguousarray(strength, dtype=np.float32))[None, None]
    if mode == "any":
        return F.max_pool2d(s, kernel_size=factor, stride=factor)
    if mode == "core":
        return -F.max_pool2d(-s, kernel_size=factor, stride=factor)
    if mode == "nearest":
        h, w = s.shape[-2] // factor, s.shape[-1] // factor
        return s[..., factor // 2 :: factor, factor // 2 :: factor][..., :h, :w].contiguous()
    raise ValueError(f"latent mask mode must be one of {', '.join(LATENT_MASK_MODES)}")


def latent_mask(mask: np.ndarray, factor: int, mode: str = "any") -> torch.Tensor:
    """(H, W) bool pixel mask -> (1, 1, H/f, W/f) float latent mask (`latent_strength` of a hard mask)."""
    return latent_strength(np.asarray(mask, dtype=np.float32), factor, mode)


def core_mask(mask: np.ndarray, factor: int) -> torch.Tensor:
    """(H, W) pixel mask -> (1, 1, H/f, W/f) latent mask of the latents whose pixels are all in the mask."""
    return latent_strength(np.asarray(mask, dtype=np.float32), factor, "core")


def dilate(mask: torch.Tensor, kernel: int) -> torch.Tensor:
    """Dilate a (B, 1, h, w) {0, 1} mask with a square `kernel` x `kernel` element (1 = unchanged)."""
    if kernel <= 1:
        return mask
    return F.max_pool2d(mask, kernel_size=kernel, stride=1, padding=kernel // 2)


def step_threshold(strength: torch.Tensor, i: int, num_steps: int) -> torch.Tensor:
    """The latents free at step i of `num_steps`: strength > 1 - (i + 1) / N, so a latent of strength s is
    edited in the last s * N steps (Differential Diffusion); a {0, 1} map is returned as it is."""
    return (strength > 1.0 - (i + 1) / num_steps).to(strength.dtype)


def mask_schedule(strength: torch.Tensor, num_steps: int, kernels: tuple[int, ...] = (7, 5, 3, 1),
                  shrink: bool = True, core: torch.Tensor | None = None,
                  core_steps: float = 0.0) -> list[torch.Tensor]:
    """One latent mask per denoising step: the only place the loop's masks are made.

    1. Soft masks: a latent of strength s is free only in the last s * N steps (`step_threshold`), so
       weak latents keep the source's structure; a hard {0, 1} mask is free at every step.
    2. Progressive shrinking (paper §4.1): `kernels[k]` dilation over the k-th of len(kernels) equal parts
       of the steps, so early steps blend with a wide mask and the last ones with the true mask (paper:
       7, 5, 3 then the true mask). Without `shrink`, the thresholded mask as it is.
    3. `core` (the latents wholly inside the mask, `latent_strength(..., "core")`) and `core_steps` > 0:
       the first `core_steps` of the steps blend with the (thresholded) core instead, so new content
       takes its place inside the user's mask and does not spill into the latents the mask only partly
       covers. An empty core (a thin mask) leaves the schedule as it is.

    The last step always blends with the true mask, `strength > 0`.
    """
    masks = []
    for i in range(num_steps):
        m = step_threshold(strength, i, num_steps)
        if shrink:
            m = dilate(m, kernels[min(i * len(kernels) // num_steps, len(kernels) - 1)])
        masks.append(m)
    if core is not None and core_steps > 0 and bool(core.any()):
        k = min(int(num_steps * core_steps), num_steps - 1)
        masks[:k] = [step_threshold(core, i, num_steps) for i in range(k)]
    return masks


def crop_strength(strength: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """Full-resolution (H, W) strengths -> the region `box` (left, top, right, bottom) at `size` (w, h),
    area-averaged like the image."""
    from PIL import Image

    crop = Image.fromarray(np.ascontiguousarray(strength[box[1] : box[3], box[0] : box[2]], dtype=np.float32), "F")
    if crop.size != tuple(size):
        crop = crop.resize(tuple(size), Image.Resampling.BOX)
    return np.clip(np.asarray(crop, dtype=np.float32), 0.0, 1.0)
