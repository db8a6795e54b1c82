"""Measure the bundled demo model on held-out seeds.

    HF_HUB_OFFLINE=1 python -m bench.demo_eval                  # all sections
    python -m bench.demo_eval --per-phrase 4 --n-edit 20        # quicker

Sections (all seeds >= scenes.HELDOUT_SEED_START, never used in training):
  analyser   accuracy of blended_dev/analyse.py on ground-truth scenes (so the other numbers can be trusted)
  t2i        StableDiffusionPipeline on assets/demo, 64x64: does the analyser find the asked
             colour and shape? (target >= 90% colour+shape)
  ranker     open_clip ranker (assets/demo_ranker): 18-way zero-shot accuracy on scenes
  edit       a baseline edit: diffusers' StableDiffusionInpaintPipeline (latent blending with the
             4-channel UNet) x N candidates, top-1 by the ranker; object asked for inside the mask
             (target >= 80%) and PSNR outside the mask (target >= 25 dB). The engine's own edits
             can be measured with ``evaluate_edits(edit_fn, ...)``.
  timing     one edit-sized denoising: 4 candidates x steps at guidance (UNet batch 8) + VAE
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from blended_dev import ROOT, scenes
from blended_dev.analyse import analyse_image, analyse_region

PHRASES = [f"a {c} {s}" for c in scenes.COLOURS for s in scenes.SHAPES]
EVAL_BASE = scenes.HELDOUT_SEED_START  # + offsets below keep sections apart


def psnr_outside(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    keep = ~mask.astype(bool)
    d = a.astype(np.float32)[keep] - b.astype(np.float32)[keep]
    mse = float((d**2).mean()) if d.size else 0.0
    return 10 * math.log10(255.0**2 / max(mse, 1e-10))


def table(title: str, rows: list[tuple], header: tuple):
    print(f"\n## {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r) + " |")


# ----------------------------------------------------------------------------- analyser
def ideal_edit(seed: int):
    """An edit case with the asked object drawn into the mask: what a perfect edit looks like."""
    image, mask, prompt, colour, shape = scenes.make_edit_case(seed)
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    side = int(min(x1 - x0, y1 - y0) * 0.7)
    ox, oy = x0 + (x1 - x0 - side) // 2, y0 + (y1 - y0 - side) // 2
    obj = scenes.SceneObject(shape, colour, int(ox), int(oy), side)
    out, _ = scenes.render(image.astype(np.float32), [obj], np.random.default_rng(seed))
    return out, mask, colour, shape


def eval_analyser(n: int) -> dict:
    res = {}
    ok_c = ok_s = ok = 0
    for i in range(n):
        sc = scenes.make_scene(EVAL_BASE + i, n_objects=1)
        c, s = analyse_image(sc.image)
        o = sc.objects[0]
        ok_c += c == o.colour
        ok_s += s == o.shape
        ok += (c, s) == (o.colour, o.shape)
    res["single_object_image"] = (ok_c / n, ok_s / n, ok / n, n)
    ok_c = ok_s = ok = tot = 0
    for i in range(n // 3 + 1):
        sc = scenes.make_scene(EVAL_BASE + 10_000 + i, n_objects=3)
        for o in sc.objects:
            box = np.zeros((scenes.SIZE, scenes.SIZE), bool)
            box[o.y0 : o.y0 + o.size, o.x0 : o.x0 + o.size] = True
            c, s = analyse_region(sc.image, box)
            ok_c += c == o.colour
            ok_s += s == o.shape
            ok += (c, s) == (o.colour, o.shape)
            tot += 1
    res["regions_in_3_object_scenes"] = (ok_c / tot, ok_s / tot, ok / tot, tot)
    ok_c = ok_s = ok = 0
    false_pos = 0
    for i in range(n):
        img, mask, colour, shape = ideal_edit(EVAL_BASE + 20_000 + i)
        c, s = analyse_region(img, mask)
        ok_c += c == colour
        ok_s += s == shape
        ok += (c, s) == (colour, shape)
        before, _, _, colour2, shape2 = scenes.make_edit_case(EVAL_BASE + 20_000 + i)
        false_pos += analyse_region(before, mask) == (colour2, shape2)
    res["ideal_edits_in_mask"] = (ok_c / n, ok_s / n, ok / n, n)
    res["unedited_mask_false_positive"] = (false_pos / n, n)
    rows = [(k, *v) for k, v in res.items() if len(v) == 4]
    table("analyser on ground truth", rows, ("case", "colour", "shape", "colour+shape", "n"))
    print(f"\nfalse positives (asked object 'found' in the mask before any edit): {res['unedited_mask_false_positive'][0]:.3f}")
    return res


# ----------------------------------------------------------------------------- t2i
def eval_t2i(pipe, per_phrase: int, steps: int, guidance: float, save: str | None) -> dict:
    per = {}
    images = []
    t0 = time.time()
    for k in range(per_phrase):
        g = torch.Generator().manual_seed(EVAL_BASE + 30_000 + k)
        out = pipe(PHRASES, height=64, width=64, num_inference_steps=steps, guidance_scale=guidance,
                   generator=g, output_type="np").images
        out = (out * 255).round().astype(np.uint8)
        images.append(out)
        for p, img in zip(PHRASES, out):
            per.setdefault(p, []).append(analyse_image(img))
    dt = time.time() - t0
    rows = []
    tot_c = tot_s = tot = 0
    by_colour, by_shape = {}, {}
    for p in PHRASES:
        _, colour, shape = p.split()
        r = per[p]
        c = sum(a == colour for a, _ in r)
        s = sum(b == shape for _, b in r)
        both = sum((a, b) == (colour, shape) for a, b in r)
        tot_c, tot_s, tot = tot_c + c, tot_s + s, tot + both
        by_colour.setdefault(colour, []).append(both / len(r))
        by_shape.setdefault(shape, []).append(both / len(r))
        rows.append((p, c / len(r), s / len(r), both / len(r), len(r)))
    n = per_phrase * len(PHRASES)
    rows.append(("**all**", tot_c / n, tot_s / n, tot / n, n))
    table(f"text-to-image ({steps} DDIM steps, guidance {guidance})", rows, ("prompt", "colour", "shape", "colour+shape", "n"))
    print("\nby colour: " + ", ".join(f"{k} {np.mean(v):.2f}" for k, v in by_colour.items()))
    print("by shape: " + ", ".join(f"{k} {np.mean(v):.2f}" for k, v in by_shape.items()))
    print(f"({n} samples in {dt:.0f}s)")
    if save:
        from PIL import Image

        grid = np.concatenate([np.concatenate(list(b), axis=1) for b in images[:6]], axis=0)
        Image.fromarray(grid).save(save)
        print(f"samples: {save} (rows = seeds, columns = {', '.join(PHRASES)})")
    return {"colour": tot_c / n, "shape": tot_s / n, "colour_shape": tot / n, "n": n,
            "steps": steps, "guidance": guidance}


# ----------------------------------------------------------------------------- ranker
def load_ranker(path: str):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    model.eval()
    return model, preprocess, tokenizer


@torch.no_grad()
def ranker_scores(ranker, images: list[np.ndarray], prompt: str) -> np.ndarray:
    model, preprocess, tokenizer = ranker
    from PIL import Image

    x = torch.stack([preprocess(Image.fromarray(im)) for im in images])
    fi = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
    ft = torch.nn.functional.normalize(model.encode_text(tokenizer([prompt])), dim=-1)
    return (fi @ ft.t())[:, 0].numpy()


@torch.no_grad()
def eval_ranker(ranker, n: int) -> dict:
    model, preprocess, tokenizer = ranker
    from PIL import Image

    ft = torch.nn.functional.normalize(model.encode_text(tokenizer(PHRASES)), dim=-1)
    res = {}
    for name, k in (("single object", 1), ("one of 2-3 objects", None)):
        hit = 0
        tot = 0
        for i in range(n):
            sc = scenes.make_scene(EVAL_BASE + 40_000 + i, n_objects=k if k else 2 + i % 2)
            x = preprocess(Image.fromarray(sc.image))[None]
            fi = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
            sims = (fi @ ft.t())[0]
            if k == 1:
                hit += PHRASES[int(sims.argmax())] == sc.caption
            else:  # the top phrase names one of the objects
                hit += PHRASES[int(sims.argmax())] in [o.phrase for o in sc.objects]
            tot += 1
        res[name] = hit / tot
    table("ranker (open_clip) zero-shot, 18 phrases", [(k, v, n) for k, v in res.items()], ("scenes", "top-1 correct", "n"))
    return res


# ----------------------------------------------------------------------------- edits
def evaluate_edits(edit_fn, n: int, start: int = EVAL_BASE + 50_000, label: str = "edit") -> dict:
    """edit_fn(image uint8 HxWx3, mask bool HxW, prompt) -> list of candidates (uint8), best first.

    Reports: top-1 has the asked object in the mask, any candidate has it, PSNR outside the mask.
    """
    top1 = anyc = 0
    ps = []
    t0 = time.time()
    for i in range(n):
        image, mask, prompt, colour, shape = scenes.make_edit_case(start + i)
        cands = edit_fn(image, mask, prompt)
        found = [analyse_region(c, mask) == (colour, shape) for c in cands]
        top1 += found[0]
        anyc += any(found)
        ps.append(psnr_outside(cands[0], image, mask))
    dt = time.time() - t0
    res = {"top1_object_in_mask": top1 / n, "any_candidate": anyc / n,
           "psnr_outside_db_mean": float(np.mean(ps)), "psnr_outside_db_min": float(np.min(ps)),
           "n": n, "seconds_per_edit": dt / n}
    table(label, [(k, v) for k, v in res.items()], ("metric", "value"))
    return res


def inpaint_baseline(model_dir: str, ranker, candidates: int, steps: int, guidance: float):
    """Baseline edit: diffusers' StableDiffusionInpaintPipeline (latent blending) + ranker top-1."""
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image

    pipe = StableDiffusionInpaintPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    counter = [0]

    def edit(image, mask, prompt):
        counter[0] += 1
        g = torch.Generator().manual_seed(counter[0])
        out = pipe(prompt=prompt, image=Image.fromarray(image), mask_image=Image.fromarray(mask.astype(np.uint8) * 255),
                   height=64, width=64, num_inference_steps=steps, guidance_scale=guidance,
                   num_images_per_prompt=candidates, generator=g, output_type="np").images
        cands = [(o * 255).round().astype(np.uint8) for o in out]
        if ranker is not None and len(cands) > 1:
            order = np.argsort(-ranker_scores(ranker, cands, prompt))
            cands = [cands[j] for j in order]
        return cands

    return edit


# ----------------------------------------------------------------------------- timing
@torch.no_grad()
def timing(pipe, steps: int, guidance: float, candidates: int) -> dict:
    from diffusers import DDIMScheduler

    x = torch.randn(1, 3, 64, 64)
    t0 = time.time()
    for _ in range(3):
        lat = pipe.vae.encode(x).latent_dist.mode()
        pipe.vae.decode(lat.repeat(candidates, 1, 1, 1))
    vae_s = (time.time() - t0) / 3
    pipe("a red circle", height=64, width=64, num_inference_steps=2, num_images_per_prompt=candidates)  # warm-up
    t0 = time.time()
    pipe("a red circle", height=64, width=64, num_inference_steps=steps, guidance_scale=guidance,
         num_images_per_prompt=candidates)
    total = time.time() - t0
    res = {"denoise_plus_decode_s": total, "vae_encode_plus_decode_s": vae_s, "steps": steps,
           "candidates": candidates}
    table(f"timing ({candidates} candidates, {steps} steps, guidance {guidance}, torch threads {torch.get_num_threads()})",
          [(k, v) for k, v in res.items()], ("what", "value"))
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "assets" / "demo"))
    ap.add_argument("--ranker", default=str(ROOT / "assets" / "demo_ranker"))
    ap.add_argument("--sections", default="analyser,t2i,ranker,edit,timing")
    ap.add_argument("--n-analyser", type=int, default=300)
    ap.add_argument("--per-phrase", type=int, default=10)
    ap.add_argument("--n-ranker", type=int, default=300)
    ap.add_argument("--n-edit", type=int, default=50)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--candidates", type=int, default=None)
    ap.add_argument("--save-samples", default="/tmp/demo_t2i.png")
    ap.add_argument("--json", default=None, help="write all numbers here")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    defaults = {"num_inference_steps": 20, "guidance_scale": 5.0, "num_candidates": 4}
    cfg_file = Path(args.model) / "blended.json"
    if cfg_file.exists():
        defaults.update(json.loads(cfg_file.read_text()))
    steps = args.steps or defaults["num_inference_steps"]
    guidance = args.guidance if args.guidance is not None else defaults["guidance_scale"]
    candidates = args.candidates or defaults["num_candidates"]
    sections = args.sections.split(",")
    results: dict = {}

    if "analyser" in sections:
        results["analyser"] = eval_analyser(args.n_analyser)
    pipe = None
    if {"t2i", "timing"} & set(sections):
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(args.model)
        pipe.set_progress_bar_config(disable=True)
    if "t2i" in sections:
        results["t2i"] = eval_t2i(pipe, args.per_phrase, steps, guidance, args.save_samples)
    ranker = None
    if {"ranker", "edit"} & set(sections) and Path(args.ranker).exists():
        ranker = load_ranker(args.ranker)
    if "ranker" in sections and ranker is not None:
        results["ranker"] = eval_ranker(ranker, args.n_ranker)
    if "edit" in sections:
        edit = inpaint_baseline(args.model, ranker, candidates, steps, guidance)
        results["edit_inpaint_baseline"] = evaluate_edits(
            edit, args.n_edit, label=f"edit baseline: SD inpaint pipeline, {candidates} candidates, ranker top-1")
    if "timing" in sections:
        results["timing"] = timing(pipe, steps, guidance, candidates)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
