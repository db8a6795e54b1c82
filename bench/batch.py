"""Batch editing: held-out demo edits through `python -m blended batch`, at 1 and 2 processes, and whether
denoising the candidates of consecutive jobs in one UNet batch would pay.

Sections: (A) throughput of the batch command end to end (one process with 1 and 2 threads, two processes
with 1 thread each under `accelerate launch`), with the files of every run compared byte for byte, quality
of the top-1 results, and the cost of a rerun that skips everything; (B) UNet time per sample at the batch
of one job against the batch two or four jobs would share, on the demo UNet and on the SD 1.5 graph at a
quarter of its widths, turned into the most a whole job could gain.

    python -m bench.batch              # 32 edits (~5 min on 2 idle cores), writes docs/bench/batch.md
    python -m bench.batch --quick      # 4 edits, seconds, prints only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from blended_dev import ROOT, scenes
from blended_dev.analyse import analyse_region
from blended_dev.bench import table, write_doc
from blended_dev.tiny import sd_components

BASE = scenes.HELDOUT_SEED_START + 600_000  # apart from the other benches' seeds


def write_cases(folder: Path, n: int) -> tuple[Path, list]:
    """Held-out edits as PNG files and a manifest; returns (manifest, [(id, image, mask, colour, shape)])."""
    cases, lines = [], []
    for i in range(n):
        image, mask, prompt, colour, shape = scenes.make_edit_case(BASE + i)
        Image.fromarray(image).save(folder / f"{i:03d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"{i:03d}-mask.png")
        lines.append(json.dumps({"id": f"e{i:03d}", "image": f"{i:03d}.png", "mask": f"{i:03d}-mask.png",
                                 "prompt": prompt}))
        cases.append((f"e{i:03d}", image, mask, colour, shape))
    manifest = folder / "jobs.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, cases


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_batch(manifest: Path, out: Path, processes: int, threads: int, *extra: str) -> dict:
    """One run of the batch command in a subprocess; wall seconds from start to exit, model load seconds."""
    cmd = [sys.executable, "-m", "blended"] if processes == 1 else [
        "accelerate", "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "blended"]
    cmd += ["batch", str(manifest), "--out", str(out), "--model", "demo", "--threads", str(threads), *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    t, ru = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t
    ru2 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = ru2.ru_utime - ru.ru_utime + ru2.ru_stime - ru.ru_stime  # every process of the run, launcher included
    rows = [json.loads(x) for x in (out / "summary.jsonl").read_text().splitlines()]
    if any(r["status"] == "error" for r in rows) or "loaded" not in p.stderr:
        raise SystemExit(f"batch run failed ({p.returncode}):\n{p.stderr[-3000:]}")
    load = float(p.stderr.split("loaded", 1)[1].split(" in ", 1)[1].split(" s", 1)[0])
    return dict(wall=wall, load=load, rows=rows, cpu=cpu)


def same_files(a: Path, b: Path) -> tuple[int, int]:
    """(identical PNGs, PNGs) of run `a` found in run `b`."""
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    return sum((b / f).is_file() and (a / f).read_bytes() == (b / f).read_bytes() for f in files), len(files)


def psnr_outside(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    keep = ~mask
    mse = float(((a.astype(np.float64)[keep] - b.astype(np.float64)[keep]) ** 2).mean())
    return 10 * math.log10(255.0**2 / max(mse, 1e-10))


def quality(out: Path, cases: list) -> dict:
    hits, psnrs, denoise_share = [], [], []
    for job_id, image, mask, colour, shape in cases:
        top = np.asarray(Image.open(out / job_id / "01.png").convert("RGB"))
        c, s = analyse_region(top, mask)
        hits.append(c == colour and s == shape)
        psnrs.append(psnr_outside(top, image, mask))
        t = json.loads((out / job_id / "result.json").read_text())["timings"]
        denoise_share.append(t.get("denoise", 0.0) / t["total"])
    return dict(top=float(np.mean(hits)), psnr=statistics.median(psnrs), denoise=statistics.median(denoise_share))


def unet_per_sample(unet, latent: tuple, text: tuple, batches: list[int], repeats: int) -> dict[int, float]:
    """CPU milliseconds per sample of one UNet forward at each batch size: the least of `repeats` rounds that
    go through the batch sizes in turn, in process CPU time (1 thread), so that other jobs on the machine
    shift the numbers less than they shift wall time."""
    t = torch.tensor(500)
    inputs = {b: (torch.randn(b, *latent), torch.randn(b, *text)) for b in batches}
    best = {b: float("inf") for b in batches}
    with torch.no_grad():
        for b in batches:  # warm-up
            unet(inputs[b][0], t, encoder_hidden_states=inputs[b][1])
        for _ in range(repeats):
            for b in batches:
                s = time.process_time()
                unet(inputs[b][0], t, encoder_hidden_states=inputs[b][1])
                best[b] = min(best[b], time.process_time() - s)
    return {b: best[b] / b * 1000 for b in batches}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=None, help="held-out edits (default 32, 4 with --quick)")
    ap.add_argument("--two-threads", action="store_true", help="also one process with 2 threads (on a busy machine "
                    "this run can take ten times as long: threads that wait for each other)")
    args = ap.parse_args()
    n = args.n or (4 if args.quick else 32)
    out = []
    load_before = os.getloadavg()[0]

    # A. the batch command end to end
    with tempfile.TemporaryDirectory(prefix="blended-bench-batch-") as tmp:
        tmp = Path(tmp)
        manifest, cases = write_cases(tmp, n)
        runs = {}
        configs = [("1 process, 1 thread", 1, 1), ("2 processes, 1 thread each", 2, 1)]
        for name, procs, threads in configs + ([("1 process, 2 threads", 1, 2)] if args.two_threads else []):
            runs[name] = run_batch(manifest, tmp / name.replace(" ", "_").replace(",", ""), procs, threads)
            runs[name]["dir"] = tmp / name.replace(" ", "_").replace(",", "")
            r = runs[name]
            print(f"{name}: {r['wall']:.1f} s wall, load {r['load']:.1f} s", flush=True)
        ref = runs["1 process, 1 thread"]
        rerun = run_batch(manifest, ref["dir"], 1, 1)
        assert all(r["status"] == "skipped" for r in rerun["rows"])
        rows = []
        for name, r in runs.items():
            same, total = same_files(ref["dir"], r["dir"])
            per_job = statistics.median(x["seconds"] for x in r["rows"])
            rows.append([name, round(r["wall"], 1), round(r["load"], 1), round(per_job, 3),
                         round(60 * n / r["wall"], 1), round(60 * n / (r["wall"] - r["load"]), 1),
                         round(r["cpu"], 1), f"{same}/{total}"])
        q = quality(ref["dir"], cases)
        text_a = (
            f"{n} held-out demo edits (`blended_dev/scenes.py`, seeds from {BASE}), the demo model's defaults (4 candidates, "
            "20 steps, ranked); each run is a fresh `python -m blended batch` process (or two under `accelerate launch "
            "--multi_gpu --num_processes 2`, gloo on the CPU), so wall time includes Python, torch and the model "
            "loading. 'After load' divides the edits by the wall time less the main process's model load.\n\n"
            + table(["run", "wall s", "model load s", "median s / job", "edits / min", "edits / min after load",
                     "CPU s (all processes)", "PNGs identical to 1 process, 1 thread"], rows)
            + f"\n\nA rerun with every job done (all skipped: model load, hashing {n} image pairs) took "
              f"{rerun['wall']:.1f} s. Top-1 hit of the batch's results: {q['top']:.3f}; median PSNR outside the mask "
              f"{q['psnr']:.1f} dB; denoising is {100 * q['denoise']:.0f}% of a job's time (median).")
    print(text_a, flush=True)
    out.append("## A. The batch command at 1 and 2 processes\n\n" + text_a)

    # B. would candidates of consecutive jobs sharing one UNet batch help here?
    torch.set_num_threads(1)
    from blended import Editor

    unet = Editor.load("demo", ranker=None).model.pipe.unet.eval()
    cfg = unet.config
    latent = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    text = (77, cfg.cross_attention_dim)
    reps = 2 if args.quick else 8
    demo = unet_per_sample(unet, latent, text, [2, 4, 8, 16, 32], reps)
    sd = sd_components(width=0.25, size=256)["unet"].eval()
    sd_ms = unet_per_sample(sd, (4, 32, 32), (77, sd.config.cross_attention_dim), [2, 4, 8, 16], 1 if args.quick else 4)
    rows = []
    f = q["denoise"]
    for label, ms, one, shared in (
            ("demo UNet, 4 candidates (batch 8 = 4 x 2 for guidance)", demo, 8, [16, 32]),
            ("demo UNet, 1 candidate (batch 2)", demo, 2, [4, 8, 16]),
            ("SD 1.5 graph at 1/4 widths, 256 px, 4 candidates", sd_ms, 8, [16]),
            ("SD 1.5 graph at 1/4 widths, 256 px, 1 candidate", sd_ms, 2, [4, 8, 16])):
        for b in shared:
            ratio = ms[b] / ms[one]
            gain = 1 / ((1 - f) + f * ratio) if "demo" in label else float("nan")
            rows.append([label, b // one, round(ms[one], 2), round(ms[b], 2), round(ratio, 3),
                         "-" if math.isnan(gain) else f"{gain:.3f}x"])
    text_b = (
        "CPU milliseconds per sample of one UNet forward (1 thread, the least of several interleaved rounds), for "
        "the batch one job makes "
        "and for the batch that jobs sharing their candidates would make. The last column turns the demo's ratio "
        f"into the most a whole job could gain, with denoising at {100 * f:.0f}% of a job: "
        "`1 / ((1 - share) + share * ratio)`.\n\n"
        + table(["model and job", "jobs sharing a batch", "ms / sample, one job", "ms / sample, shared",
                 "ratio", "whole job, at most"], rows))
    print(text_b, flush=True)
    out.append("## B. Candidates of consecutive jobs in one UNet batch\n\n" + text_b)

    load_after = os.getloadavg()[0]
    doc = (f"# Batch editing\n\nCommand: `python -m bench.batch{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`"
           f" on {os.cpu_count()} CPU cores (load average {load_before:.1f} before, {load_after:.1f} after: the machine "
           "was shared, so times are indicative).\n\n" + "\n\n".join(out) + "\n")
    if not args.quick:
        print(write_doc("batch", doc))


if __name__ == "__main__":
    main()
