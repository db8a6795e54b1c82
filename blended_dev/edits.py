"""How the benches score edits of the demo world: PSNR outside the mask, seam errors, the analyser's hits over
candidates, paired differences between two settings, thin-stroke edit cases."""

from __future__ import annotations

import math
import statistics
import time

import numpy as np
from PIL import Image

from . import scenes
from .analyse import analyse_region

FEWSTEP_BASE = scenes.HELDOUT_SEED_START + 900_000  # bench/fewstep.py's held-out edits (decoder_fast.py reuses them)


def psnr_outside(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB) of the pixels outside `mask`."""
    keep = ~mask
    mse = float(((a.astype(np.float64)[keep] - b.astype(np.float64)[keep]) ** 2).mean())
    return 10 * math.log10(255.0**2 / max(mse, 1e-10))


def seam_error(out: np.ndarray, src: np.ndarray, mask: np.ndarray) -> float:
    """Mean |gradient jump| across the mask border: the result's gradient minus the source's, on the
    ring of pixels just outside the mask (0 = the border is as smooth as the source's own)."""
    import cv2

    ring = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & ~mask
    def grad(a):
        g = a.astype(np.float32)
        return np.abs(np.diff(g, axis=0, append=g[-1:])) + np.abs(np.diff(g, axis=1, append=g[:, -1:]))
    return float(np.abs(grad(out) - grad(src))[ring].mean()) if ring.any() else 0.0


def band_seam(out: np.ndarray, src: np.ndarray, mask: np.ndarray, width: int = 8) -> float:
    """Mean |gradient jump| over the band of pixels within `width` px outside the mask (soft transitions
    spread there)."""
    import cv2

    dist = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, 3)
    band = (dist > 0) & (dist <= width)
    g = lambda a: (np.abs(np.diff(a.astype(np.float32), axis=0, append=a[-1:].astype(np.float32)))  # noqa: E731
                   + np.abs(np.diff(a.astype(np.float32), axis=1, append=a[:, -1:].astype(np.float32))))
    return float(np.abs(g(out) - g(src))[band].mean()) if band.any() else 0.0


def thin_case(seed: int):
    """A scene with a thin stroke mask (4 to 8 px wide: 1 to 2 latents at x4) and a colour to draw there."""
    rng = np.random.default_rng([seed, 11])
    image, _, _, _, _ = scenes.make_edit_case(seed)
    mask = np.zeros(image.shape[:2], bool)
    width = int(rng.integers(4, 9))
    if rng.random() < 0.5:
        y = int(rng.integers(8, 56 - width))
        mask[y:y + width, 8:56] = True
    else:
        x = int(rng.integers(8, 56 - width))
        mask[8:56, x:x + width] = True
    colour = list(scenes.COLOURS)[int(rng.integers(len(scenes.COLOURS)))]
    return image, mask, f"a {colour} square", colour


def evaluate(edit_fn, cases) -> dict:
    """edit_fn(image, case) -> candidates best first; per case the asked colour (and shape) in the hard mask."""
    rows = []
    for case in cases:
        image, mask, prompt, colour, shape = case
        t = time.perf_counter()
        ims = edit_fn(image, case)
        dt = time.perf_counter() - t
        def hit(im, grow=2):  # grow 0: the asked pixels alone
            c, s = analyse_region(np.asarray(im), mask, grow=grow)
            return c == colour and (shape is None or s == shape)
        hits = [hit(im) for im in ims]
        top = np.asarray(ims[0])
        rows.append(dict(top=hits[0], strict=hit(ims[0], grow=0), mean=float(np.mean(hits)),
                         psnr=psnr_outside(top, image, mask),
                         seam=seam_error(top, image, mask), band=band_seam(top, image, mask), seconds=dt))
    return dict(top=float(np.mean([r["top"] for r in rows])), mean=float(np.mean([r["mean"] for r in rows])),
                tops="".join("1" if r["top"] else "0" for r in rows),  # per edit, for paired comparisons
                strict=float(np.mean([r["strict"] for r in rows])),
                stricts="".join("1" if r["strict"] else "0" for r in rows),
                psnr=float(statistics.median([r["psnr"] for r in rows])),
                seam=float(np.mean([r["seam"] for r in rows])), band=float(np.mean([r["band"] for r in rows])),
                seconds=float(statistics.median([r["seconds"] for r in rows])), n=len(rows))


def paired(a: dict, b: dict, key: str = "tops") -> str:
    """b's top-1 minus a's on the same edits, with a 95 % interval (normal approximation of the paired
    difference): "-0.012 (-0.03 to 0.01)"; "-" when a row lacks per-edit results. `key`: "tops" (the
    judge's 2 px of grace around the mask) or "stricts" (the asked pixels alone)."""
    if key not in a or key not in b or len(a[key]) != len(b[key]):
        return "-"
    d = np.array([int(y) - int(x) for x, y in zip(a[key], b[key])], dtype=np.float64)
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0
    return f"{d.mean():+.3f} ({d.mean() - half:+.3f} to {d.mean() + half:+.3f})"


def engine_fn(editor, mask_image=None, **settings):
    """An `evaluate` edit function: the engine's edit of a case with `settings`; `mask_image(mask)` makes the
    mask picture (default: the hard mask, white = edit)."""
    def edit(image, case):
        _, mask, prompt, _, _ = case
        m = mask_image(mask) if mask_image else Image.fromarray(mask.astype(np.uint8) * 255)
        return editor.edit(Image.fromarray(image), m, prompt, **settings).images
    return edit
