"""GrabCut (Rother et al. 2004, OpenCV) from clicks or a box: the selection that needs no weights."""

from __future__ import annotations

import numpy as np

from .prompts import Selection
from .tools import grabcut, touching

WORK_SIDE = 512  # GrabCut runs on the image scaled so its longer side is at most this (pixels); masks come back at full size
CLICK_FG = 0.01  # a positive click marks a disk of this fraction of the shorter side (at least 2 px) certain foreground ...
CLICK_NEAR = 0.15  # ... and one of this fraction probable foreground (picked on demo scenes apart from bench/selection.py's);
BOX_MARGIN = 0.1  # with a box, GrabCut works on the box and this fraction of its longer side around it (at least 8 px)
# a negative click marks a CLICK_FG disk certain background and a CLICK_NEAR disk probable background


def scaled(image: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    """(H, W, 3) image scaled down (area) so its longer side is at most `side`; the scale factor (<= 1)."""
    import cv2

    h, w = image.shape[:2]
    scale = min(1.0, side / max(h, w))
    if scale == 1.0:
        return image, 1.0
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), scale


def upscaled(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A work-size bool mask back at (w, h), its edge smooth (bilinear, then the half-way level)."""
    import cv2

    if mask.shape[::-1] == tuple(size):
        return mask
    return cv2.resize(mask.astype(np.float32), tuple(size), interpolation=cv2.INTER_LINEAR) >= 0.5


def at_scale(points, scale: float, shape: tuple[int, int]) -> list[tuple[int, int]]:
    """Image-pixel points (x, y) on the work-size image of `shape` (h, w)."""
    return [(min(int(x * scale), shape[1] - 1), min(int(y * scale), shape[0] - 1)) for x, y in points]


def init_labels(shape: tuple[int, int], sel: Selection, scale: float) -> np.ndarray:
    """GrabCut's label map (H, W) for a selection at `scale`: outside a box certain background, inside probable
    foreground; without a box all probable background with a probable-foreground disk around each positive
    click; a probable-background disk around each negative click; certain foreground / background disks under
    the clicks themselves."""
    import cv2

    h, w = shape
    near, r = max(2, round(CLICK_NEAR * min(h, w))), max(2, round(CLICK_FG * min(h, w)))
    if sel.box is not None:
        labels = np.full(shape, cv2.GC_BGD, np.uint8)
        l, t, rt, b = (int(round(v * scale)) for v in sel.box)
        labels[t:max(b, t + 1), l:max(rt, l + 1)] = cv2.GC_PR_FGD
    else:
        labels = np.full(shape, cv2.GC_PR_BGD, np.uint8)
        for p in at_scale(sel.positive, scale, shape):
            cv2.circle(labels, p, near, int(cv2.GC_PR_FGD), -1)
    for p in at_scale(sel.negative, scale, shape):
        around = np.zeros(shape, np.uint8)
        cv2.circle(around, p, near, 1, -1)
        labels[(around > 0) & (labels == cv2.GC_PR_FGD)] = cv2.GC_PR_BGD
    for p, label in zip(at_scale(sel.points, scale, shape), sel.labels):
        cv2.circle(labels, p, r, int(cv2.GC_FGD if label == 1 else cv2.GC_BGD), -1)
    return labels


class GrabCutSegmenter:
    """Selection by colour models: no weights, about half a second per click at WORK_SIDE px on a CPU."""

    name = "grabcut"
    multimask = False  # one mask per selection (the multi-mask ranking grows it instead)

    def __init__(self, work_side: int = WORK_SIDE):
        self.work_side = work_side

    def __repr__(self) -> str:
        return "GrabCut (OpenCV, no weights)"

    def select(self, image: np.ndarray, selection: Selection, num_masks: int = 1) -> list[np.ndarray]:
        """One (H, W) bool mask for `selection` (checked) on the (H, W, 3) uint8 RGB `image` (empty when GrabCut
        keeps no more than the clicked dots). With a box, GrabCut sees only the box and a margin of BOX_MARGIN
        of its size around it."""
        import cv2

        h, w = image.shape[:2]
        selection.check((w, h))
        l, t, r, b = 0, 0, w, h
        if selection.box is not None:
            bl, bt, br, bb = selection.box
            m = max(8, round(BOX_MARGIN * max(br - bl, bb - bt)))
            l, t, r, b = max(0, bl - m), max(0, bt - m), min(w, br + m), min(h, bb + m)
        local = Selection(tuple((min(max(x - l, 0), r - l - 1), min(max(y - t, 0), b - t - 1))
                                for x, y in selection.points), selection.labels,
                          None if selection.box is None else (bl - l, bt - t, br - l, bb - t))
        small, scale = scaled(image[t:b, l:r], self.work_side)
        labels = init_labels(small.shape[:2], local, scale)
        mask = grabcut(small, labels)
        shape = small.shape[:2]
        if local.positive:  # the clicked object, not every patch of its colour
            mask &= touching(mask, at_scale(local.positive, scale, shape))
        if local.negative:  # and no part that holds a negative click
            mask &= ~touching(mask, at_scale(local.negative, scale, shape))
        if local.box is None and mask.sum() <= 2 * (labels == cv2.GC_FGD).sum():
            mask[:] = False  # only the clicked dots themselves: nothing found around them
        out = np.zeros((h, w), bool)
        out[t:b, l:r] = upscaled(mask, (r - l, b - t))
        return [out]
