"""Latent masks and the progressive shrinking schedule (paper §4.1)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def latent_mask(mask: np.ndarray, factor: int) -> torch.Tensor:
    """(H, W) bool pixel mask -> (1, 1, H/f, W/f) float latent mask; a latent is edited if any pixel under it is."""
    m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    return F.max_pool2d(m, kernel_size=factor, stride=factor)


def core_mask(mask: np.ndarray, factor: int) -> torch.Tensor:
    """(H, W) bool pixel mask -> (1, 1, H/f, W/f) latent mask of the latents whose pixels are all in the mask."""
    return 1 - latent_mask(~np.asarray(mask, dtype=bool), factor)  # no pixel under it outside the mask


def dilate(mask: torch.Tensor, kernel: int) -> torch.Tensor:
    """Dilate a (B, 1, h, w) {0, 1} mask with a square `kernel` x `kernel` element (1 = unchanged)."""
    if kernel <= 1:
        return mask
    return F.max_pool2d(mask, kernel_size=kernel, stride=1, padding=kernel // 2)


def shrink_schedule(mask: torch.Tensor, num_steps: int, kernels: tuple[int, ...] = (7, 5, 3, 1),
                    shrink: bool = True, core: torch.Tensor | None = None,
                    core_steps: float = 0.0) -> list[torch.Tensor]:
    """One latent mask per denoising step: `kernels[k]` dilation over the k-th of len(kernels) equal
    parts of the steps, so early steps blend with a wide mask and the last ones with the true mask
    (paper §4.1: 7, 5, 3 then the true mask). Without `shrink`, the true mask at every step.

    With `core` (the latents wholly inside the pixel mask, `core_mask`) and `core_steps` > 0, the first
    `core_steps` of the steps blend with the core instead, so the new content takes its place inside
    the user's mask and does not spill into the latents the mask only partly covers; the later steps
    follow the schedule above. An empty core (a thin mask) leaves the schedule as it is; the last step
    always blends with the true mask.
    """
    if not shrink:
        masks = [mask] * num_steps
    else:
        dilated = [dilate(mask, k) for k in kernels]
        masks = [dilated[min(i * len(kernels) // num_steps, len(kernels) - 1)] for i in range(num_steps)]
    if core is not None and core_steps > 0 and bool(core.any()):
        k = min(int(num_steps * core_steps), num_steps - 1)
        masks = [core] * k + masks[k:]
    return masks
