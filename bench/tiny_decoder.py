"""The demo models' tiny decoder (issue 31, assets/demo/vae_tiny from tools/train_tiny_decoder.py) against their
full VAE decoder, in whole edits.

Each held-out demo edit (seeds HELDOUT_SEED_START + 920_000 upwards) runs twice with the model's defaults and
the same seeds, `decode="full"` and `decode="tiny"` (alternating which goes first): the blending loop's latents
are the same, only the decode differs. Per model:

* PSNR inside the mask of each tiny-decoded candidate against the full-decoded one of the same seed (the final
  images; beyond the seam band outside it both are the upload), median and 10th percentile over all candidates;
* the top-1 hit (blended_dev.analyse on the candidate the demo ranker puts first) with each decoder, their paired
  difference with a 95 % interval, how often the ranker picks the same seed, and the random-candidate hit;
* the median seconds of the decode stage (`timings["decode"]`) and of the whole edit.

    python -m bench.tiny_decoder --n 200 --n-demo 100          # demo-fast, and demo (20 steps) on the first 100
    python -m bench.tiny_decoder --n 200 --models demo-fast    # the few-step model alone
    python -m bench.tiny_decoder --quick                        # 3 edits, prints, writes nothing
    python -m bench.tiny_decoder --models demo-fast --decode /tmp/vae_tiny   # a candidate decoder: prints only

Writes docs/bench/tiny_decoder.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from blended_dev import ROOT, scenes
from blended_dev.analyse import analyse_region
from blended_dev.bench import table, write_doc
from blended_dev.edits import paired

BASE = scenes.HELDOUT_SEED_START + 920_000  # held-out edits (issue 31's choice; bench/selection.py's edits too)
TINY = ROOT / "assets" / "demo" / "vae_tiny"


def psnr_inside(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB) of the pixels inside `mask` (inf-free: a perfect match counts as 100 dB)."""
    mse = float(((a.astype(np.float64)[mask] - b.astype(np.float64)[mask]) ** 2).mean())
    return 10 * np.log10(255.0**2 / max(mse, 1e-10))


def hit(image, mask: np.ndarray, colour: str, shape: str) -> bool:
    """The analyser's judgement (blended_dev.edits.evaluate's): the asked colour and shape in the mask, 2 px grace."""
    c, s = analyse_region(np.asarray(image), mask, grow=2)
    return c == colour and s == shape


def run_pair(editor, case, first: str, tiny: str) -> dict:
    """One edit decoded both ways (`first` runs first; `tiny`: the `decode` value of the tiny side): per-candidate
    PSNR, hits, same top seed, seconds."""
    image, mask, prompt, colour, shape = case
    pil, pil_mask = Image.fromarray(image), Image.fromarray(mask.astype(np.uint8) * 255)
    order = ("full", "tiny") if first == "full" else ("tiny", "full")
    res = {d: editor.edit(pil, pil_mask, prompt, decode="full" if d == "full" else tiny) for d in order}
    for d, r in res.items():
        if d == "tiny" and any("decoded with the full decoder" in n for n in r.notes):
            raise SystemExit(f"decode 'tiny' fell back to the full decoder: {r.notes}")
    by_seed = {c.seed: np.asarray(c.image) for c in res["full"].candidates}
    out = {"psnr": [psnr_inside(np.asarray(c.image), by_seed[c.seed], mask) for c in res["tiny"].candidates],
           "same_top": res["tiny"].candidates[0].seed == res["full"].candidates[0].seed}
    for d, r in res.items():
        hits = [hit(c.image, mask, colour, shape) for c in r.candidates]
        out[d] = {"top": hits[0], "mean": float(np.mean(hits)), "decode": r.timings["decode"],
                  "total": r.timings["total"]}
    return out


def measure(editor, cases, label: str, tiny: str) -> dict:
    """`run_pair` over `cases`, summarised: PSNR median / p10, hits, paired top-1 difference, seconds."""
    editor.edit(Image.fromarray(cases[0][0]), Image.fromarray(cases[0][1].astype(np.uint8) * 255), cases[0][2],
                decode=tiny)  # warm-up: loads the tiny decoder once
    rows, t0 = [], time.time()
    for i, case in enumerate(cases):
        rows.append(run_pair(editor, case, "full" if i % 2 == 0 else "tiny", tiny))
        if (i + 1) % 25 == 0:
            print(f"{label}: {i + 1}/{len(cases)} edits ({time.time() - t0:.0f}s)", flush=True)
    psnrs = [p for r in rows for p in r["psnr"]]
    out = {"n": len(rows), "psnr_median": float(statistics.median(psnrs)), "psnr_p10": float(np.percentile(psnrs, 10)),
           "same_top": float(np.mean([r["same_top"] for r in rows]))}
    for d in ("full", "tiny"):
        out[d] = {"top": float(np.mean([r[d]["top"] for r in rows])),
                  "tops": "".join("1" if r[d]["top"] else "0" for r in rows),
                  "mean": float(np.mean([r[d]["mean"] for r in rows])),
                  "decode_s": statistics.median(r[d]["decode"] for r in rows),
                  "total_s": statistics.median(r[d]["total"] for r in rows)}
    out["top_diff"] = paired(out["full"], out["tiny"])
    return out


def settings_of(editor) -> str:
    d = editor.defaults
    return f"{d.scheduler} x{d.num_inference_steps}, guidance {d.guidance_scale}, {d.num_candidates} candidates"


def report_table(results: dict) -> str:
    rows = []
    for model, (settings, r) in results.items():
        f, t = r["full"], r["tiny"]
        rows.append([model, settings, r["n"], r["psnr_median"], r["psnr_p10"], f["top"], t["top"],
                     r["top_diff"], r["same_top"], f["mean"], t["mean"], f["decode_s"], t["decode_s"],
                     f["decode_s"] / max(t["decode_s"], 1e-9), f["total_s"], t["total_s"]])
    return table(["model", "settings (its defaults)", "edits", "PSNR in mask, tiny vs full (median dB)",
                  "PSNR p10 dB", "top-1 hit full", "top-1 hit tiny", "tiny - full (95 % interval)",
                  "same top seed", "random-candidate hit full", "random-candidate hit tiny", "decode s full",
                  "decode s tiny", "decode ratio", "edit s full", "edit s tiny"], rows)


def about_decoder(folder: Path) -> str:
    """One line on the tiny decoder in `folder` from its train_report.json."""
    rep = json.loads((folder / "train_report.json").read_text())
    if not rep.get("finished"):
        return f"The tiny decoder: a checkpoint of an unfinished run ({rep.get('steps')} steps)."
    val, dec = rep["val"], rep["decode"]
    first = rep.get("init_from")  # a second stage (tools/train_tiny_decoder.py --init)
    steps = f"{rep['steps']} steps in {rep['seconds'] / 60:.0f} min" + (
        f" after a first stage of {first['steps']} in {first['seconds'] / 60:.0f} min" if first else "")
    return (f"The tiny decoder: {rep['params']['decoder']:,} parameters (the full decoder "
            f"{rep['params']['full_decoder']:,}), {steps} on "
            f"{rep['args']['threads']} thread(s); validation PSNR against the full decoder "
            f"{val['val_scenes']['median_db']:.1f} dB (held-out scenes), {val['val_gen']['median_db']:.1f} dB "
            f"(held-out demo-fast edits' latents); conv MACs per 64 px image {dec['full_macs_m']:.0f} M -> "
            f"{dec['tiny_macs_m']:.0f} M ({dec['macs_ratio']:.1f}x), a batch-4 decode {dec['full_s'] * 1e3:.0f} -> "
            f"{dec['tiny_s'] * 1e3:.0f} ms ({dec['time_ratio']:.1f}x) when it was trained.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="held-out edits of demo-fast (and of any model but demo)")
    ap.add_argument("--n-demo", type=int, default=100, help="held-out edits of demo (20 steps: 5x the UNet calls)")
    ap.add_argument("--models", default="demo-fast,demo", help="bundled models to measure, at their defaults")
    ap.add_argument("--decode", default="tiny", help="the tiny side: \"tiny\" (the model folder's vae_tiny/) or a "
                    "tiny decoder folder (a candidate, before it is bundled)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="3 edits per model; print only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from blended import Editor

    results = {}
    for model in args.models.split(","):
        n = 3 if args.quick else args.n_demo if model == "demo" else args.n
        cases = [scenes.make_edit_case(BASE + i) for i in range(n)]  # the first n: demo's are demo-fast's first
        editor = Editor.load(model, device="cpu")
        results[model] = (settings_of(editor), measure(editor, cases, model, args.decode))
        print(model, {k: v for k, v in results[model][1].items() if k not in ("full", "tiny")}, flush=True)
    command = "python -m bench.tiny_decoder " + " ".join(sys.argv[1:])
    text = (f"## Tiny decoder (issue 31): `decode=\"tiny\"` against the full VAE decoder\n\n"
            f"Command: `{command}` ({time.strftime('%Y-%m-%d')}; CPU, {args.threads} thread(s), a 2-core machine "
            f"shared with other jobs: timings are noisy, compare the two columns of a row)\n\n"
            f"Held-out demo edits (seeds {BASE}.., the number in the row's `edits`), each run with the full and the tiny decoder, the same seeds "
            "(the loop's latents are the same); PSNR over the pixels inside the mask of every candidate, tiny against "
            "full, same seed; hits judged by blended_dev.analyse on the ranked best candidate (top-1) and on every "
            "candidate (random-candidate); seconds are medians.\n\n"
            + report_table(results) + "\n\n" + about_decoder(TINY if args.decode == "tiny" else Path(args.decode))
            + "\n")
    print(text)
    if not args.quick and args.decode == "tiny":  # a candidate decoder's numbers are printed only
        write_doc("tiny_decoder", text)


if __name__ == "__main__":
    main()
