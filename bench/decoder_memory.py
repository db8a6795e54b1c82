"""Decoder fine-tuning (paper §4.2, `--background decoder`) at real sizes: time per Adam step and peak memory
of the full Stable Diffusion VAE (block widths 128/256/512/512, random weights, shapes from the published
configs) at 512 px (SD 1.5 / 2.1) and SDXL's at 1024 px, with masks covering 10 %, 30 % and 60 % of the image.

    python -m bench.decoder_memory                 # every row (about an hour on 2 CPU cores)
    python -m bench.decoder_memory --quick         # a tiny VAE, to check that the script runs

Each row runs in its own process (peak RSS is per process), one fine-tuning step of the shared decoder copy
(one candidate per step, as on the CPU and for large windows on CUDA) after the whole-image statistics pass.
Variants: `before` is `blended/background.py` as of commit 12149d8 (before the memory work), `after` is the
current code (lean pinned GroupNorm; activation checkpointing, on automatically for large windows), and
`after, no checkpointing` shows what each part contributes. On this CPU-only machine the process's peak
RSS stands in for GPU memory; a process is capped at `--limit-gb` of heap (RLIMIT_DATA), and a row that
needs more says so instead of running the machine out of memory.

Writes docs/bench/decoder_memory.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from blended_dev import ROOT
from blended_dev.bench import BEFORE_COMMIT, have_before

SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
MODELS = {  # name: (VAE config, image side)
    "SD 1.5 / 2.1 VAE": (dict(SD_VAE, sample_size=512, scaling_factor=0.18215), 512),
    "SDXL VAE": (dict(SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True), 1024),
}
TINY = {"tiny VAE": (dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                          down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                          sample_size=64, scaling_factor=0.5), 64)}
VARIANTS = ("before", "after", "after, no checkpointing")


def _module(variant: str):
    """blended.background now, or as it was at BEFORE_COMMIT (loaded from git into a temporary module)."""
    if variant != "before":
        import blended.background as bg
        return bg
    import blended  # noqa: F401  (the package, for the module's relative imports)

    src = subprocess.run(["git", "show", f"{BEFORE_COMMIT}:blended/background.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    path = Path(os.environ.get("TMPDIR", "/tmp")) / "blended_background_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("blended._background_before", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def one(model: str, fraction: float, variant: str, threads: int) -> dict:
    """Run one row in this process; returns its measurements."""
    import torch
    from diffusers import AutoencoderKL

    torch.set_num_threads(threads)
    config, side = {**MODELS, **TINY}[model]
    bg = _module(variant)
    torch.manual_seed(0)
    vae = AutoencoderKL(**config).eval().requires_grad_(False)
    f = 2 ** (len(config["block_out_channels"]) - 1)
    latents = torch.randn(1, 4, side // f, side // f)
    decoded = torch.rand(1, 3, side, side) * 2 - 1  # the candidate (content does not change the cost)
    source = torch.rand(1, 3, side, side) * 2 - 1
    mask = torch.zeros(1, 1, side, side)
    m = int(round(side * fraction ** 0.5))  # a centred square covering `fraction` of the image
    lo = (side - m) // 2
    mask[..., lo:lo + m, lo:lo + m] = 1
    marks = {}
    record = bg.LatentDecoder.record

    def timed_record(self, *a, **k):
        out = record(self, *a, **k)
        marks["recorded"] = time.perf_counter()
        return out

    bg.LatentDecoder.record = timed_record
    kw = {} if variant == "before" else {"checkpointing": variant == "after" and None}
    if variant == "after, no checkpointing":
        kw = {"checkpointing": False}
    base_rss = _rss_mib()
    start = time.perf_counter()
    bg.finetune_decoder(vae, latents, decoded, source, mask, steps=1, lr=1e-4, lam=100.0, margin=2, patience=0,
                        progress=lambda done, total: marks.setdefault("step", time.perf_counter()), **kw)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    window = bg.latent_window(mask, tuple(latents.shape[-2:]), 2)
    out = {"model": model, "side": side, "fraction": fraction, "variant": variant,
           "window_px": f"{(window.right - window.left) * f}x{(window.bottom - window.top) * f}",
           "stats_s": marks["recorded"] - start, "step_s": marks["step"] - marks["recorded"],
           "base_mib": base_rss, "peak_mib": peak, "rise_mib": peak - base_rss}
    if variant == "after":
        out["checkpointing"] = bool(bg.needs_checkpointing(bg.LatentDecoder(vae), window, torch.device("cpu")))
    return out


def run_row(model: str, fraction: float, variant: str, threads: int, limit_gb: float) -> dict:
    """One row in a child process, its heap capped at `limit_gb`."""
    cmd = [sys.executable, "-m", "bench.decoder_memory", "--one", json.dumps([model, fraction, variant]), "--threads", str(threads)]

    def cap():
        limit = int(limit_gb * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    p = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=cap, cwd=ROOT)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (p.stderr.strip().splitlines() or ["?"])[-1]
    oom = "allocate" in tail or "memory" in tail.lower() or p.returncode in (-9, 137)
    return {"model": model, "fraction": fraction, "variant": variant,
            "error": f"over {limit_gb:g} GB" if oom else tail[:120]}


def table(rows: list[dict]) -> str:
    out = ["| VAE | mask | window px | variant | stats pass s | s / Adam step | peak RSS GiB | rise GiB |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label = r["variant"] + (" (auto: on)" if r.get("checkpointing") else " (auto: off)" if "checkpointing" in r
                                else "")
        if "error" in r:
            out.append(f"| {r['model']} | {r['fraction']:.0%} | | {label} | | | {r['error']} | |")
            continue
        out.append(f"| {r['model']} @ {r['side']} | {r['fraction']:.0%} | {r['window_px']} | {label} | "
                   f"{r['stats_s']:.3g} | {r['step_s']:.4g} | {r['peak_mib'] / 1024:.2f} | {r['rise_mib'] / 1024:.2f} |")
    return "\n".join(out)


DEFAULT_ROWS = [  # (model, mask fraction, variant), in the order run: the target first (SDXL, 60 % mask), then every
    # size after the memory work, before it, and what checkpointing alone contributes last
    ("SDXL VAE", 0.6, "after"),
    ("SDXL VAE", 0.6, "before"),
    *[("SD 1.5 / 2.1 VAE", f, v) for f in (0.6, 0.3, 0.1) for v in ("after", "before")],
    ("SDXL VAE", 0.3, "after"),
    ("SDXL VAE", 0.1, "after"),
    ("SD 1.5 / 2.1 VAE", 0.6, "after, no checkpointing"),  # (SDXL without checkpointing: another hour of this CPU)
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny VAE only (a smoke test)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit-gb", type=float, default=14.0, help="heap cap of each row's process")
    ap.add_argument("--rows", default=None, help="JSONL file of measured rows: rows found there are not run again")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "decoder_memory.md"))
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(*json.loads(args.one), threads=args.threads)), flush=True)
        return
    plan = [("tiny VAE", 0.3, v) for v in VARIANTS] if args.quick else DEFAULT_ROWS
    if not have_before():  # a shallow clone: the code before the memory work is not there to measure
        print(f"commit {BEFORE_COMMIT} is not in this clone: the `before` rows are left out", file=sys.stderr)
        plan = [key for key in plan if key[2] != "before"]
    done = {}
    if args.rows and Path(args.rows).exists():
        for line in Path(args.rows).read_text().splitlines():
            r = json.loads(line)
            done[(r["model"], r["fraction"], r["variant"])] = r
    rows = []
    for key in plan:
        row = done.get(key) or run_row(*key, args.threads, args.limit_gb)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.rows and key not in done:
            with open(args.rows, "a") as f:
                f.write(json.dumps(row) + "\n")
    rows.sort(key=lambda r: (r["model"] != "SD 1.5 / 2.1 VAE", r["fraction"], VARIANTS.index(r["variant"])))
    text = (f"# Decoder fine-tuning at real sizes\n\n`python -m bench.decoder_memory{' --quick' if args.quick else ''}`"
            f" on {platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, "
            f"{time.strftime('%Y-%m-%d')}; one Adam step of the shared decoder copy after the whole-image "
            f"statistics pass; rise = peak RSS minus RSS before fine-tuning (weights and inputs already loaded). "
            f"The machine was shared with other jobs: read seconds as ratios within the table.\n\n"
            + table(rows) + "\n")
    print(text)
    if not args.quick:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
