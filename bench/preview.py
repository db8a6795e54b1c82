"""What live previews cost: the same edit with and without the `preview` hook, interleaved, median of repeats.

    HF_HUB_OFFLINE=1 python -m bench.preview --repeats 7

On the demo model (its tiny UNet makes the relative cost the largest of any model) at the app's rate (a preview
every steps/10 steps) and at every step, plus the cost of one preview at Stable Diffusion's shapes
(4 candidates of 64x64 latents -> 256 px) and of fitting the latent -> RGB map (once per VAE).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch
from PIL import Image

from blended_dev import ROOT


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from blended import Editor
    from blended.preview import Previewer, latent_rgb_map

    editor = Editor.load("demo", ranker=None)
    ex = ROOT / "assets" / "examples"
    image = Image.open(ex / "scene-red-circle.png").convert("RGB")
    mask = Image.open(ex / "scene-red-circle-mask.png").getchannel("A")
    steps = editor.defaults.num_inference_steps
    runs = {"no preview": None, f"every {max(1, steps // 10)} steps (the app)": max(1, steps // 10),
            "every step": 1}
    times = {k: [] for k in runs}
    counts = {}
    editor.edit(image, mask, "a red circle", seed=0, preview=lambda *a: None)  # warm-up, fits the map
    for _ in range(args.repeats):
        for name, every in runs.items():
            n = [0]
            hook = None if every is None else (lambda d, t, ims, n=n: n.__setitem__(0, n[0] + 1))
            start = time.perf_counter()
            editor.edit(image, mask, "a red circle", seed=0, preview=hook, preview_every=every or 1)
            times[name].append(time.perf_counter() - start)
            counts[name] = n[0]
    base = statistics.median(times["no preview"])
    print(f"demo model, {editor.defaults.num_candidates} candidates x {steps} steps, {args.threads} thread(s), "
          f"median of {args.repeats}\n")
    print("| previews | per edit | previews made | extra time |")
    print("|---|---|---|---|")
    for name in runs:
        med = statistics.median(times[name])
        print(f"| {name} | {med:.3f} s | {counts[name]} | {100 * (med / base - 1):+.1f}% |")

    # the time spent inside the previews themselves (robust to a busy machine): x0 -> RGB -> images
    import blended.preview as bp

    spent = [0.0]
    original = bp.Previewer.__call__

    def timed(self, x0):
        start = time.perf_counter()
        out = original(self, x0)
        spent[0] += time.perf_counter() - start
        return out

    bp.Previewer.__call__ = timed
    shares = []
    for _ in range(args.repeats):
        spent[0] = 0.0
        start = time.perf_counter()
        editor.edit(image, mask, "a red circle", seed=0, preview=lambda *a: None, preview_every=max(1, steps // 10))
        shares.append(spent[0] / (time.perf_counter() - start))
    bp.Previewer.__call__ = original
    print(f"\ntime inside the previews at the app's rate: {100 * statistics.median(shares):.2f}% of the edit "
          f"(median of {args.repeats})")

    # one preview at SD shapes, and the map fit
    p = Previewer(torch.randn(5, 3), Image.new("RGB", (512, 512)), np.ones((512, 512), bool))
    x0 = torch.randn(4, 4, 64, 64)
    p(x0)
    start = time.perf_counter()
    for _ in range(10):
        p(x0)
    per = (time.perf_counter() - start) / 10
    m = editor.model
    fresh = copy.deepcopy(m.pipe.vae)  # the map is cached per VAE object: a copy is fitted anew, like a new model
    start = time.perf_counter()
    with torch.no_grad():
        latent_rgb_map(fresh, m.encode, m.vae_scale_factor)
    fit = time.perf_counter() - start
    print(f"\none preview of 4 candidates at SD 512 px shapes (64x64 latents -> 256 px): {1000 * per:.1f} ms; "
          f"fitting the map on the demo VAE (once): {1000 * fit:.0f} ms")


if __name__ == "__main__":
    main()
