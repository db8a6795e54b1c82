"""Mask tools on (H, W) bool masks (True = edit): grow / shrink, invert, fill holes, drop specks, snap to edges."""

from __future__ import annotations

import numpy as np

MAX_GROW = 256  # pixels a mask may grow or shrink by in one call
SNAP_BAND = 0.04  # snap: the stroke may grow by this fraction of the image's shorter side (at least 3 px) ...
SNAP_RING = 2.0  # ... and beyond SNAP_RING bands around the stroke everything is certain background
GRABCUT_ITERATIONS = 5  # cv2.grabCut iterations per call (OpenCV's examples use 5)


def _disk(radius: int) -> np.ndarray:
    import cv2

    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def grow(mask: np.ndarray, px: int) -> np.ndarray:
    """`mask` grown by `px` pixels (Euclidean distance), or shrunk by -`px` when negative."""
    import cv2

    px = int(px)
    if abs(px) > MAX_GROW:
        raise ValueError(f"grow by at most {MAX_GROW} pixels either way, not {px}")
    m = np.asarray(mask, bool)
    if px == 0:
        return m.copy()
    inside = m if px < 0 else ~m  # distance to the other side
    dist = cv2.distanceTransform(inside.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return (dist > -px) if px < 0 else (m | (dist <= px))


def grow_values(values: np.ndarray, px: int) -> np.ndarray:
    """Grey-level (H, W) edit strengths in [0, 1] grown (max filter over a disk) or shrunk (min filter) by `px`;
    a hard mask gives exactly `grow`'s result."""
    import cv2

    px = int(px)
    if px == 0:
        return np.asarray(values, np.float32)
    v = np.asarray(values, np.float32)
    if not ((v == 0) | (v == 1)).all():  # soft: grey-level morphology over a disk
        op = cv2.dilate if px > 0 else cv2.erode
        return op(v, _disk(abs(px)), borderType=cv2.BORDER_REPLICATE)
    return grow(v > 0.5, px).astype(np.float32)


def invert(mask: np.ndarray) -> np.ndarray:
    return ~np.asarray(mask, bool)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """`mask` with every region of False pixels that does not touch the image's border filled."""
    import cv2

    m = np.asarray(mask, bool)
    outside = np.pad(~m, 1, constant_values=True).astype(np.uint8)
    n, labels = cv2.connectedComponents(outside, connectivity=4)
    return m | (labels[1:-1, 1:-1] != labels[0, 0])


def drop_specks(mask: np.ndarray, min_area: int = 0) -> np.ndarray:
    """`mask` without its connected parts smaller than `min_area` pixels (0 = 0.1 % of the image, at least 4);
    the largest part always stays."""
    import cv2

    m = np.asarray(mask, bool)
    if not m.any():
        return m.copy()
    min_area = min_area or max(4, m.size // 1000)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.zeros(n, bool)
    keep[1:] = areas >= min_area
    keep[1 + int(areas.argmax())] = True
    return keep[labels]


def touching(mask: np.ndarray, points: list[tuple[int, int]]) -> np.ndarray:
    """The connected parts (8-connected) of `mask` that contain one of `points` (x, y)."""
    import cv2

    m = np.asarray(mask, bool)
    n, labels = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)
    hit = {int(labels[y, x]) for x, y in points} - {0}
    return np.isin(labels, list(hit))


def grabcut(image: np.ndarray, init: np.ndarray, iterations: int = 0) -> np.ndarray:
    """cv2.grabCut from a label map (cv2.GC_BGD / GC_FGD / GC_PR_BGD / GC_PR_FGD per pixel) on an (H, W, 3)
    uint8 RGB image; returns the (H, W) bool foreground. A map without any background or foreground label
    returns its probable foreground as it is (GrabCut needs both to fit its colour models). `iterations`
    0 = GRABCUT_ITERATIONS."""
    import cv2

    labels = np.ascontiguousarray(init, np.uint8)
    fg = (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)
    if fg.all() or not fg.any():
        return fg
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    bgr = np.ascontiguousarray(image[..., ::-1])
    cv2.setRNGSeed(0)  # GrabCut's k-means starts from OpenCV's (per-thread) generator: the same input, the same mask
    cv2.grabCut(bgr, labels, None, bgd, fgd, iterations or GRABCUT_ITERATIONS, cv2.GC_INIT_WITH_MASK)
    return (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)


def snap(image: np.ndarray, stroke: np.ndarray, band: int = 0, work_side: int = 384) -> np.ndarray:
    """Snap a rough brush stroke to the edges of what it covers (GrabCut): the stroke is probable foreground,
    a band of `band` px around it (0 = `SNAP_BAND` of the shorter side) probable background, and beyond the
    band's ring everything certain background. The result stays within the band; with nothing to separate
    (a stroke over the whole image) the stroke comes back unchanged. GrabCut runs on the ring's bounding box,
    scaled so its longer side is at most `work_side` px.

    Args:
        image: (H, W, 3) uint8 RGB.
        stroke: (H, W) bool, True where painted.
    """
    import cv2

    s = np.asarray(stroke, bool)
    if not s.any():
        return s.copy()
    band = band or max(3, int(round(SNAP_BAND * min(s.shape))))
    near = grow(s, band)
    ring = grow(s, int(round(band * SNAP_RING)))
    ys, xs = np.nonzero(ring)
    t, b, l, r = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    init = np.full(s.shape, cv2.GC_BGD, np.uint8)
    init[ring] = cv2.GC_PR_BGD
    init[s] = cv2.GC_PR_FGD
    init = init[t:b, l:r]
    if not (init == cv2.GC_BGD).any():  # the ring covers the image: its border is the background
        init[[0, -1], :] = cv2.GC_BGD
        init[:, [0, -1]] = cv2.GC_BGD
        init[s[t:b, l:r] & (init == cv2.GC_BGD)] = cv2.GC_PR_FGD
    crop = np.asarray(image, np.uint8)[t:b, l:r]
    scale = min(1.0, work_side / max(crop.shape[:2]))
    if scale < 1.0:
        size = (max(1, round((r - l) * scale)), max(1, round((b - t) * scale)))
        crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
        init = cv2.resize(init, size, interpolation=cv2.INTER_NEAREST)
    cut = grabcut(crop, init)
    if scale < 1.0:
        cut = cv2.resize(cut.astype(np.float32), (r - l, b - t), interpolation=cv2.INTER_LINEAR) >= 0.5
    out = np.zeros_like(s)
    out[t:b, l:r] = cut
    out &= near
    return out if out.any() else s.copy()
