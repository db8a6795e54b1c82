"""A 9-channel inpainting UNet with blending, with and without its conditioning, on held-out demo edits (issue 20).

    OMP_NUM_THREADS=1 python -m tools.train_inpaint_demo --out /tmp/demo-inpaint      # the model (~12 min)
    OMP_NUM_THREADS=1 python -m bench.inpaint --model /tmp/demo-inpaint --n 80        # writes docs/bench/inpaint.md

Rows, all with the engine's defaults (blending every step, exact composite outside the mask):
  demo (4-ch)       the bundled text-to-image demo model the 9-channel one was fine-tuned from
  9-ch, w=1         the UNet sees the mask and the source with the mask's pixels blanked (the default)
  9-ch, w=0.5 / 0   `inpainting_mask_weight`: half / all of the source shown under the mask
  9-ch, off         `inpainting_conditioning=False`: zeros in the extra channels (the UNet as text-to-image)

Metrics (blended_dev/edits.py's evaluate): top-1 hit (the ranker's first of 4 candidates shows the asked colour and
shape in the mask, 2 px grace), random-candidate hit, the same on the larger half of the masks, median PSNR
outside the mask, seconds per edit. Seeds: scenes.HELDOUT_SEED_START + 900_000 on, used by no other bench.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from blended_dev import ROOT, scenes
from blended_dev.bench import table, write_doc
from blended_dev.edits import engine_fn, evaluate, paired

BASE = scenes.HELDOUT_SEED_START + 900_000

ROWS = {
    "demo (4-ch)": ("demo", {}),
    "9-ch, w=1 (default)": ("inpaint", {}),
    "9-ch, w=0.5": ("inpaint", {"inpainting_mask_weight": 0.5}),
    "9-ch, w=0": ("inpaint", {"inpainting_mask_weight": 0.0}),
    "9-ch, off (zeros)": ("inpaint", {"inpainting_conditioning": False}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/demo-inpaint", help="the 9-channel demo model folder")
    ap.add_argument("--n", type=int, default=80)
    ap.add_argument("--rows", default="|".join(ROWS), help="row names separated by |")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=str(ROOT / "docs" / "bench" / "inpaint.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from blended import Editor

    editors = {"demo": Editor.load("demo"), "inpaint": Editor.load(args.model)}
    assert editors["inpaint"].model.is_inpainting, f"{args.model} is not a 9-channel model"
    editors["inpaint"].ranker = editors["demo"].ranker  # the same judge-independent ranker for every row
    cases = [scenes.make_edit_case(BASE + i) for i in range(args.n)]
    large = np.array([c[1].sum() for c in cases]) >= np.median([c[1].sum() for c in cases])
    results = {}
    for name in args.rows.split("|"):
        which, settings = ROWS[name]
        res = evaluate(engine_fn(editors[which], **settings), cases)
        res["top_large"] = float(np.mean([t == "1" for t, big in zip(res["tops"], large) if big]))
        results[name] = res
        print(name, {k: v for k, v in res.items() if k not in ("tops", "stricts")}, flush=True)
    ref = results.get("demo (4-ch)")
    rows = [[name, r["top"], paired(ref, r) if ref and r is not ref else "-", r["mean"], r["top_large"], r["psnr"],
             r["seconds"]] for name, r in results.items()]
    text = table(["model / conditioning", "top-1 hit", "vs demo (paired, 95 %)", "random-candidate hit",
                  "top-1, larger half of masks", "PSNR outside (dB, median)", "s / edit"], rows)
    header = (f"# 9-channel inpainting UNet with blending ({args.n} held-out demo edits, 4 candidates, the demo's "
              f"defaults; `python -m bench.inpaint --model {args.model} --n {args.n}`; timings on a shared 2-core "
              "CPU, noisy)\n\n")
    print(text)
    write_doc("inpaint", header + text + "\n")
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
