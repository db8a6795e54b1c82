"""Outpainting against inpainting on the demo model: do shapes asked for in an extended canvas adhere as well
as shapes asked for in a region of the picture?

    HF_HUB_OFFLINE=1 python -m bench.outpaint --n 40

For each held-out edit case (blended_dev/scenes.py, seeds no other bench uses) the scene's right strip of STRIP px is
  inpaint:  masked on the whole scene (the picture's own content there is replaced), and
  outpaint: cut off, then added back by the app's Extend the canvas (blurred edge colours, ui/editing.py),
with the same prompt, mask, seed and default settings (4 candidates, ranked). Reported: the top-1 candidate
shows the asked colour and shape in the mask (blended_dev/analyse.py), any candidate does, and the share of all
candidates that do. The standard edit cases (an object-sized box or ellipse inside the scene) are the reference.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from blended_dev import scenes
from blended_dev.analyse import analyse_region

STRIP = 28  # px of the 64 px scene: wide enough for an object of the demo world (22-36 px)
SEED0 = scenes.HELDOUT_SEED_START + 90_000


def run(editor, n: int) -> dict:
    from ui.editing import extend_canvas

    rows = {"inpaint (strip)": [], "outpaint (strip)": [], "inpaint (object box)": []}
    t0 = time.time()
    for i in range(n):
        image, box_mask, prompt, colour, shape = scenes.make_edit_case(SEED0 + i)
        h, w = image.shape[:2]
        strip = np.zeros((h, w), bool)
        strip[:, w - STRIP:] = True
        cut, layer = extend_canvas(Image.fromarray(image[:, :w - STRIP]), [], {"right": STRIP})
        grown = np.asarray(layer.getchannel("A")) > 0
        assert grown.shape == strip.shape and (grown == strip).all()
        cases = {"inpaint (strip)": (Image.fromarray(image), strip),
                 "outpaint (strip)": (cut, strip),
                 "inpaint (object box)": (Image.fromarray(image), box_mask)}
        for name, (src, mask) in cases.items():
            res = editor.edit(src, Image.fromarray(mask), prompt, seed=SEED0 + i)
            found = [analyse_region(np.asarray(c.image.convert("RGB")), mask) == (colour, shape)
                     for c in res.candidates]
            rows[name].append(found)
    print(f"{3 * n} edits in {time.time() - t0:.0f} s\n")
    print("| case | top-1 hit | any candidate | all candidates | n |")
    print("|---|---|---|---|---|")
    out = {}
    for name, found in rows.items():
        top1 = float(np.mean([f[0] for f in found]))
        anyc = float(np.mean([any(f) for f in found]))
        allc = float(np.mean([x for f in found for x in f]))
        out[name] = (top1, anyc, allc)
        print(f"| {name} | {top1:.3f} | {anyc:.3f} | {allc:.3f} | {len(found)} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from blended import Editor

    run(Editor.load("demo"), args.n)


if __name__ == "__main__":
    main()
