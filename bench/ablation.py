"""The blend loop against the paper's official code, one difference at a time, and soft masks (issue 13).

Sections (demo model, held-out seeds no other bench uses):

  loop   the official SD2 script's loop (blended_dev/official.py), the project's default, and the default with
         one difference at a time: start, background noise, background timestep, mask downsampling,
         progressive shrinking, core_steps; background "none" (the raw decode, as the script), so PSNR
         and seam measure the loop itself
  soft   soft masks: mask_blur 0 / 4 / 8 / 16 px in the final composite alone (the default) or also in the
         loop (`soft_mask`, Differential Diffusion), grey-level masks, with and without shrinking and
         core_steps, with the default background; a picture strip of one edit at blur 0, 8, 16
  fade   the final composite's weights outside the mask (linear feather, mask_blur's outward Gaussian, a
         half Gaussian that starts at 1 on the edge) over the same candidates: what the pixels just outside
         the mask do to the judge and to the seam
  tune   the model's recommended settings (guidance, core_steps, steps, scheduler) on a validation range of
         seeds that neither other section nor any other bench uses: how blended.json's values were picked

    python -m bench.ablation --threads 1                 # ~1 h on one core, writes docs/bench/ablation.md
    python -m bench.ablation --quick                     # smoke test
    python -m bench.ablation --sections soft --n 80      # one section
    python -m bench.ablation --sections tune --rows "guidance 7.5"   # some rows of a section

Rows are cached in docs/bench/ablation.json under keys that name the model's defaults they ran with, so
two processes can share the work (`--rows`) and the tables can be rewritten from the cache alone.

Metrics: top-1 hit (the ranker's first of 4 candidates shows the asked colour and shape inside the mask),
random-candidate hit (share of all candidates that do: what a 1-candidate edit gets), median PSNR outside the
mask, seam error (mean |gradient jump| on the ring just outside the mask, blended_dev/edits.py), the same on a band
of 8 px outside the mask, and thin masks (4-8 px strokes, colour only). The judge (blended_dev/analyse.py) looks
at the mask grown by 2 px, since objects drawn by the loop reach a little past it; the soft and fade
sections also judge the top-1 on the asked pixels alone (which a soft edge in the composite alone leaves as they are).
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import numpy as np
import torch
from PIL import Image

from blended.images import composite, seam_weights
from blended.masks import strength_map
from blended_dev import ROOT, scenes
from blended_dev.bench import table, write_doc
from blended_dev.edits import engine_fn, evaluate, paired, thin_case
from blended_dev.official import official_edit

BASE = scenes.HELDOUT_SEED_START + 700_000  # apart from quality.py (+500k) and demo_eval.py (+0..50k)
TUNE_BASE = scenes.HELDOUT_SEED_START + 800_000  # validation seeds: the defaults were picked here, judged at BASE
CACHE = ROOT / "docs" / "bench" / "ablation.json"


def grey_mask(mask: np.ndarray, ramp: int = 6) -> np.ndarray:
    """A grey-level version of a hard mask: 1 deep inside, falling linearly to 0 over `ramp` px inside its edge."""
    import cv2

    dist = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
    return np.clip(dist / ramp, 0.0, 1.0).astype(np.float32)


def official_fn(editor):
    d = editor.defaults
    def edit(image, case):
        _, mask, prompt, _, _ = case
        return official_edit(editor, Image.fromarray(image), mask, prompt, num_candidates=d.num_candidates,
                             num_inference_steps=d.num_inference_steps, guidance_scale=d.guidance_scale,
                             blend_start=d.blend_start, seed=d.seed)
    return edit


SAVE = [True]  # --quick writes nothing
ONLY_CACHED = [False]  # --cached-only: rows not measured yet are left out


def cached(cache: dict, key: str, make) -> dict:
    if key not in cache and ONLY_CACHED[0]:
        return {}
    if key not in cache:
        cache[key] = make()
        if SAVE[0]:  # merge with rows other processes wrote meanwhile (run sections in parallel with --rows)
            on_disk = json.loads(CACHE.read_text()) if CACHE.exists() else {}
            CACHE.write_text(json.dumps({**on_disk, **cache}, indent=1, sort_keys=True) + "\n")
        print(key, cache[key], flush=True)
    return cache[key]


LOOP_ROWS = [  # (label, settings over the model's defaults (None = the official script's loop), thin masks too)
    ("official script's loop (bench/official.py)", None, True),  # now blended_dev/official.py; the label keys cached rows
    ("previous default (fixed noise, next timestep)", dict(background_noise="fixed", background_timestep="next"), True),
    ("start: pure noise", dict(start_from="noise", background_noise="fixed", background_timestep="next"), False),
    ("background noise: fresh each step", dict(background_noise="fresh", background_timestep="next"), False),
    ("background timestep: own", dict(background_noise="fixed", background_timestep="own"), False),
    ("fresh noise + own timestep = the new default", dict(background_noise="fresh", background_timestep="own"), True),
    ("mask downsampling: nearest", dict(latent_mask_mode="nearest", background_noise="fixed", background_timestep="next"), True),
    ("mask downsampling: core", dict(latent_mask_mode="core", background_noise="fixed", background_timestep="next"), False),
    ("progressive shrinking off", dict(shrink=False, background_noise="fixed", background_timestep="next"), True),
    ("core_steps 0", dict(core_steps=0.0, background_noise="fixed", background_timestep="next"), True),
    ("fresh noise + own timestep + shrinking off", dict(background_noise="fresh", background_timestep="own", shrink=False),
     True),
]  # the engine set up like the script (OFFICIAL_SETTINGS) computes the port's numbers: tests/test_loop.py

def symmetric_blur(mask: np.ndarray, blur: float) -> Image.Image:
    """A1111's mask blur (a Gaussian over both sides of the edge) as a grey-level mask, for `soft_mask`."""
    import cv2

    k = 2 * int(2.5 * blur + 0.5) + 1
    s = cv2.GaussianBlur(mask.astype(np.float32), (k, k), blur, borderType=cv2.BORDER_REPLICATE)
    return Image.fromarray((np.clip(s, 0, 1) * 255).round().astype(np.uint8))


def grey_image(mask: np.ndarray) -> Image.Image:
    return Image.fromarray((grey_mask(mask) * 255).round().astype(np.uint8))


SOFT_ROWS = [  # (label, settings, mask_image(mask) or None)
    ("hard mask, blur 0 (default)", {}, None),
    ("mask_blur 4: the composite (default use)", dict(mask_blur=4.0), None),
    ("mask_blur 8: the composite", dict(mask_blur=8.0), None),
    ("mask_blur 16: the composite", dict(mask_blur=16.0), None),
    ("mask_blur 4 + soft_mask: the loop too", dict(mask_blur=4.0, soft_mask=True), None),
    ("mask_blur 8 + soft_mask: the loop too", dict(mask_blur=8.0, soft_mask=True), None),
    ("mask_blur 16 + soft_mask: the loop too", dict(mask_blur=16.0, soft_mask=True), None),
    ("mask_blur 8 + soft_mask, shrinking off", dict(mask_blur=8.0, soft_mask=True, shrink=False), None),
    ("mask_blur 8 + soft_mask, core_steps 0", dict(mask_blur=8.0, soft_mask=True, core_steps=0.0), None),
    ("symmetric blur 8 (A1111's), grey mask, soft_mask", dict(soft_mask=True), lambda m: symmetric_blur(m, 8.0)),
    ("grey-level mask (6 px ramp inside), soft_mask", dict(soft_mask=True), grey_image),
    ("grey-level mask, thresholded (soft_mask off)", {}, grey_image),
]


def half_gaussian(mask: np.ndarray, sigma: float) -> np.ndarray:
    """Weights 1 inside the mask and exp(-d^2 / 2 sigma^2) at d px outside it, 0 beyond 3 sigma: a fade that
    starts at full strength on the mask's edge (the alternative to `strength_map`'s 0.5 there)."""
    import cv2

    d = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return np.where(d > 3 * sigma, 0.0, np.exp(-d * d / (2 * sigma * sigma))).astype(np.float32)


FADE_ROWS = [  # (label, mask -> weights of the edit in the final composite), on the same candidates
    ("linear feather 8 px (a hard mask's default seam band)", lambda m: seam_weights(m, 8)),
    ("linear feather 4 px", lambda m: seam_weights(m, 4)),
    ("linear feather 2 px", lambda m: seam_weights(m, 2)),
    ("mask_blur 2 (outward Gaussian blur: 0.5 on the edge)", lambda m: strength_map(m, 2.0)),
    ("mask_blur 4", lambda m: strength_map(m, 4.0)),
    ("mask_blur 8", lambda m: strength_map(m, 8.0)),
    ("half Gaussian sigma 2 (1 on the edge)", lambda m: half_gaussian(m, 2.0)),
    ("half Gaussian sigma 4", lambda m: half_gaussian(m, 4.0)),
]


def fade_fn(editor, weights, raw: dict):
    """The final composite with other `weights` over the same candidates: each case is edited once
    (background "none": the raw decode of the whole demo scene, which `stitch` composites), then composited
    and ranked as `Editor.edit` does."""
    def edit(image, case):
        _, mask, prompt, _, _ = case
        key = (image.tobytes(), mask.tobytes(), prompt)
        if key not in raw:
            r = editor.edit(Image.fromarray(image), Image.fromarray(mask.astype(np.uint8) * 255), prompt,
                            background="none")
            assert r.region.whole, "the fade section needs scenes edited whole"
            raw[key] = (r.region, r.images)
        region, decodes = raw[key]
        w = weights(mask)
        ims = [composite(Image.fromarray(image), im, region, w) for im in decodes]
        scores = editor.ranker.score(ims, mask, prompt)
        order = sorted(range(len(ims)), key=lambda i: -scores[i]["score"])
        return [ims[i] for i in order]
    return edit


TUNE_ROWS = [  # (label, settings): absolute values of what blended.json recommends, so rows keep their meaning
    ("guidance 5, core_steps 0.5 (the previous recommendation)", dict(guidance_scale=5.0, core_steps=0.5)),
    ("guidance 3", dict(guidance_scale=3.0, core_steps=0.5)),
    ("guidance 7.5", dict(guidance_scale=7.5, core_steps=0.5)),
    ("guidance 10", dict(guidance_scale=10.0, core_steps=0.5)),
    ("core_steps 0.3", dict(guidance_scale=5.0, core_steps=0.3)),
    ("core_steps 0.7", dict(guidance_scale=5.0, core_steps=0.7)),
    ("30 steps", dict(guidance_scale=5.0, core_steps=0.5, num_inference_steps=30)),
    ("50 steps", dict(guidance_scale=5.0, core_steps=0.5, num_inference_steps=50)),
    ("shrinking off", dict(guidance_scale=5.0, core_steps=0.5, shrink=False)),
    ("start: pure noise", dict(guidance_scale=5.0, core_steps=0.5, start_from="noise")),
    ("scheduler dpm++", dict(guidance_scale=5.0, core_steps=0.5, scheduler="dpm++")),
    ("scheduler euler", dict(guidance_scale=5.0, core_steps=0.5, scheduler="euler")),
    ("guidance 7.5, core_steps 0.6", dict(guidance_scale=7.5, core_steps=0.6)),
    ("guidance 7.5, core_steps 0.7 (adopted)", dict(guidance_scale=7.5, core_steps=0.7)),
    ("guidance 10, core_steps 0.7", dict(guidance_scale=10.0, core_steps=0.7)),
    ("guidance 7.5, scheduler dpm++", dict(guidance_scale=7.5, core_steps=0.5, scheduler="dpm++")),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=160, help="held-out edits per row of the loop section (and half as many thin masks)")
    ap.add_argument("--n-soft", type=int, default=480, help="held-out edits per row of the soft section")
    ap.add_argument("--n-tune", type=int, default=160, help="validation edits per row of the tune section")
    ap.add_argument("--sections", default="loop,soft,fade,tune")
    ap.add_argument("--rows", default=None, help="only rows whose label matches one of these comma-separated regexes")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fresh", action="store_true", help="ignore the cached rows in docs/bench/ablation.json")
    ap.add_argument("--cached-only", action="store_true", help="write the tables from docs/bench/ablation.json alone")
    args = ap.parse_args()
    ONLY_CACHED[0] = args.cached_only
    torch.set_num_threads(args.threads)
    from blended import Editor

    editor = Editor.load("demo")
    d = editor.defaults
    n = 3 if args.quick else args.n
    cases = [scenes.make_edit_case(BASE + i) for i in range(n)]
    thin = [(im, m, p, c, None) for im, m, p, c in (thin_case(BASE + 10_000 + i) for i in range(max(1, n // 2)))]
    SAVE[0] = not args.quick
    cache = {} if (args.quick or args.fresh or not CACHE.exists()) else json.loads(CACHE.read_text())
    pin = dict(background="none")
    want = lambda label: args.rows is None or any(re.search(w, label) for w in args.rows.split(",") if w)  # noqa: E731
    out = []
    sig = f"g{d.guidance_scale}-c{d.core_steps}-s{d.num_inference_steps}"  # rows depend on the model's defaults
    head = (f"Demo model (`assets/demo`) with its defaults ({d.num_candidates} candidates, {d.num_inference_steps} "
            f"{d.scheduler} steps, guidance {d.guidance_scale}, blend_start {d.blend_start}, core_steps {d.core_steps}), "
            f"{n} held-out edits and {len(thin)} thin masks per row of the loop section; CPU, {torch.get_num_threads()} "
            "thread(s).")

    if "loop" in args.sections:
        rows = []
        for label, settings, with_thin in LOOP_ROWS:
            if not want(label):
                continue
            fn = official_fn(editor) if settings is None else engine_fn(editor, **{**pin, **settings})
            r = cached(cache, f"loop|{sig}|{label}|{n}", lambda: evaluate(fn, cases))
            t = cached(cache, f"loop-thin|{sig}|{label}|{n}", lambda: evaluate(fn, thin)) if with_thin else {}
            if not r:
                continue
            rows.append([label, r["top"], r["mean"], r["psnr"], r["seam"], r["band"], t.get("top", "-"),
                         t.get("mean", "-"), r["seconds"]])
        out.append("## The loop against the official script, one difference at a time\n\nBackground `none` (the raw "
                   "decode, as the script gives): PSNR outside the mask and the seam are the loop's own. Each row changes one "
                   "thing from the previous default (source start, fixed noise, next timestep, any-pixel mask, shrinking, "
                   "the model's core_steps).\n\n" + table(
            ["loop", "top-1 hit", "random-candidate hit", "median PSNR outside dB", "seam", "seam band 8 px",
             "thin: top-1", "thin: random", "median s / edit"], rows))

    if "soft" in args.sections:
        rows = []
        n_soft = 3 if args.quick else args.n_soft
        soft_cases = cases[:n_soft] if n_soft <= n else [scenes.make_edit_case(BASE + i) for i in range(n_soft)]
        hard = {}  # the first row, what the others are compared with edit by edit
        for label, settings, mask_image in SOFT_ROWS:
            if not want(label):
                continue
            fn = engine_fn(editor, mask_image, **settings)  # the default background: the composite takes part
            r = cached(cache, f"soft|{sig}|{label}|{len(soft_cases)}", lambda: evaluate(fn, soft_cases))
            if not r:
                continue
            hard = hard or r
            rows.append([label, r["top"], paired(hard, r), r.get("strict", "-"), paired(hard, r, "stricts"), r["mean"],
                         r["psnr"], r["seam"], r["band"], r["seconds"]])
        out.append(f"## Soft masks ({len(soft_cases)} edits)\n\nWith the model's default background (`{d.background}`: "
                   "the upload exactly where the edit's weight is 0; a soft mask's strengths weigh the final composite "
                   "instead of the feather band), so PSNR outside the mask and the seam are those of the final image.\n\n" + table(
            ["mask", "top-1 hit", "against the hard mask (95 % interval)", "top-1 hit, asked pixels alone",
             "against the hard mask (95 % interval)", "random-candidate hit",
             "median PSNR outside dB", "seam", "seam band 8 px", "median s / edit"], rows))
        if not args.quick and args.rows is None:
            strip(editor, cases, {})
            out.append("![the same edit at mask_blur 0, 8, 16](ablation_blur.png)")

    if "fade" in args.sections:
        rows, raw, first = [], {}, {}
        for label, weights in FADE_ROWS:
            if not want(label):
                continue
            r = cached(cache, f"fade|{sig}|{label}|{len(cases)}", lambda: evaluate(fade_fn(editor, weights, raw), cases))
            if not r:
                continue
            first = first or r
            rows.append([label, r["top"], paired(first, r), r["strict"], r["mean"], r["psnr"], r["seam"], r["band"]])
        out.append(f"## The seam band's profile ({len(cases)} edits)\n\nThe same candidates (one edit per case), "
                   "composited with other weights outside the mask and ranked again: what the pixels just outside "
                   "the mask do to the judge and to the seam. Inside the mask every row has the same pixels.\n\n" + table(
            ["weights outside the mask", "top-1 hit", "against the first row (95 % interval)",
             "top-1 hit, asked pixels alone", "random-candidate hit", "median PSNR outside dB", "seam",
             "seam band 8 px"], rows))

    if "tune" in args.sections:
        rows = []
        tune_cases = [scenes.make_edit_case(TUNE_BASE + i) for i in range(3 if args.quick else args.n_tune)]
        for label, settings in TUNE_ROWS:
            if not want(label):
                continue
            r = cached(cache, f"tune|{label}|{len(tune_cases)}", lambda: evaluate(engine_fn(editor, **settings), tune_cases))
            if r:
                rows.append([label, r["top"], r["mean"], r["psnr"], r["seam"], r["band"], r["seconds"]])
        out.append(f"## The model's recommended settings ({len(tune_cases)} validation edits)\n\nOther seeds than the "
                   "sections above (which judge the result), the new loop, the default background; each row gives "
                   "its settings in full, so it keeps its meaning when blended.json changes.\n\n" + table(
            ["settings", "top-1 hit", "random-candidate hit", "median PSNR outside dB", "seam", "seam band 8 px",
             "median s / edit"], rows))

    text = (f"# The blend loop against the official code, and soft masks\n\nCommand: "
            f"`{' '.join(['python -m bench.ablation', *sys.argv[1:]])}`\n\n{head}\n\n" + "\n\n".join(out) + "\n")
    print(text)
    if not args.quick and args.rows is None:
        write_doc("ablation", text)


def strip(editor, cases, pin, index: int = 0, scale: int = 3) -> None:
    """One edit (source, then blur 0, 8, 16; top-1 each) side by side, written to docs/bench/ablation_blur.png."""
    image, mask, prompt, _, _ = cases[index]
    tiles = [Image.fromarray(image)]
    for blur in (0.0, 8.0, 16.0):
        tiles.append(editor.edit(Image.fromarray(image), Image.fromarray(mask.astype(np.uint8) * 255), prompt,
                                 mask_blur=blur, **pin).images[0])
    w, h = tiles[0].size
    sheet = Image.new("RGB", (w * scale * len(tiles), h * scale), "white")
    for i, t in enumerate(tiles):
        sheet.paste(t.resize((w * scale, h * scale), Image.Resampling.NEAREST), (i * w * scale, 0))
    sheet.save(ROOT / "docs" / "bench" / "ablation_blur.png")


if __name__ == "__main__":
    main()
