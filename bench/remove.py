"""Object removal without a prompt (issue 29): pre-fill alone, diffusion from noise with a background prompt, and
pre-fill + diffusion at several strengths and prompts, on held-out demo scenes with two and three objects.

    HF_HUB_OFFLINE=1 nice python -m bench.remove --threads 1      # writes docs/bench/remove.md
    python -m bench.remove --quick                                # smoke test, writes nothing

Each case removes one object of a held-out scene (`blended_dev.scenes.make_scene`, seeds from BASE): the mask is the
object's own mask grown by `--grow` px (a user paints a little wider than the object; its anti-aliased rim is
outside the exact mask). For every row and case the engine makes `--candidates` candidates with the demo model's
defaults (20 DDIM steps, guidance 7.5, core_steps 0.7) and ranks them. Judged:

* clear: `blended_dev.analyse.analyse_region` finds no object inside the mask (its 2 px grace included);
* PSNR inside the mask against the scene's true background (`Scene.background`, the scene without objects);
* grain: the fine texture inside the mask over that of its surroundings (`grain`; PSNR rewards a smooth fill,
  which a grainy photo shows as a flat patch: the true background scores about 1, a smooth fill near 0);
* top-1 is the ranked first candidate, "any" a random candidate (the mean over all of them).

The ranking section compares, on the same candidates, the orders `blended.remove.RemovalRanker` can give (its
`surroundings` and `removed` cosines) with the seed order and with an oracle that picks a clear one if any.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from blended import Editor
from blended.select import grow
from blended_dev import scenes
from blended_dev.analyse import analyse_region
from blended_dev.bench import table, write_doc

BASE = scenes.HELDOUT_SEED_START + 930_000  # held-out scenes no other bench uses

# label -> (prompt, settings); prompt "caption" = the caption of the objects that stay (an oracle captioner)
ROWS = {
    "pre-fill alone (Telea)": ("", {"remove": True, "remove_strength": 0.0, "remove_fill": "telea"}),
    "pre-fill alone (Navier-Stokes)": ("", {"remove": True, "remove_strength": 0.0, "remove_fill": "ns"}),
    "from noise, prompt \"background\" (a plain edit)": ("background", {}),
    "pre-fill + diffusion, strength 1.0, \"\"": ("", {"remove": True, "remove_strength": 1.0}),
    "pre-fill + diffusion, strength 0.7, \"\"": ("", {"remove": True, "remove_strength": 0.7}),
    "pre-fill + diffusion, strength 0.5, \"\"": ("", {"remove": True, "remove_strength": 0.5}),
    "pre-fill + diffusion, strength 0.35, \"\"": ("", {"remove": True, "remove_strength": 0.35}),
    "pre-fill + diffusion, strength 0.2, \"\"": ("", {"remove": True, "remove_strength": 0.2}),
    "pre-fill + diffusion, strength 0.1, \"\"": ("", {"remove": True, "remove_strength": 0.1}),
    "pre-fill + diffusion, strength 0.5, \"background\"": ("background", {"remove": True, "remove_strength": 0.5}),
    "pre-fill + diffusion, strength 0.5, caption of the rest": ("caption", {"remove": True, "remove_strength": 0.5}),
    "pre-fill (NS) + diffusion, strength 0.5, \"\"": ("", {"remove": True, "remove_strength": 0.5,
                                                          "remove_fill": "ns"}),
    "pre-fill (NS) + diffusion, strength 0.2, \"\"": ("", {"remove": True, "remove_strength": 0.2,
                                                          "remove_fill": "ns"}),
}
ORDERS = ("seed order", "surroundings", "removed", "both", "oracle")
BY_KIND = (0, 1, 2, 7, 5)  # rows (0-based) whose top-1 the per-background table shows


def cases(n: int, grow_px: int) -> list[tuple]:
    """(scene, object index, mask) for `n` removals: half from scenes with two objects, half with three."""
    out, seed = [], BASE
    while len(out) < n:
        count = 2 if len(out) < (n + 1) // 2 else 3
        sc = scenes.make_scene(seed, count)
        seed += 1
        if len(sc.objects) != count:  # the scene had no room for all its objects
            continue
        k = seed % count
        out.append((sc, k, grow(sc.masks[k], grow_px)))
    return out


def psnr_in(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    mse = float(((a.astype(np.float64)[mask] - b.astype(np.float64)[mask]) ** 2).mean())
    return 10 * math.log10(255.0**2 / max(mse, 1e-10))


def grain(a: np.ndarray, mask: np.ndarray) -> float:
    """Fine texture inside the mask over that of the surroundings: the median |high-pass| (grey minus its Gaussian
    blur, sigma 1 px) inside the mask (eroded by 2 px) over the same 9 to 16 px outside it (beyond the seam band).
    A smooth fill scores near 0; the scene's own texture about 1 (the true background's value is in the table)."""
    import cv2

    g = a.astype(np.float32).mean(-1)
    hp = np.abs(g - cv2.GaussianBlur(g, (0, 0), 1.0))
    inner = cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    dist = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, 3)
    ring = (dist > 9) & (dist <= 16)
    return float(np.median(hp[inner if inner.any() else mask]) / max(float(np.median(hp[ring])), 1e-3))


def judged(image: Image.Image, sc, mask: np.ndarray) -> tuple[bool, float, float]:
    a = np.asarray(image)
    return analyse_region(a, mask) == (None, None), psnr_in(a, sc.background, mask), grain(a, mask)


def order(name: str, cands: list[dict]) -> dict:
    """The candidate a ranking picks: `cands` hold seed, clear, psnr and the removal ranker's cosines."""
    if name == "seed order":
        return min(cands, key=lambda c: c["seed"])
    if name == "oracle":
        return max(cands, key=lambda c: (c["clear"], c["psnr"]))
    key = {"surroundings": lambda c: c["surroundings"], "removed": lambda c: -c["removed"],
           "both": lambda c: c["surroundings"] - c["removed"]}[name]
    return max(cands, key=key)


def run_rows(editor: Editor, todo: list[tuple], rows: dict, n_cand: int) -> dict[str, list]:
    """label -> per case: (ranked first (clear, psnr), all candidates as dicts, seconds)."""
    out: dict[str, list] = {label: [] for label in rows}
    for i, (sc, k, mask) in enumerate(todo):
        rest = scenes.caption_of([o for j, o in enumerate(sc.objects) if j != k])
        for label, (prompt, settings) in rows.items():
            cfg = editor.defaults.replace(num_candidates=n_cand, **settings)
            t0 = time.perf_counter()
            result = editor.edit(Image.fromarray(sc.image), Image.fromarray(mask.astype(np.uint8) * 255),
                                 rest if prompt == "caption" else prompt, cfg)
            seconds = time.perf_counter() - t0
            cands = []
            for c in result.candidates:
                clear, psnr, texture = judged(c.image, sc, mask)
                cands.append({"seed": c.seed, "clear": clear, "psnr": psnr, "grain": texture, **c.scores})
            out[label].append((cands[0]["clear"], cands[0]["psnr"], cands, seconds, sc.background_kind))
        print(f"case {i + 1}/{len(todo)}", flush=True)
    return out


def vae_ceiling(editor: Editor, todo: list[tuple]) -> tuple[float, float]:
    """Mean PSNR inside the mask of the true background through the VAE (no diffusion row can pass it), and the
    true background's own `grain`."""
    vals, grains = [], []
    for sc, _, mask in todo:
        grains.append(grain(sc.background, mask))
        x = torch.from_numpy(sc.background.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        with torch.no_grad():
            y = editor.vae_decode(editor.model.encode(x))
        a = ((y[0].clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).cpu().numpy().astype(np.uint8)
        vals.append(psnr_in(a, sc.background, mask))
    return statistics.mean(vals), statistics.mean(grains)


def paired(a: list, b: list) -> str:
    """Mean of b - a over the same cases with a 95 % interval (normal approximation): "+0.5 (-0.1 to +1.1)"."""
    d = np.asarray(b, np.float64) - np.asarray(a, np.float64)
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else 0.0
    return f"{d.mean():+.3f} ({d.mean() - half:+.3f} to {d.mean() + half:+.3f})"


def default_label(rows: dict) -> str | None:
    """The row that runs `--remove` with the engine's defaults, if it was run."""
    from blended import EditConfig

    d = EditConfig()
    want = {"remove": True, "remove_strength": d.remove_strength}
    return next((k for k, (p, s) in rows.items() if p == "" and {**s, "remove_fill": s.get("remove_fill", d.remove_fill)}
                 == {**want, "remove_fill": d.remove_fill}), None)


def main_table(results: dict[str, list], reference: tuple[float, float], base: str | None) -> str:
    mean = statistics.mean
    head = ["row", "clear, top-1", "clear, any", "PSNR in mask, top-1 (dB)", "PSNR, any (dB)", "grain, top-1",
            "s / edit", "vs the default: clear, top-1 (95 %)", "PSNR, top-1 (95 %)"]
    body = []
    for label, rs in results.items():
        vs = ["-", "-"] if base is None or label == base else \
            [paired([r[0] for r in results[base]], [r[0] for r in rs]),
             paired([r[1] for r in results[base]], [r[1] for r in rs])]
        body.append([("**default**: " if label == base else "") + label, f"{mean(r[0] for r in rs):.3f}",
                     f"{mean(c['clear'] for r in rs for c in r[2]):.3f}", f"{mean(r[1] for r in rs):.2f}",
                     f"{mean(c['psnr'] for r in rs for c in r[2]):.2f}", f"{mean(r[2][0]['grain'] for r in rs):.2f}",
                     f"{mean(r[3] for r in rs):.2f}", *vs])
    body.append(["the true background (PSNR: through the VAE, the ceiling of any diffusion row)", "1.000", "1.000",
                 f"{reference[0]:.2f}", f"{reference[0]:.2f}", f"{reference[1]:.2f}", "-", "-", "-"])
    return table(head, body)


def ranking_table(results: dict[str, list]) -> str:
    mean = statistics.mean
    body = []
    for label, rs in results.items():
        if "removed" not in rs[0][2][0] or all(len({c["psnr"] for c in r[2]}) == 1 for r in rs):
            continue  # ranked by the prompt (a plain edit), or identical candidates (the pre-fill alone)
        picks = {o: [order(o, r[2]) for r in rs] for o in ORDERS}
        body.append([label] + [f"{mean(p['clear'] for p in picks[o]):.3f} / {mean(p['psnr'] for p in picks[o]):.2f}"
                               for o in ORDERS])
    return table(["row"] + [f"{o}: clear / PSNR" for o in ORDERS], body)


def kind_table(results: dict[str, list]) -> str:
    labels = [k for i, k in enumerate(ROWS) if i in BY_KIND and k in results]
    kinds = sorted({r[4] for rs in results.values() for r in rs})
    body = []
    for kind in kinds:
        row = [kind, sum(r[4] == kind for r in results[labels[0]])] if labels else [kind, 0]
        row += [f"{statistics.mean(r[0] for r in results[k] if r[4] == kind):.2f} / "
                f"{statistics.mean(r[1] for r in results[k] if r[4] == kind):.1f} / "
                f"{statistics.mean(r[2][0]['grain'] for r in results[k] if r[4] == kind):.2f}" for k in labels]
        body.append(row)
    return table(["background", "cases"] + [f"{k}: clear / PSNR / grain" for k in labels], body)


def tables(results: dict[str, list], reference: tuple[float, float], n: int, rows: dict) -> str:
    return "\n\n".join([
        f"### Removals ({n} held-out cases)\n\n" + main_table(results, reference, default_label(rows)),
        "### Which candidate the removal ranking picks (the same candidates)\n\n" + ranking_table(results),
        "### Top-1 by the scene's background\n\n" + kind_table(results)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=60, help="held-out removals (half two-object, half three-object scenes)")
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--grow", type=int, default=2, help="px the object's mask grows by")
    ap.add_argument("--rows", default=None, help="comma-separated row numbers (1-based) to run; default all")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write every case's results to this file")
    ap.add_argument("--quick", action="store_true", help="2 cases, 2 candidates, 3 rows, write nothing")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = dict(ROWS)
    if args.quick:
        args.n, args.candidates = 2, 2
        rows = {k: ROWS[k] for k in list(ROWS)[:1] + list(ROWS)[2:3] + list(ROWS)[7:8]}
    elif args.rows:
        rows = {k: ROWS[k] for i, k in enumerate(ROWS, 1) if str(i) in args.rows.split(",")}
    editor = Editor.load("demo")
    todo = cases(args.n, args.grow)
    results = run_rows(editor, todo, rows, args.candidates)
    text = (f"Command: `python -m bench.remove --n {args.n} --candidates {args.candidates} --grow {args.grow}"
            + (f" --threads {args.threads}" if args.threads else "") + f"`; torch threads {torch.get_num_threads()}; "
            "the CPU is shared with other jobs, so timings are noisy.\n\n"
            + tables(results, vae_ceiling(editor, todo), len(todo), rows))
    print(text, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({k: [{"clear": r[0], "psnr": r[1], "candidates": r[2], "seconds": r[3],
                                                    "background": r[4]} for r in rs] for k, rs in results.items()}))
    if not args.quick:
        print(write_doc("remove", text + "\n"))


if __name__ == "__main__":
    main()
