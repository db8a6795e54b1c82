"""A Stable Diffusion edit on a free CPU Space (issue 31): today's path, each part alone, all together.

    python -m bench.cpu_space            # SD 1.5 shapes, random weights, 512 px, 2 threads (about 15 min)
    python -m bench.cpu_space --quick    # width 0.25 at 256 px: a smoke test of every row (about a minute)

Every row is one edit of the SD 1.5 graph (random weights; `blended_dev.tiny.sd_components`), 4 LCM steps at
guidance 1 (one UNet row per candidate per step, as an LCM-LoRA runs), background `stitch`, no ranking (the
CLIP ranker cannot be downloaded here). The tiny decoder is `AutoencoderTiny()` with TAESD's shapes (random
weights: its cost, not its pictures). "first edit" rows start with an empty encode cache; "second prompt" rows
edit the same photo and mask again with another prompt. Writes docs/bench/cpu_space.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from blended_dev.bench import centre_mask, scene, table, write_doc
from blended_dev.tiny import sd_components

STAGES = ("encode", "denoise", "decode", "total")


def editors(width: float, size: int) -> dict:
    """{"fp32": Editor, "bf16": Editor} over the same random SD-shaped weights, and the tiny decoder's folder."""
    from diffusers import AutoencoderTiny, StableDiffusionPipeline

    from blended.editor import Editor
    from blended.models import LoadedModel

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):  # the same seed: the same weights
        comps = {k: (v.to(dtype) if isinstance(v, torch.nn.Module) else v) for k, v in sd_components(width, size).items()}
        pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        out[name] = Editor(LoadedModel(pipe=pipe, name=f"sd15-graph-{name}", source="bench",
                                       device=torch.device("cpu"), dtype=dtype), ranker=None)
    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="blended-taesd-")) / "taesd"
    AutoencoderTiny().save_pretrained(folder)
    return out, str(folder)


def small_mask(size: int):
    """A 3/16-of-the-side box near a corner: the kind of mask a crop decode helps."""
    from PIL import Image

    m = Image.new("L", (size, size), 0)
    side = size * 3 // 16
    m.paste(255, (size // 8, size // 8, size // 8 + side, size // 8 + side))
    return m


def run_row(editor, image, mask, prompt: str, *, fresh: bool, crop: bool = True, **settings) -> dict:
    """One edit's stage seconds; `fresh` empties the encode cache first; `crop` False decodes the whole frame."""
    import blended.codec as codec

    if fresh:
        editor.model.encodes.clear()
    saved = codec.nonzero_box
    if not crop:
        codec.nonzero_box = lambda weights: None  # no box: the whole frame is decoded, as before issue 31
    try:
        start = time.perf_counter()
        r = editor.edit(image, mask, prompt, rank=False, scheduler="lcm", num_inference_steps=4, guidance_scale=1.0,
                        **settings)
        wall = time.perf_counter() - start
    finally:
        codec.nonzero_box = saved
    out = {k: r.timings.get(k, 0.0) for k in STAGES} | {"wall": wall, "hits": r.timings.get("encode_cached", 0)}
    print(f"{out}", flush=True)
    return out


def rows_to_run(tiny: str) -> list[tuple[str, str, str, dict]]:
    """(label, editor, mask, settings) in the order they run (a second prompt right after its first edit)."""
    all_on = dict(decode=tiny)
    return [
        ("today: fp32, full decode, first edit", "fp32", "centre", dict(fresh=True, num_candidates=1)),
        ("cache alone: today, second prompt", "fp32", "centre", dict(fresh=False, num_candidates=1)),
        ("tiny decode alone (whole frame)", "fp32", "centre", dict(fresh=True, num_candidates=1, crop=False, **all_on)),
        ("bf16 alone", "bf16", "centre", dict(fresh=True, num_candidates=1)),
        ("small mask: tiny, whole frame", "fp32", "small", dict(fresh=True, num_candidates=1, crop=False, **all_on)),
        ("small mask: tiny, crop decode", "fp32", "small", dict(fresh=True, num_candidates=1, **all_on)),
        ("all together: bf16 + tiny + crop, first edit", "bf16", "centre", dict(fresh=True, num_candidates=1, **all_on)),
        ("all together, second prompt", "bf16", "centre", dict(fresh=False, num_candidates=1, **all_on)),
        ("4 candidates: today, first edit", "fp32", "centre", dict(fresh=True, num_candidates=4)),
        ("4 candidates: all together, first edit", "bf16", "centre", dict(fresh=True, num_candidates=4, **all_on)),
    ]


GOALS = {"today: fp32, full decode, first edit": "(54 s before)",
         "all together: bf16 + tiny + crop, first edit": "<= 30 s",
         "all together, second prompt": "<= 22 s",
         "4 candidates: all together, first edit": "<= 110 s (168 before)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="width 0.25 at 256 px (a smoke test)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    width, size = (0.25, 256) if args.quick else (1.0, 512)
    eds, tiny = editors(width, size)
    image = scene(size, size)
    masks = {"centre": centre_mask(size, size), "small": small_mask(size)}
    for ed in eds.values():  # warm-up: first-call costs out of the rows
        ed.edit(image, masks["centre"], "warm", num_candidates=1, num_inference_steps=1, rank=False, decode=tiny)
    results = {}
    for i, (label, name, mask, settings) in enumerate(rows_to_run(tiny)):
        prompt = "a red circle" if settings.get("fresh") else "a blue square"
        print(label, flush=True)
        results[label] = run_row(eds[name], image, masks[mask], prompt, **settings)
    base = results[rows_to_run(tiny)[0][0]]["total"]
    rows = [[label] + [r[k] for k in STAGES] + [f"{base / r['total']:.2f}x", GOALS.get(label, "")]
            for label, r in results.items()]
    text = table(["row (1 candidate unless said)"] + [f"{k} s" for k in STAGES] + ["speed-up vs today", "goal"], rows)
    full_dec, tiny_dec = results[rows[0][0]]["decode"], results["tiny decode alone (whole frame)"]["decode"]
    whole, crop = results["small mask: tiny, whole frame"]["decode"], results["small mask: tiny, crop decode"]["decode"]
    text += (f"\n\nTiny decode / full decode: **{tiny_dec / full_dec:.3f}** (goal <= 0.1). Crop decode of the small "
             f"mask's box: {crop:.2f} s against {whole:.2f} s for the whole frame ({whole / max(crop, 1e-9):.2f}x).\n")
    print(text)
    if not args.quick:
        cmd = "python -m bench.cpu_space " + " ".join(sys.argv[1:])
        write_doc("cpu_space", f"```\n{cmd.strip()}\n```\n\nSD 1.5 graph, random weights, {size} px, "
                               f"{args.threads} threads, 4 LCM steps, guidance 1, stitch, no ranking; one run.\n\n"
                               f"{text}")


if __name__ == "__main__":
    main()
