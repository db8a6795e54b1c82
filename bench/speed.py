"""Speed: our edit vs diffusers' StableDiffusionInpaintPipeline on the same SD-architecture model.

Same UNet (4-channel), VAE, text encoder, steps, strength (= 1 - blend_start), batch and seeds; runs
alternate in one process. Prints tables and writes docs/bench/speed.md.

    python -m bench.speed            # full: ~10 min on 2 CPU cores
    python -m bench.speed --quick    # smoke test: tiny widths, seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from blended_dev import ROOT
from blended_dev.bench import CallCounter, PeakRSS, centre_mask, params, plot, scene, table, write_doc
from blended_dev.tiny import sd_components


def make_editor(components: dict):
    from diffusers import StableDiffusionPipeline

    from blended.editor import Editor
    from blended.models import LoadedModel

    pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return Editor(LoadedModel(pipe=pipe, name="bench", source="bench", device=torch.device("cpu"),
                              dtype=torch.float32), ranker=None)


def make_inpaint(components: dict):
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline(**components, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_ours(editor, image, mask, n, steps, blend_start, shrink=True, background="none", rank=False, **more):
    t = time.perf_counter()
    r = editor.edit(image, mask, "a red circle", num_candidates=n, batch_size=n, num_inference_steps=steps,
                    blend_start=blend_start, guidance_scale=7.5, seed=0, rank=rank, shrink=shrink,
                    background=background, **more)
    return time.perf_counter() - t, r


def run_theirs(pipe, image, mask, n, steps, blend_start):
    t = time.perf_counter()
    pipe("a red circle", image=image, mask_image=mask, strength=1 - blend_start, num_inference_steps=steps,
         guidance_scale=7.5, num_images_per_prompt=n, height=image.size[1], width=image.size[0],
         generator=[torch.Generator().manual_seed(i) for i in range(n)])
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny widths and sizes: a smoke test")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: 1 with --quick, else 2; use 1 while other jobs share the CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads or (1 if args.quick else 2))
    width, size, steps, n, reps = (0.1, 64, 4, 2, 2) if args.quick else (0.25, 256, 12, 4, 3)
    reps = args.reps or reps
    blend_start = 0.25
    comps = sd_components(width, size)
    editor, inpaint = make_editor(comps), make_inpaint(comps)
    calls = CallCounter(comps["unet"])
    image, mask = scene(size, size), centre_mask(size, size)
    # warm-up both
    run_ours(editor, image, mask, 1, 2, blend_start)
    run_theirs(inpaint, image, mask, 1, 2, blend_start)

    ours, theirs, ours_noshrink, stages, mem = [], [], [], [], {}
    for _ in range(reps):
        calls.n = 0
        with PeakRSS() as p:
            t, r = run_ours(editor, image, mask, n, steps, blend_start)
        ours.append(t)
        stages.append(r.timings)
        mem["ours"], unet_ours = max(mem.get("ours", 0), p.mib), calls.n
        calls.n = 0
        with PeakRSS() as p:
            theirs.append(run_theirs(inpaint, image, mask, n, steps, blend_start))
        mem["diffusers"], unet_theirs = max(mem.get("diffusers", 0), p.mib), calls.n
        ours_noshrink.append(run_ours(editor, image, mask, n, steps, blend_start, shrink=False)[0])
    med = statistics.median
    head = (f"Model: SD 1.5 graph at width x{width} (UNet {params(comps['unet']):.1f} M, VAE "
            f"{params(comps['vae']):.1f} M, text encoder {params(comps['text_encoder']):.1f} M params, random "
            f"weights), {size}x{size} px, {n} candidates, {steps} steps, blend_start {blend_start} "
            f"(strength {1 - blend_start}), guidance 7.5, CPU, {torch.get_num_threads()} threads, {reps} alternating "
            "repetitions (median).")
    t1 = table(["pipeline", "median s", "min s", "UNet calls", "peak RSS MiB"], [
        ["blended (shrinking on)", med(ours), min(ours), unet_ours, mem["ours"]],
        ["blended (shrinking off)", med(ours_noshrink), min(ours_noshrink), unet_ours, "-"],
        ["diffusers StableDiffusionInpaintPipeline", med(theirs), min(theirs), unet_theirs, mem["diffusers"]],
    ])
    ratio = med(ours) / med(theirs)

    # the whole edit: + decoder fine-tuning (paper settings, early stopping) + ranking (ViT-B-16 graph,
    # random weights: the paper's ranker architecture, no download)
    from blended.ranking import Ranker

    editor.ranker = Ranker("ViT-B-16", None, device="cpu") if not args.quick else Ranker(
        str(ROOT / "assets" / "demo_ranker"), None, device="cpu")
    run_ours(editor, image, mask, 1, 2, blend_start, rank=True)  # loads the ranker
    tuning = {"decoder_steps": 3} if args.quick else {}  # full: the paper's 75 steps, early stopping on
    full = [run_ours(editor, image, mask, n, steps, blend_start, background="decoder", rank=True, **tuning)[1].timings
            for _ in range(max(1, reps - 1))]
    editor.ranker = None
    keys = ["prepare", "encode", "denoise", "decode", "safety", "background", "paste", "rank", "total"]
    t2 = table(["stage", "generation only (median s)", "+ decoder fine-tuning + ranking (median s)"],
               [[k, med([s.get(k, 0.0) for s in stages]), med([s.get(k, 0.0) for s in full])] for k in keys])
    generation = med([s["encode"] + s["denoise"] + s["decode"] for s in full])
    decoder_ratio = med([s["background"] for s in full]) / generation
    # the same edit with the default 50 steps: the denoise time scaled by the denoising steps run (37 vs 9)
    from blended.schedulers import first_step

    scale = (50 - first_step(50, blend_start)) / (steps - first_step(steps, blend_start))
    generation_50 = med([s["encode"] + s["denoise"] * scale + s["decode"] for s in full])
    decoder_ratio_50 = med([s["background"] for s in full]) / generation_50

    # growth with candidates and resolution (ours only)
    rows, by_n, by_size = [], ([], []), ([], [])
    for cand in ((1, 2) if args.quick else (1, 2, 4, 8)):
        t = run_ours(editor, image, mask, cand, steps, blend_start)[0]
        rows.append([f"{cand} candidates, {size} px", t])
        by_n[0].append(cand), by_n[1].append(t)
    for s in ((64, 96) if args.quick else (128, 256, 384)):  # a model whose native size is s
        im, mk = scene(s, s), centre_mask(s, s)
        other = make_editor(sd_components(width, s))
        t = run_ours(other, im, mk, n, steps, blend_start)[0]
        rows.append([f"{n} candidates, {s} px", t])
        by_size[0].append(s), by_size[1].append(t)
    t3 = table(["edit", "seconds"], rows)
    if not args.quick:
        out = ROOT / "docs" / "bench"
        plot(out / "speed_candidates.png", {"blended": by_n}, "candidates", "seconds per edit",
             f"Edit time vs candidates ({size} px, {steps} steps)")
        plot(out / "speed_resolution.png", {"blended": by_size}, "native size (px)", "seconds per edit",
             f"Edit time vs resolution ({n} candidates)")

    command = " ".join(["python -m bench.speed", *sys.argv[1:]])
    text = (f"# Speed: blended vs diffusers inpainting\n\nCommand: `{command}`\n\n"
            f"{head}\n\n{t1}\n\n**Ratio blended / diffusers: {ratio:.3f}** (target <= 1.02)\n\n"
            f"Time per stage of our edit:\n\n{t2}\n\n**Decoder fine-tuning / generation (encode + denoise + decode): "
            f"{decoder_ratio:.2f}** at this benchmark's {steps} steps; against the same edit with the default 50 steps "
            f"(the denoise time scaled to its UNet calls): **{decoder_ratio_50:.2f}** (target <= 0.5; paper: about 3; "
            f"bench/background.py part C measures it too)\n\nGrowth:\n\n{t3}\n"
            + ("" if args.quick else "\n![time vs candidates](speed_candidates.png) ![time vs resolution](speed_resolution.png)\n"))
    print(text)
    if not args.quick:
        write_doc("speed", text)
    assert unet_ours == unet_theirs, "both run the same number of UNet evaluations"
    assert ratio > 0 and decoder_ratio > 0


if __name__ == "__main__":
    main()
