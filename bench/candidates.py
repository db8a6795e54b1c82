"""Candidates counted by the second (issue 31): top-1 hit against seconds per edit when a few-step model spends
its time on more candidates instead of more steps.

Rows: the demo model at its defaults (20 steps) x 4 candidates; demo-fast at its defaults (4 LCM steps) x 1, 2, 4,
8, 16 candidates. Held-out demo edits (seeds HELDOUT_SEED_START + 930_000 upwards: used for no choice anywhere;
bench/remove.py and the text segmenter's evaluation build other cases from the same range), the judge and the
ranker of bench/fewstep.py's quality section; the rows run interleaved, edit by edit, so that a busy machine slows
them alike.

    python -m bench.candidates --n 60 --threads 1      # about 10 minutes on a busy core
    python -m bench.candidates --quick                 # 3 edits, nothing written

Writes docs/bench/candidates.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

from bench.fewstep import RowCounter
from blended_dev import scenes
from blended_dev.bench import table, wilson, write_doc
from blended_dev.edits import engine_fn, evaluate, paired

BASE = scenes.HELDOUT_SEED_START + 930_000
ROWS = [("demo, 20 steps (its defaults)", "demo", 4)] + [
    ("demo-fast, 4 steps (its defaults)", "demo-fast", k) for k in (1, 2, 4, 8, 16)]


def measure(editors: dict, cases: list) -> dict:
    """Per row: the per-edit results of `evaluate` (one case at a time, rows interleaved) and UNet rows per edit."""
    counters = {name: RowCounter(e.model.pipe.unet) for name, e in editors.items()}
    fns = [engine_fn(editors[model], num_candidates=k) for _, model, k in ROWS]
    for fn in fns:  # warm-up
        fn(cases[0][0], cases[0])
    per_row = [[] for _ in ROWS]
    evals = [0] * len(ROWS)
    for i, case in enumerate(cases):
        for r, ((label, model, k), fn) in enumerate(zip(ROWS, fns)):
            counters[model].rows = 0
            per_row[r].append(evaluate(fn, [case]))
            evals[r] += counters[model].rows
        print(f"edit {i + 1}/{len(cases)}", flush=True)
    out = {}
    for r, (label, model, k) in enumerate(ROWS):
        res = per_row[r]
        out[(label, k)] = dict(tops="".join(x["tops"] for x in res), mean=float(np.mean([x["mean"] for x in res])),
                               seconds=statistics.median(x["seconds"] for x in res), evals=evals[r] / len(cases))
    return out


def report(editors: dict, out: dict, n: int, command: str) -> str:
    base = out[(ROWS[0][0], ROWS[0][2])]
    rows, above = [], None
    for label, model, k in ROWS:
        r = out[(label, k)]
        hits = r["tops"].count("1")
        lo, hi = wilson(hits, n)
        step = paired(above, r) if above and model == "demo-fast" and above is not base else "-"
        above = r
        rows.append([label, k, f"{hits / n:.3f} ({lo:.2f}-{hi:.2f})", paired(base, r), step, f"{r['mean']:.3f}",
                     f"{r['seconds']:.3f}", f"{r['seconds'] / base['seconds']:.2f}", f"{r['evals']:.0f}"])
    d, f = editors["demo"].defaults, editors["demo-fast"].defaults
    return (f"## Candidates counted by the second\n\nCommand: `{command}` ({time.strftime('%Y-%m-%d')}; "
            f"{torch.get_num_threads()} CPU thread(s), a 2-core machine shared with other jobs: the seconds are "
            f"noisy, the rows ran interleaved edit by edit)\n\n"
            f"{n} held-out demo edits (seeds {BASE}..); demo: {d.scheduler} x{d.num_inference_steps}, guidance "
            f"{d.guidance_scale}; demo-fast: {f.scheduler} x{f.num_inference_steps}, guidance embedding "
            f"{f.guidance_scale}; candidates ranked by the demo ranker (`ranker_for`), the first one judged. "
            "Top-1 hit with its 95 % Wilson interval; the paired differences on the same edits against the first row "
            "and against the row above (half the candidates; 95 % intervals, normal approximation); random-candidate "
            "hit = the mean hit over all candidates (what an edit without ranking gets); UNet evaluations = rows of "
            "the UNet's batches per edit (a guided candidate counts twice).\n\n"
            + table(["row", "candidates", "top-1 hit (95 % CI)", "top-1 - first row (paired)", "top-1 - row above",
                     "random-candidate hit", "median s per edit", "x first row's s", "UNet evaluations per edit"],
                    rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=60, help="held-out edits")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="3 edits, nothing written")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from blended import Editor

    n = 3 if args.quick else args.n
    editors = {"demo": Editor.load("demo", device="cpu"), "demo-fast": Editor.load("demo-fast", device="cpu")}
    cases = [scenes.make_edit_case(BASE + i) for i in range(n)]
    command = "python -m bench.candidates " + " ".join(sys.argv[1:])
    text = report(editors, measure(editors, cases), n, command)
    print(text)
    if not (args.quick or args.no_write):
        write_doc("candidates", text)


if __name__ == "__main__":
    main()
