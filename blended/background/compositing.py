"""Putting candidates and the source together: `stitch` (a feathered seam), `poisson` (gradient-domain cloning),
the paste of a decoded window, and the final composite of `latent` and `decoder` (`keep_inside`,
`exact_outside`). Images are (B, 3, H, W) in [-1, 1], masks (1, 1, H, W) with 1 = edited region."""

from __future__ import annotations

import numpy as np
import torch

from ..config import EditConfig
from ..images import seam_weights
from .window import Window


def feather_weights(mask: torch.Tensor, feather: int) -> torch.Tensor:
    """(1, 1, H, W) weights of the candidate: 1 inside the mask, falling linearly to 0 over `feather` pixels
    outside it (Euclidean distance), 0 beyond (`blended.images.seam_weights`)."""
    w = seam_weights((mask[0, 0] > 0.5).cpu().numpy(), feather)
    return torch.from_numpy(w)[None, None].to(mask.device)


def inner_weights(mask: torch.Tensor, width: int) -> torch.Tensor:
    """(1, 1, H, W) weights of the candidate for `keep_inside`: 0 outside the mask and on its border,
    rising linearly to 1 at `width` pixels inside it (Euclidean distance)."""
    import cv2

    inside = (mask[0, 0] > 0.5).cpu().numpy().astype(np.uint8)
    dist = cv2.distanceTransform(inside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)  # 0 outside, >= 1 inside
    w = np.clip((dist - 1.0) / width, 0.0, 1.0).astype(np.float32)
    return torch.from_numpy(w)[None, None].to(mask.device)


def stitch(decoded: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, feather: int) -> torch.Tensor:
    """Candidate inside the mask, source outside the mask and its `feather`-pixel seam (pixel-exact there)."""
    w = feather_weights(mask, feather)
    return w * decoded + (1 - w) * source


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


def paste(window: Window, inner: torch.Tensor, source: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """The source with the decoded window (B, 3, hp, wp) pasted in, fading into the source at its sides."""
    out = source.expand(inner.shape[0], -1, -1, -1).clone()
    weights = window.weights(latent_size, inner.device)
    under = window.pixels(out)
    under.copy_(weights * inner + (1 - weights) * under)
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


def keep_source_and_candidate(out: torch.Tensor, decoded: torch.Tensor, source: torch.Tensor, mask: torch.Tensor,
                              config: EditConfig, composite: bool) -> torch.Tensor:
    """The optimised decode `out` (`latent`, `decoder`) supplies only the transition: with `keep_inside` the
    candidate itself deeper than `feather / 2` px inside the mask, with `exact_outside` (and `composite`) the
    source itself beyond the seam band of `feather` px outside it."""
    if config.keep_inside:
        w = inner_weights(mask, max(1, config.feather // 2))
        out = w * decoded + (1 - w) * out
    if config.exact_outside and composite:
        v = feather_weights(mask, config.feather)
        out = v * out + (1 - v) * source
    return out
