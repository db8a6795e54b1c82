"""Masks without painting every pixel: select an object with clicks or a box (Segment Anything, or GrabCut
when no SAM weights are at hand), then grow, shrink, invert, fill holes, drop specks or snap to edges.

Every segmenter has `name` and `select(image, selection, num_masks=1) -> [mask, ...]`: (H, W, 3) uint8 RGB
in, (H, W) bool masks out (True = edit), best first. `load_segmenter` picks one from BLENDED_SEGMENTER."""

from __future__ import annotations

import os
from typing import Optional, Protocol

import numpy as np

from ..errors import InputError, ModelLoadError
from ..images import DEFAULT_MAX_PIXELS, ImageLike, load_image
from .grabcut import GrabCutSegmenter
from .prompts import Selection, box_from_corners, parse_box, parse_points
from .sam import CACHE_SIZE, DEFAULT_SAM, SamSegmenter
from .tools import drop_specks, fill_holes, grow, grow_values, invert, snap

SEGMENTER_ENV = "BLENDED_SEGMENTER"  # "auto" (default), "grabcut", "none", or a SAM hub id / folder
CACHE_ENV = "BLENDED_SEGMENTER_CACHE"  # image embeddings SAM keeps (default CACHE_SIZE)


class Segmenter(Protocol):
    name: str
    multimask: bool  # True when one click can give several masks

    def select(self, image: np.ndarray, selection: Selection, num_masks: int = 1) -> list[np.ndarray]: ...


def load_segmenter(spec: Optional[str] = None, *, device: Optional[str] = None) -> tuple[Optional[Segmenter], str]:
    """The segmenter `spec` names (default: $BLENDED_SEGMENTER, else "auto") and a line saying which is in use.

    "auto" tries SAM (`DEFAULT_SAM`, from the hub or its cache) and falls back to GrabCut; a SAM id or folder
    that cannot be loaded falls back to GrabCut too, and the line says why. "grabcut" is GrabCut, "none" no
    segmenter (None: selection is off)."""
    spec = (spec or os.environ.get(SEGMENTER_ENV) or "auto").strip()
    if spec.lower() == "none":
        return None, f"selection is off ({SEGMENTER_ENV}=none)"
    if spec.lower() == "grabcut":
        return GrabCutSegmenter(), "selection: GrabCut (OpenCV, no weights)"
    source = DEFAULT_SAM if spec.lower() == "auto" else spec
    try:
        cache = int(os.environ.get(CACHE_ENV) or CACHE_SIZE)
    except ValueError:
        raise InputError(f"{CACHE_ENV} must be a whole number of images") from None
    try:
        sam = SamSegmenter.load(source, device=device, cache_size=cache)
    except ModelLoadError as e:
        return GrabCutSegmenter(), f"selection: GrabCut (OpenCV, no weights); {e}"
    return sam, f"selection: Segment Anything ({source})"


def select_mask(segmenter: Optional[Segmenter], image: ImageLike, selection: Selection, *, num_masks: int = 1,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> list[np.ndarray]:
    """Masks for `selection` on `image` (any ImageLike, EXIF applied), best first; InputError when there is no
    segmenter, the image is too large, the selection does not fit the image, or nothing was found."""
    if segmenter is None:
        raise InputError(f"no segmenter is available here ({SEGMENTER_ENV}=none): give or paint a mask instead")
    rgb = np.asarray(load_image(image, max_pixels=max_pixels))
    masks = [m for m in segmenter.select(rgb, selection, num_masks) if m.any()]
    if not masks:
        raise InputError("the selection found nothing there: click nearer the object's middle or draw a box "
                         "around it")
    return masks


__all__ = ["Segmenter", "Selection", "GrabCutSegmenter", "SamSegmenter", "load_segmenter", "select_mask",
           "parse_points", "parse_box", "box_from_corners", "grow", "grow_values", "invert", "fill_holes",
           "drop_specks", "snap", "DEFAULT_SAM", "SEGMENTER_ENV"]
