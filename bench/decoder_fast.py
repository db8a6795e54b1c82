"""Decoder fine-tuning ("Preserve faces and text", `--background decoder`) at few-step speed (issue 21): its
seconds next to the 4-step edit it follows, and the PSNR outside the mask of the final composite, for settings
that make it cheaper (docs/fewstep.md, "Decoder fine-tuning at few-step speed").

Two setups, each edit run end to end through `Editor.edit`, rows alternating within one process (the CPU is
shared, so ratios are what to read):

  sd    the SD 1.5 graph with random weights (blended_dev/tiny.py's sd_components) at width 0.25 and 256 px, one
        edit (bench/fewstep.py's scene and centre mask), 4 candidates at 4 LCM steps without guidance. A random
        decoder decodes poorly (stitch: 27 dB outside), so the fine-tuning has more to learn than on a trained
        VAE: read its timings, and its PSNR as a rough guide only
  demo  demo-fast (assets/demo-fast, 4 steps, a trained 64 px VAE) on held-out edit cases (bench/fewstep.py's
        decoder seeds), median seconds and median PSNR over the cases

The "x 4-step edit" column divides the decoder's cost (the `background` stage, plus what recording the
GroupNorm statistics adds to the `decode` stage) by the generation of the same edit with `stitch` (encode +
denoise + decode), measured in the same process, each decoder edit right after its stitch edit. Wall time
on a shared CPU swings by 20 % between runs, so "CPU time" gives the same ratio from the process's CPU
seconds: (decoder edit - stitch edit) / stitch edit, whole edits.

    python -m bench.decoder_fast --threads 1 --reps 3 --fifty   # both, writes docs/bench/decoder_fast.md (~20 min)
    python -m bench.decoder_fast --sections demo --n 4       # a quick look
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image

from blended_dev import scenes
from blended_dev.bench import centre_mask, scene, table, write_doc
from blended_dev.edits import FEWSTEP_BASE, psnr_outside
from blended_dev.tiny import sd_components

BASE = FEWSTEP_BASE  # bench/fewstep.py's held-out edits: the cases of its decoder section

GENERATION = ("encode", "denoise", "decode")
HEADERS = ["decoder fine-tuning", "seconds", "x 4-step edit", "x 4-step edit, CPU time",
           "PSNR outside dB (candidate 0)",
           "PSNR outside dB (mean of 4)"]
FAST = dict(decoder_blocks=1, decoder_schedule="linear", decoder_lr=2e-3, decoder_patience=0)  # + the band loss


def rows_for(lr: float) -> list[tuple[str, dict]]:
    """(label, settings of `--background decoder`) at a model whose `decoder_lr` is `lr`. The "old" row runs
    without the statistics recorded during the edit's decode (one more decode of every candidate, as before)."""
    paper = dict(decoder_loss="window")
    return [
        ("before: 75 steps, window loss, statistics by one more decode", dict(paper, old=True)),
        ("75 steps, window loss, statistics from the edit's decode", paper),
        ("**default now**: 75 steps, band loss (window = the band)", {}),
        ("25 steps at 2x the rate, window loss (the old trade-off)", dict(paper, decoder_steps=25,
                                                                          decoder_lr=2 * lr)),
        ("last up block, band loss, linear decay from 2e-3, 120 steps", dict(FAST, decoder_steps=120)),
        ("last up block, band loss, linear decay from 2e-3, 100 steps", dict(FAST, decoder_steps=100)),
    ]


class OldStatistics:
    """Within the block, `decoder` records the GroupNorm statistics itself, with one more decode of each
    candidate (the behaviour before `DecodeStats`)."""

    def __enter__(self):
        import blended.background as bg

        self.bg, self.saved = bg, bg.DecodeStats.stats
        bg.DecodeStats.stats = lambda self, batch: None
        return self

    def __exit__(self, *exc):
        self.bg.DecodeStats.stats = self.saved


def run_edit(editor, image, mask, prompt, settings: dict) -> tuple[dict, list[float]]:
    """One edit: its stage timings (and "cpu": the process's CPU seconds for the whole edit) and the PSNR outside
    the mask of each candidate's final composite."""
    settings = dict(settings)
    old = settings.pop("old", False)
    cpu = time.process_time()
    if old:
        with OldStatistics():
            r = editor.edit(image, mask, prompt, rank=False, **settings)
    else:
        r = editor.edit(image, mask, prompt, rank=False, **settings)
    cpu = time.process_time() - cpu
    pixels = np.asarray(mask) > 127
    src = np.asarray(image)
    return r.timings | {"cpu": cpu}, [psnr_outside(np.asarray(im), src, pixels) for im in r.images]


def measure(editor, cases: list, rows: list[tuple[str, dict]], reps: int, few: dict) -> tuple[dict, list[list]]:
    """Alternating runs: per case and repetition the stitch edit, then every row (`few`: settings of every edit).
    Returns the stitch edit's medians and the table rows."""
    base_t, base_p = [], []
    got = {label: ([], [], [], [], []) for label, _ in rows}  # cost, ratio, psnr of candidate 0, mean psnr, cpu ratio
    for image, mask, prompt in cases:
        for _ in range(reps):
            t, p = run_edit(editor, image, mask, prompt, dict(few, background="stitch"))
            gen = sum(t[k] for k in GENERATION)
            base_t.append(gen)
            base_p.append(p[0])
            for label, settings in rows:
                td, pd = run_edit(editor, image, mask, prompt, dict(few, background="decoder", **settings))
                cost = td["background"] + max(td["decode"] - t["decode"], 0.0)  # + recording the statistics
                g = got[label]
                g[0].append(cost), g[1].append(cost / gen), g[2].append(pd[0]), g[3].append(float(np.mean(pd)))
                g[4].append((td["cpu"] - t["cpu"]) / t["cpu"])  # CPU seconds: less sensitive to other jobs
                print(f"{label}: {cost:.2f} s, x{cost / gen:.2f} (CPU x{g[4][-1]:.2f}), {pd[0]:.2f} dB", flush=True)
    med = statistics.median
    out = [[label, med(g[0]), med(g[1]), med(g[4]), med(g[2]), med(g[3])] for label, g in got.items()]
    return dict(generation=med(base_t), psnr=med(base_p)), out


def sd(reps: int, with_fifty: bool) -> str:
    from diffusers import StableDiffusionPipeline

    from blended.editor import Editor
    from blended.models import LoadedModel

    comps = sd_components(0.25, 256)
    pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    editor = Editor(LoadedModel(pipe=pipe, name="sd15-graph", source="bench", device=torch.device("cpu"),
                                dtype=torch.float32), ranker=None)
    few = dict(num_candidates=4, scheduler="lcm", num_inference_steps=4, guidance_scale=1.0)
    image, mask = scene(256, 256), centre_mask(256, 256)
    editor.edit(image, mask, "a red circle", num_candidates=1, num_inference_steps=1, rank=False)  # warm-up
    base, out = measure(editor, [(image, mask, "a red circle")], rows_for(editor.defaults.decoder_lr), reps, few)
    headers, fifty = HEADERS, ""
    if with_fifty:  # the default schedule once (about 40x the 4-step edit): decoder cost against it
        t, _ = run_edit(editor, image, mask, "a red circle", dict(num_candidates=4, background="stitch"))
        gen50 = sum(t[k] for k in GENERATION)
        headers = HEADERS[:3] + ["x 50-step edit"] + HEADERS[3:]
        out = [row[:3] + [row[1] / gen50] + row[3:] for row in out]
        fifty = (" The default edit (ddim 50 steps, blend_start 0.25, guidance 7.5, 4 candidates), run once: "
                 f"generation {gen50:.0f} s.")
    return (f"### SD 1.5 graph (random weights, width x0.25, 256 px, a 102 px square mask), 4 candidates at 4 LCM "
            f"steps; median of {reps} alternating runs\n\n"
            f"4-step edit (stitch): generation {base['generation']:.2f} s, PSNR outside {base['psnr']:.1f} dB."
            f"{fifty}\n\n"
            + table(headers, out) + "\n")


def demo(n: int, fast: str) -> str:
    from blended import Editor

    editor = Editor.load(fast, device="cpu")
    cases = []
    for image, m, prompt, *_ in (scenes.make_edit_case(BASE + 8000 + i) for i in range(n)):
        cases.append((Image.fromarray(image), Image.fromarray(m.astype(np.uint8) * 255), prompt))
    editor.edit(*cases[0], rank=False)  # warm-up
    base, out = measure(editor, cases, rows_for(editor.defaults.decoder_lr), 1, {})
    d = editor.defaults
    return (f"### {fast} ({d.num_inference_steps} {d.scheduler} steps, decoder_lr {d.decoder_lr:g}), {n} held-out "
            "edits, 4 candidates; medians over the edits\n\n"
            f"4-step edit (stitch): generation {base['generation']:.3f} s, PSNR outside {base['psnr']:.1f} dB.\n\n"
            + table(HEADERS, out) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="sd,demo")
    ap.add_argument("--n", type=int, default=12, help="held-out demo edits")
    ap.add_argument("--reps", type=int, default=2, help="alternating runs of the SD edit")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fifty", action="store_true", help="sd: also the default 50-step edit once (~4 min more)")
    ap.add_argument("--fast", default="demo-fast", help="the few-step demo model (a folder or the preset)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sections = args.sections.split(",")
    parts = []
    if "sd" in sections:
        parts.append(sd(args.reps, args.fifty))
    if "demo" in sections:
        parts.append(demo(args.n, args.fast))
    command = "python -m bench.decoder_fast " + " ".join(sys.argv[1:])
    text = (f"## Decoder fine-tuning at few-step speed\n\nCommand: `{command}` ({time.strftime('%Y-%m-%d')}; CPU, "
            f"{torch.get_num_threads()} thread(s), a 2-core machine shared with other jobs: read ratios)\n\n"
            + "\n".join(parts))
    print(text)
    if sections == ["sd", "demo"] or sections == ["demo", "sd"]:
        write_doc("decoder_fast", text)


if __name__ == "__main__":
    main()
