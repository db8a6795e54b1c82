"""Few-step edits (issue 21): quality and speed of the distilled demo model, the SD 1.5 graph at few steps,
and decoder fine-tuning next to a few-step edit.

Sections:
  quality  held-out demo edits (seeds no other bench uses): demo-fast (assets/demo-fast, LCM) at 1, 2, 4, 8
           steps against the demo model's 20-step default, the demo model itself at 4 steps by DDIM and by
           LCM's scheduler (what a user gets without distillation), and the few-step background rule: the
           source noised to the next timestep against the step's own, the loop alone (background "none")
  speed    the demo edit at 4 steps (demo-fast) against 20 (demo), alternating runs of the same edits:
           seconds per stage and UNet evaluations (rows of the UNet's batch)
  sd       the SD 1.5 graph with random weights (blended_dev/tiny.py's sd_components): 4 candidates at 4 LCM
           steps without guidance, 1 candidate at 4 steps, and the default schedule with guidance; seconds
           per stage and UNet evaluations. Full size (width 1, 512 px) is about 40 minutes on 2 cores;
           --quick runs the same graph at width 0.25 and 256 px
  tune     demo-fast's settings at 4 steps (guidance, core_steps, background rule) on validation seeds
  decoder  `--background decoder` next to a 50-step and a 4-step edit on the demo models: the seconds it
           adds and the PSNR outside the mask, at the defaults and with fewer steps at a higher rate

    python -m bench.fewstep --sections quality,speed,decoder --n 80 --threads 1   # ~25 min on a busy core
    python -m bench.fewstep --sections sd --quick                                 # the SD graph, small shapes
    python -m bench.fewstep --sections sd --threads 2                             # full size, an idle machine

Writes docs/bench/fewstep.md (and fewstep.json, the rows).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image

from blended_dev import ROOT, scenes
from blended_dev.bench import CallCounter, centre_mask, params, scene, table, write_doc
from blended_dev.edits import FEWSTEP_BASE, engine_fn, evaluate, psnr_outside
from blended_dev.tiny import sd_components

BASE = FEWSTEP_BASE  # apart from every other bench's seeds
TUNE_BASE = scenes.HELDOUT_SEED_START + 910_000  # validation seeds: demo-fast's blended.json was picked here
CACHE = ROOT / "docs" / "bench" / "fewstep.json"
STAGES = ["prepare", "encode", "denoise", "decode", "safety", "background", "paste", "rank", "total"]

QUALITY_ROWS = [  # (label, model, settings over its defaults)
    ("demo, 20 steps (its defaults)", "demo", {}),
    ("demo, 4 steps DDIM", "demo", dict(num_inference_steps=4)),
    ("demo, 4 steps LCM scheduler", "demo", dict(num_inference_steps=4, scheduler="lcm")),
    ("demo-fast, 1 step", "demo-fast", dict(num_inference_steps=1)),
    ("demo-fast, 2 steps", "demo-fast", dict(num_inference_steps=2)),
    ("demo-fast, 4 steps (its defaults)", "demo-fast", {}),
    ("demo-fast, 8 steps", "demo-fast", dict(num_inference_steps=8)),
]
RULE_ROWS = [  # the background's timestep at few steps, the loop alone
    ("demo-fast, 4 steps, next timestep, fixed noise", dict(background_timestep="next", background_noise="fixed")),
    ("demo-fast, 4 steps, next timestep, fresh noise", dict(background_timestep="next", background_noise="fresh")),
    ("demo-fast, 4 steps, own timestep, fresh noise", dict(background_timestep="own", background_noise="fresh")),
    ("demo-fast, 4 steps, own timestep, fixed noise", dict(background_timestep="own", background_noise="fixed")),
]


TUNE_ROWS = [  # absolute settings of demo-fast at 4 steps, so that rows keep their meaning when blended.json changes
    (f"guidance {g}, core_steps {c}, background {t}/{n}",
     dict(num_inference_steps=4, guidance_scale=g, core_steps=c, background_timestep=t, background_noise=n))
    for g in (3.0, 5.0, 7.5) for c in (0.0, 0.5, 0.75) for t, n in (("own", "fresh"), ("next", "fixed"))
]


class RowCounter:
    """UNet evaluations: the rows of every batch the UNet is called on (a guided candidate counts twice)."""

    def __init__(self, unet: torch.nn.Module):
        self.rows = 0
        unet.register_forward_pre_hook(lambda mod, args: setattr(self, "rows", self.rows + args[0].shape[0]))


def fast_tag(editor) -> str:
    """Which distilled model a row ran on: its training steps (stage 1 + stage 2 when resumed or phase-distilled)."""
    from pathlib import Path

    report = json.loads((Path(editor.model.source) / "train_report.json").read_text())
    if "init_from" in report:  # phase distillation (tools/train_fast.py --method phase) from an LCD model
        return f"lcd{report['init_from']['steps']}+phase{report['steps']}"
    before = report.get("resumed_from", {}).get("steps")
    return f"lcd{before}+{report['steps']}" if before else f"lcd{report['steps']}"


def load_cache() -> dict:
    return json.loads(CACHE.read_text()) if CACHE.exists() else {}


def save_cache(cache: dict) -> None:
    on_disk = load_cache()
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    CACHE.write_text(json.dumps({**on_disk, **cache}, indent=1, sort_keys=True) + "\n")


def settings_of(editor, settings: dict) -> str:
    d = editor.defaults.replace(**settings)
    return (f"{d.scheduler} x{d.num_inference_steps}, guidance {d.guidance_scale}, core_steps {d.core_steps}, "
            f"background {d.background_timestep}/{d.background_noise}")


def quality(editors: dict, n: int, cache: dict, quick: bool) -> str:
    cases = [scenes.make_edit_case(BASE + i) for i in range(n)]
    rows = []
    for label, model, settings in QUALITY_ROWS:
        key = f"quality|{fast_tag(editors['demo-fast']) if model == 'demo-fast' else model}|{label}|{n}"
        if key not in cache or quick:
            cache[key] = evaluate(engine_fn(editors[model], **settings), cases)
            print(key, cache[key], flush=True)
        r = cache[key]
        rows.append([label, settings_of(editors[model], settings), r["top"], r["mean"], r["psnr"], r["seam"],
                     r["seconds"]])
    t1 = table(["row", "settings", "top-1 hit", "random-candidate hit", "PSNR outside (median dB)", "seam",
                "median s per edit"], rows)
    rows = []
    for label, settings in RULE_ROWS:
        key = f"rule|{fast_tag(editors['demo-fast'])}|{label}|{n}"
        if key not in cache or quick:
            cache[key] = evaluate(engine_fn(editors["demo-fast"], background="none", **settings), cases)
            print(key, cache[key], flush=True)
        r = cache[key]
        rows.append([label, r["top"], r["mean"], r["psnr"], r["seam"]])
    t2 = table(["loop alone (background none)", "top-1 hit", "random-candidate hit", "PSNR outside (median dB)",
                "seam"], rows)
    return (f"### Quality on {n} held-out demo edits (seeds {BASE}..)\n\n{t1}\n\n"
            f"### The background's timestep at 4 steps ({n} edits, the raw decode)\n\n{t2}\n")


def tune(editors: dict, n: int, cache: dict, quick: bool) -> str:
    cases = [scenes.make_edit_case(TUNE_BASE + i) for i in range(n)]
    rows = []
    for label, settings in TUNE_ROWS:
        key = f"tune|{fast_tag(editors['demo-fast'])}|{label}|{n}"
        if key not in cache or quick:
            cache[key] = evaluate(engine_fn(editors["demo-fast"], **settings), cases)
            print(key, cache[key], flush=True)
        r = cache[key]
        rows.append([label, r["top"], r["mean"], r["psnr"], r["seam"]])
    return (f"### demo-fast at 4 steps on {n} validation edits (seeds {TUNE_BASE}..): how blended.json was picked\n\n"
            + table(["settings", "top-1 hit", "random-candidate hit", "PSNR outside (median dB)", "seam"], rows) + "\n")


def speed(editors: dict, reps: int, cache: dict) -> str:
    cases = [scenes.make_edit_case(BASE + 5000 + i) for i in range(reps)]
    rows_of = {name: RowCounter(e.model.pipe.unet) for name, e in editors.items()}
    runs = {"demo": [], "demo-fast": []}
    evals = {}
    for name in runs:  # warm-up
        editors[name].edit(Image.fromarray(cases[0][0]), Image.fromarray(cases[0][1].astype(np.uint8) * 255),
                           cases[0][2])
    for image, mask, prompt, *_ in cases:
        for name in runs:
            rows_of[name].rows = 0
            r = editors[name].edit(Image.fromarray(image), Image.fromarray(mask.astype(np.uint8) * 255), prompt)
            runs[name].append(r.timings)
            evals[name] = rows_of[name].rows
    med = lambda name, k: statistics.median(t.get(k, 0.0) for t in runs[name])  # noqa: E731
    cache["speed"] = {name: {k: med(name, k) for k in STAGES} | {"unet_evaluations": evals[name]} for name in runs}
    rows = [[k, med("demo", k), med("demo-fast", k), med("demo", k) / max(med("demo-fast", k), 1e-9)] for k in STAGES]
    rows.append(["UNet evaluations", evals["demo"], evals["demo-fast"], evals["demo"] / evals["demo-fast"]])
    d, f = editors["demo"].defaults, editors["demo-fast"].defaults
    return (f"### Speed: the demo edit at 4 steps against 20 ({reps} held-out edits, alternating, median s; "
            f"{d.num_candidates} candidates, ranking on)\n\n"
            + table([f"stage", f"demo ({d.num_inference_steps} {d.scheduler} steps, guidance {d.guidance_scale})",
                     f"demo-fast ({f.num_inference_steps} {f.scheduler} steps, guidance embedding {f.guidance_scale})",
                     "ratio"], rows) + "\n")


def sd_graph(quick: bool, reps: int, cache: dict, with_decoder: bool) -> str:
    from diffusers import StableDiffusionPipeline

    from blended.editor import Editor
    from blended.models import LoadedModel

    width, size = (0.25, 256) if quick else (1.0, 512)
    comps = sd_components(width, size)
    pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    editor = Editor(LoadedModel(pipe=pipe, name="sd15-graph", source="bench", device=torch.device("cpu"),
                                dtype=torch.float32), ranker=None)
    counter, calls = RowCounter(comps["unet"]), CallCounter(comps["unet"])
    image, mask = scene(size, size), centre_mask(size, size)
    runs = [  # (label, settings)
        ("default: ddim 50 steps, blend_start 0.25, guidance 7.5, 4 candidates", dict(num_candidates=4)),
        ("lcm 4 steps, guidance 1, 4 candidates", dict(num_candidates=4, scheduler="lcm", num_inference_steps=4,
                                                        guidance_scale=1.0)),
        ("lcm 4 steps, guidance 1, 1 candidate", dict(num_candidates=1, scheduler="lcm", num_inference_steps=4,
                                                       guidance_scale=1.0)),
    ]
    editor.edit(image, mask, "a red circle", num_candidates=1, num_inference_steps=1, rank=False)  # warm-up
    out = {}
    for label, settings in runs:
        timings = []
        for _ in range(1 if label.startswith("default") and not quick else reps):
            counter.rows = calls.n = 0
            timings.append(editor.edit(image, mask, "a red circle", rank=False, **settings).timings)
        out[label] = {k: statistics.median(t.get(k, 0.0) for t in timings) for k in STAGES}
        out[label] |= {"unet_evaluations": counter.rows, "unet_calls": calls.n}
        print(label, out[label], flush=True)
    # decoder fine-tuning next to these edits: checkpointing as before (every window over 128 px) and as now
    # (when memory asks), the paper's 75 steps (early stopping on) and fewer steps at a higher rate
    import blended.background.decoder as bg  # where `needs_checkpointing` reads CPU_ACTIVATION_BYTES

    few = dict(runs[1][1])
    lr = editor.defaults.decoder_lr
    variants = [("75 steps, checkpointing on (before)", {}, True), ("75 steps, checkpointing when memory asks", {}, False),
                ("25 steps, 2x rate", dict(decoder_steps=25, decoder_lr=2 * lr), False),
                ("15 steps, 3x rate", dict(decoder_steps=15, decoder_lr=3 * lr), False)]
    pixels = np.asarray(mask) > 127
    saved, dec = bg.CPU_ACTIVATION_BYTES, {}
    try:
        for label, settings, force in variants if with_decoder else []:
            bg.CPU_ACTIVATION_BYTES = 0 if force else saved
            r = editor.edit(image, mask, "a red circle", rank=False, background="decoder", **few, **settings)
            dec[label] = {"seconds": r.timings["background"], "psnr": psnr_outside(np.asarray(r.images[0]),
                                                                                   np.asarray(image), pixels)}
            print(label, dec[label], flush=True)
    finally:
        bg.CPU_ACTIVATION_BYTES = saved
    stitch_psnr = psnr_outside(np.asarray(editor.edit(image, mask, "a red circle", rank=False, **few).images[0]),
                               np.asarray(image), pixels) if dec else 0.0
    out["decoder"] = dec
    cache[f"sd|{width}|{size}"] = out
    labels = [label for label, _ in runs]
    rows = [[k] + [out[label][k] for label in labels] for k in STAGES]
    rows += [["UNet evaluations (batch rows)"] + [out[label]["unet_evaluations"] for label in labels],
             ["UNet calls"] + [out[label]["unet_calls"] for label in labels]]
    speedup = out[labels[0]]["total"] / out[labels[1]]["total"]
    gen = {label: out[label]["encode"] + out[label]["denoise"] + out[label]["decode"] for label in labels[:2]}
    drows = [[label, d["seconds"], d["seconds"] / gen[labels[0]], d["seconds"] / gen[labels[1]], d["psnr"]]
             for label, d in dec.items()]
    text = (f"### SD 1.5 graph, random weights, width x{width} ({params(comps['unet']):.0f} M UNet params), "
            f"{size}x{size} px, CPU {torch.get_num_threads()} thread(s), background stitch, no ranking (median s)\n\n"
            + table(["stage"] + labels, rows)
            + f"\n\n4 candidates: the default schedule / 4 LCM steps = **{speedup:.1f}x**.\n")
    if drows:
        text += ("\nDecoder fine-tuning (`--background decoder`, 4 candidates, window of the "
                 f"{size} px edit) against the generation (encode + denoise + decode) of the 50-step and the 4-step "
                 f"edit; PSNR outside the mask of the first candidate (the stitch composite: {stitch_psnr:.1f} dB):\n\n"
                 + table(["decoder fine-tuning", "seconds", "x 50-step edit", "x 4-step edit", "PSNR outside dB"],
                         drows) + "\n")
    return text


DECODER_ROWS = [  # (label, settings of `--background decoder`)
    ("defaults (75 steps at the model's rate, patience 10)", {}),
    ("25 steps at 2x the rate", "x2"),
    ("15 steps at 3x the rate", "x3"),
]


def decoder(editors: dict, n: int, cache: dict, quick: bool) -> str:
    """`--background decoder` next to the 20-step and the 4-step demo edit: seconds and PSNR outside."""
    cases = [scenes.make_edit_case(BASE + 8000 + i) for i in range(n)]
    rows = []
    for model in ("demo", "demo-fast"):
        editor = editors[model]
        lr = editor.defaults.decoder_lr
        base_key = f"decoder|{model}|stitch|{n}"
        if base_key not in cache or quick:
            cache[base_key] = timed(editor, cases, {})
        for label, scale in DECODER_ROWS:
            settings = {} if not scale else dict(decoder_steps=25 if scale == "x2" else 15,
                                                 decoder_lr=lr * (2 if scale == "x2" else 3))
            key = f"decoder|{model}|{label}|{n}"
            if key not in cache or quick:
                cache[key] = timed(editor, cases, dict(background="decoder", **settings))
                print(key, cache[key], flush=True)
            r, b = cache[key], cache[base_key]
            generation = b["encode"] + b["denoise"] + b["decode"]
            rows.append([model, label, r["background"], generation, r["background"] / generation, r["psnr"],
                         b["psnr"]])
    return (f"### Decoder fine-tuning next to the edit ({n} held-out demo edits, median s)\n\n"
            + table(["model", "decoder fine-tuning", "its seconds", "generation s (encode+denoise+decode)",
                     "ratio", "PSNR outside dB (decoder)", "PSNR outside dB (stitch)"], rows) + "\n")


def timed(editor, cases, settings: dict) -> dict:

    timings, psnrs = [], []
    for image, mask, prompt, *_ in cases:
        r = editor.edit(Image.fromarray(image), Image.fromarray(mask.astype(np.uint8) * 255), prompt, **settings)
        timings.append(r.timings)
        psnrs.append(psnr_outside(np.asarray(r.images[0]), image, mask))
    out = {k: statistics.median(t.get(k, 0.0) for t in timings) for k in STAGES}
    return out | {"psnr": statistics.median(psnrs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="quality,speed,decoder")
    ap.add_argument("--quick", action="store_true", help="3 edits per row; the SD graph at width 0.25, 256 px")
    ap.add_argument("--n", type=int, default=80, help="held-out edits per quality row")
    ap.add_argument("--n-decoder", type=int, default=12, help="held-out edits per decoder row")
    ap.add_argument("--reps", type=int, default=10, help="edits of the speed section (SD graph: repetitions)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sd-decoder", action="store_true",
                    help="sd at full size: also the decoder fine-tuning rows (about 1.5 h more on 2 cores; always with --quick)")
    ap.add_argument("--fast", default="demo-fast", help="the distilled model to measure (a folder or the preset)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from blended import Editor

    sections = args.sections.split(",")
    cache = {} if args.quick else load_cache()
    parts = []
    editors = {}
    if {"quality", "speed", "decoder", "tune"} & set(sections):
        editors = {"demo": Editor.load("demo", device="cpu"), "demo-fast": Editor.load(args.fast, device="cpu")}
    if "tune" in sections:
        parts.append(tune(editors, 3 if args.quick else args.n, cache, args.quick))
    if "quality" in sections:
        parts.append(quality(editors, 3 if args.quick else args.n, cache, args.quick))
    if "speed" in sections:
        parts.append(speed(editors, 2 if args.quick else args.reps, cache))
    if "decoder" in sections:
        parts.append(decoder(editors, 2 if args.quick else args.n_decoder, cache, args.quick))
    if "sd" in sections:
        parts.append(sd_graph(args.quick, 1 if args.quick else 2, cache, args.quick or args.sd_decoder))
    command = "python -m bench.fewstep " + " ".join(sys.argv[1:])
    text = (f"## Few-step edits\n\nCommand: `{command}` ({time.strftime('%Y-%m-%d')}; CPU timings on a 2-core "
            "machine shared with other jobs: noisy)\n\n" + "\n".join(parts))
    print(text)
    if not args.quick:
        save_cache(cache)
        name = "fewstep_sd" if sections == ["sd"] else "fewstep_tune" if sections == ["tune"] else "fewstep"
        write_doc(name, text)


if __name__ == "__main__":
    main()
