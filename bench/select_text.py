"""Masks from words (issue 29): the bundled demo text segmenter on held-out demo scenes, alone and refined by GrabCut,
and the CPU cost of a selection, also for a CLIPSeg of the real model's shapes (random weights).

    HF_HUB_OFFLINE=1 nice python -m bench.select_text --threads 1     # writes docs/bench/select_text.md
    python -m bench.select_text --quick                                # smoke test, writes nothing

Sections:
  quality   held-out scenes (blended_dev/textseg.heldout_cases: seeds from EVAL_TEXT_START, never used for a choice)
            with two and with three objects, one named "the COLOUR SHAPE" (a colour and shape no other object there
            has): IoU with that object's exact mask, the text mask alone (the heatmap at its threshold) and refined by
            GrabCut; how often the mask covers another object more than the named one ("wrong object"); how often
            nothing reaches the threshold; seconds per selection
  latency   seconds per selection on a 64 px scene and the same enlarged to 512 px: the demo segmenter (text alone,
            + GrabCut) and a CLIPSeg with CIDAS/clipseg-rd64-refined's shapes (ViT-B/16 at 352 px, random weights;
            its random heatmap names no object, so its GrabCut column adds the refinement's time measured on the demo
            segmenter's text mask of the same 512 px picture)
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image

from blended import InputError
from blended.select import GrabCutSegmenter, Selection, TextSegmenter, load_text_segmenter
from blended_dev.bench import table, write_doc
from blended_dev.textseg import EVAL_TEXT_START, clipseg_sized, heldout_cases


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def timed(fn) -> tuple[object, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def run_cases(seg: TextSegmenter, cases) -> dict:
    """IoU, wrong-object and nothing-found rates, and median seconds of `seg` on `cases`."""
    ious, wrong, nothing, secs = [], [], 0, []
    for c in cases:
        try:
            (mask,), s = timed(lambda: seg.select(c.image, Selection(text=c.phrase)))
        except InputError:
            mask, s = np.zeros_like(c.mask), float("nan")
            nothing += 1
        ious.append(iou(mask, c.mask))
        wrong.append(any((mask & o).sum() > (mask & c.mask).sum() for o in c.others))
        secs.append(s)
    return {"iou": float(np.mean(ious)), "median": float(np.median(ious)), "ge09": float(np.mean(np.array(ious) >= 0.9)),
            "wrong": float(np.mean(wrong)), "nothing": nothing / len(cases),
            "s": statistics.median([s for s in secs if s == s] or [float("nan")])}


def quality(n: int) -> str:
    alone, _ = load_text_segmenter("demo")
    refined, _ = load_text_segmenter("demo", refiner=GrabCutSegmenter())
    rows = []
    for k in (2, 3):
        cases = heldout_cases(n, k)
        for label, seg in (("text alone (heatmap >= 0.5)", alone), ("text + GrabCut", refined)):
            r = run_cases(seg, cases)
            rows.append([k, len(cases), label, f"{r['iou']:.3f}", f"{r['median']:.3f}", f"{r['ge09']:.2f}",
                         f"{r['wrong']:.3f}", f"{r['nothing']:.3f}", f"{r['s'] * 1000:.1f}"])
    return table(["objects", "scenes", "mask", "IoU (mean)", "median", "share >= 0.9", "wrong object",
                  "nothing found", "ms per selection (median)"], rows)


def median_seconds(fn, repeat: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(repeat):
        out.append(timed(fn)[1])
    return statistics.median(out)


def latency(repeat: int) -> str:
    """Seconds per selection; for the CLIPSeg-sized model (random weights, a heatmap without an object in it) the
    GrabCut column adds the refinement's time on the demo segmenter's text mask of the same picture."""
    case = heldout_cases(1, 2)[0]
    big = np.asarray(Image.fromarray(case.image).resize((512, 512), Image.Resampling.BICUBIC))
    sel = Selection(text=case.phrase)
    demo, _ = load_text_segmenter("demo")
    model, processor = clipseg_sized()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    sized = TextSegmenter(model, processor, name="CLIPSeg shapes, random")
    sized.threshold = 0.0  # every pixel: the random heatmap names nothing, and only its time is measured here
    rows, refine = [], {}
    for size, image in (("64 px", case.image), ("512 px", big)):
        demo.refiner = None
        alone = median_seconds(lambda: demo.select(image, sel), repeat)
        heat = demo.heatmap(image, sel.text)
        mask = demo.text_mask(heat, sel)
        demo.refiner = GrabCutSegmenter()
        refine[size] = median_seconds(lambda: demo.refine(image, heat, mask, sel), repeat)
        rows.append(["demo (0.7 M parameters, 64 px input)", size, f"{alone:.3f}", f"{alone + refine[size]:.3f}"])
    alone = median_seconds(lambda: sized.select(big, sel), repeat)
    rows.append([f"CLIPSeg-sized ({params:.0f} M parameters, 352 px input), random weights", "512 px",
                 f"{alone:.3f}", f"{alone + refine['512 px']:.3f}"])
    return table(["text segmenter", "image", "text alone, s (median)", "text + GrabCut, s (median)"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="quality,latency")
    ap.add_argument("--n", type=int, default=200, help="held-out scenes per object count (quality)")
    ap.add_argument("--repeat", type=int, default=5, help="timed repeats (latency)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, write nothing")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.n, args.repeat = 4, 1
    sections = args.sections.split(",")
    parts = [f"Command: `python -m bench.select_text --sections {args.sections} --n {args.n} --repeat {args.repeat}"
             + (f" --threads {args.threads}" if args.threads else "") + f"`; torch threads {torch.get_num_threads()}; "
             f"held-out seeds from {EVAL_TEXT_START}; the CPU is shared with other jobs, so timings are noisy."]
    if "quality" in sections:
        parts.append("### The demo text segmenter on held-out demo scenes\n\n" + quality(args.n))
        print(parts[-1], flush=True)
    if "latency" in sections:
        parts.append("### Seconds per selection (CPU)\n\n" + latency(args.repeat))
        print(parts[-1], flush=True)
    if not args.quick:
        print(write_doc("select_text", "\n\n".join(parts) + "\n"))


if __name__ == "__main__":
    main()
