"""Masks without painting every pixel: select an object with clicks or a box (Segment Anything, or GrabCut
when no SAM weights are at hand) or name it in words (CLIPSeg, refined by the former), then grow, shrink, invert,
fill holes, drop specks or snap to edges.

Every segmenter has `name` and `select(image, selection, num_masks=1) -> [mask, ...]`: (H, W, 3) uint8 RGB
in, (H, W) bool masks out (True = edit), best first. `load_segmenter` picks one from BLENDED_SEGMENTER,
`load_text_segmenter` the one for words from BLENDED_TEXT_SEGMENTER."""

from __future__ import annotations

import functools
import os
from typing import Any, Optional, Protocol

import numpy as np

from ..errors import InputError, ModelLoadError
from ..images import DEFAULT_MAX_PIXELS, ImageLike, load_image
from .grabcut import GrabCutSegmenter
from .prompts import Selection, box_from_corners, parse_box, parse_points
from .sam import CACHE_SIZE, DEFAULT_SAM, SamSegmenter
from .text import DEFAULT_CLIPSEG, DEMO_TEXT_SEGMENTER, TextSegmenter
from .tools import drop_specks, fill_holes, grow, grow_values, invert, snap

SEGMENTER_ENV = "BLENDED_SEGMENTER"  # "auto" (default), "grabcut", "none", or a SAM hub id / folder
CACHE_ENV = "BLENDED_SEGMENTER_CACHE"  # image embeddings SAM keeps (default CACHE_SIZE)
TEXT_SEGMENTER_ENV = "BLENDED_TEXT_SEGMENTER"  # "auto" (default), "demo", "none", or a CLIPSeg hub id / folder
DEMO_MODELS = ("demo", "demo-fast")  # editing models of the demo world: "auto" picks the demo text segmenter for them


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


def load_text_segmenter(spec: Optional[str] = None, *, refiner: Any = None, model: Optional[str] = None,
                        device: Optional[str] = None) -> tuple[Optional[TextSegmenter], str]:
    """The text segmenter `spec` names (default: $BLENDED_TEXT_SEGMENTER, else "auto") and a line saying which.

    "auto" is the bundled demo one (`DEMO_TEXT_SEGMENTER`) when `model` is a demo model, else `DEFAULT_CLIPSEG`
    (its safetensors revision), falling back to the demo one with a line saying why; "demo" is the bundled one; a
    hub id (`ID@REVISION` for a revision) or folder is that CLIPSeg (ModelLoadError when it cannot be loaded, or a
    folder holds only pickle weights); "none" turns words off (None). `refiner` (a click/box segmenter, e.g.
    `load_segmenter()[0]`) refines its masks."""
    spec = (spec or os.environ.get(TEXT_SEGMENTER_ENV) or "auto").strip()
    if spec.lower() == "none":
        return None, f"selection by words is off ({TEXT_SEGMENTER_ENV}=none)"
    how = f", refined by {refiner!r}" if refiner is not None else ""
    auto = spec.lower() == "auto"
    if auto:
        spec = "demo" if (model or "").lower() in DEMO_MODELS else DEFAULT_CLIPSEG
    demo = spec.lower() == "demo"
    try:
        text = TextSegmenter.load(str(DEMO_TEXT_SEGMENTER) if demo else spec, refiner=refiner, device=device,
                                  name="demo" if demo else spec)
    except ModelLoadError as e:
        if not auto or demo:
            raise
        text = TextSegmenter.load(str(DEMO_TEXT_SEGMENTER), refiner=refiner, device=device, name="demo")
        return text, f"selection by words: the bundled demo text segmenter (demo scenes only){how}; {e}"
    return text, f"selection by words: CLIPSeg ({'the bundled demo one' if demo else spec}){how}"


@functools.lru_cache(maxsize=4)
def shared_text_segmenter(spec: Optional[str] = None, model: Optional[str] = None,
                          refiner: Any = "auto") -> tuple[Optional[TextSegmenter], str]:
    """`load_text_segmenter` once per process for the same arguments: a shared, bounded cache that the app's
    sessions and a batch's jobs read (a segmenter keeps nothing of a call). `refiner` "auto": `load_segmenter()`'s."""
    if isinstance(refiner, str) and refiner == "auto":
        refiner = load_segmenter()[0]
    return load_text_segmenter(spec, refiner=refiner, model=model)


def describe(selection: Selection, segmenter: Any) -> dict[str, Any]:
    """How a selected mask was made, for result.json: the words, clicks and box given and the segmenter(s)."""
    out: dict[str, Any] = {k: v for k, v in (("text", selection.text), ("points", [list(p) for p in selection.points]),
                                             ("labels", list(selection.labels)),
                                             ("box", list(selection.box) if selection.box else None)) if v}
    out["segmenter"] = getattr(segmenter, "name", str(segmenter))
    refiner = getattr(segmenter, "refiner", None)
    if refiner is not None:
        out["refiner"] = getattr(refiner, "name", str(refiner))
    return out


def select_by_text(image: ImageLike, text: str, *, model: Optional[str] = None, spec: Optional[str] = None,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, dict[str, Any]]:
    """((H, W) bool mask, how it was made) for the object `text` names on `image`, with the process's shared text
    segmenter (`shared_text_segmenter(spec, model)`); InputError when words are off or nothing matches."""
    segmenter, _ = shared_text_segmenter(spec, model)
    selection = Selection(text=str(text or "").strip())
    return select_mask(segmenter, image, selection, max_pixels=max_pixels)[0], describe(selection, segmenter)


def select_mask(segmenter: Optional[Segmenter], image: ImageLike, selection: Selection, *, num_masks: int = 1,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> list[np.ndarray]:
    """Masks for `selection` on `image` (any ImageLike, EXIF applied), best first; InputError when there is no
    segmenter, the image is too large, the selection does not fit the image, or nothing was found."""
    if segmenter is None and selection.text:
        raise InputError(f"selection by words is off here ({TEXT_SEGMENTER_ENV}=none): give or paint a mask instead")
    if segmenter is None:
        raise InputError(f"no segmenter is available here ({SEGMENTER_ENV}=none): give or paint a mask instead")
    rgb = np.asarray(load_image(image, max_pixels=max_pixels))
    masks = [m for m in segmenter.select(rgb, selection, num_masks) if m.any()]
    if not masks:
        raise InputError("the selection found nothing there: click nearer the object's middle or draw a box "
                         "around it")
    return masks


__all__ = ["Segmenter", "Selection", "GrabCutSegmenter", "SamSegmenter", "TextSegmenter", "load_segmenter",
           "load_text_segmenter", "shared_text_segmenter", "describe", "select_by_text", "select_mask", "DEFAULT_CLIPSEG",
           "DEMO_TEXT_SEGMENTER", "TEXT_SEGMENTER_ENV",
           "parse_points", "parse_box", "box_from_corners", "grow", "grow_values", "invert", "fill_holes",
           "drop_specks", "snap", "DEFAULT_SAM", "SEGMENTER_ENV"]
