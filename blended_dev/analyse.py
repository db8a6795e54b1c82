"""A simple colour / shape analyser for the demo world (scenes.py).

Backgrounds of the demo world only use muted colours, objects one of six saturated palette
colours (or near-white / near-black). So:

* a pixel belongs to an object colour when it is within ``COLOUR_RADIUS`` (RGB distance) of a
  palette colour, else it is background;
* the object is the largest 8-connected component of pixels of one palette colour;
* its shape is the template (circle, square, upright triangle) drawn into the component's
  bounding box that overlaps it best (IoU).

``analyse_region(image, mask)`` answers "what object is inside this mask" for edit evaluation;
``analyse_image(image)`` answers it for the whole image (text-to-image evaluation).
The analyser's own accuracy on ground-truth scenes is reported by bench/demo_eval.py.
"""
from __future__ import annotations

import cv2
import numpy as np

from . import scenes

COLOUR_NAMES = list(scenes.COLOURS)
PALETTE = np.array([scenes.COLOURS[c] for c in COLOUR_NAMES], np.float32)
COLOUR_RADIUS = 55.0
MIN_PIXELS = 24


def _to_uint8(image) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype != np.uint8:
        a = np.clip(np.round(a.astype(np.float32) * (255.0 if a.max() <= 1.0 else 1.0)), 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    return a[..., :3]


def colour_labels(image) -> np.ndarray:
    """(H, W) int: index into COLOUR_NAMES of each pixel, -1 for background-like pixels."""
    a = _to_uint8(image).astype(np.float32)
    d = np.linalg.norm(a[:, :, None, :] - PALETTE[None, None], axis=-1)
    lab = d.argmin(-1)
    lab[d.min(-1) > COLOUR_RADIUS] = -1
    return lab


def shape_of(component: np.ndarray) -> str:
    """Best-matching template shape for a boolean component mask."""
    ys, xs = np.nonzero(component)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    best, best_iou = "square", -1.0
    for shape in scenes.SHAPES:
        t = scenes.shape_alpha(shape, box) > 0.5
        inter = np.logical_and(t, component).sum()
        union = np.logical_or(t, component).sum()
        iou = inter / max(union, 1)
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def largest_object(image, region: np.ndarray | None = None):
    """(colour, shape, component mask) of the largest single-colour blob, or (None, None, None)."""
    lab = colour_labels(image)
    if region is not None:
        lab = np.where(region, lab, -1)
    best = (0, None, None)
    for ci in np.unique(lab):
        if ci < 0:
            continue
        m = (lab == ci).astype(np.uint8)
        # close one-pixel holes left by shading or anti-aliasing
        m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
        if region is not None:
            m &= region.astype(np.uint8)
        n, comp, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
        for k in range(1, n):
            area = int(stats[k, cv2.CC_STAT_AREA])
            if area > best[0]:
                best = (area, int(ci), comp == k)
    if best[0] < MIN_PIXELS:
        return None, None, None
    _, ci, comp = best
    return COLOUR_NAMES[ci], shape_of(comp), comp


def analyse_image(image) -> tuple[str | None, str | None]:
    """(colour, shape) of the largest object of the whole image."""
    c, s, _ = largest_object(image)
    return c, s


def analyse_region(image, mask, grow: int = 2) -> tuple[str | None, str | None]:
    """(colour, shape) of the largest object inside ``mask`` (bool HxW), grown by ``grow`` px.

    A component that touches the edge of the region is still judged on its inside part.
    Returns (None, None) when no object of a palette colour is there.
    """
    m = np.asarray(mask).astype(bool)
    if grow > 0:
        m = cv2.dilate(m.astype(np.uint8), np.ones((2 * grow + 1, 2 * grow + 1), np.uint8)).astype(bool)
    c, s, _ = largest_object(image, m)
    return c, s
