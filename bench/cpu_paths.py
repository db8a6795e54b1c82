"""CPU paths of a Stable Diffusion edit (issue 31): one UNet call and one VAE decode of the SD 1.5 graph (random
weights), timed in fp32, bf16 (autocast; weights cast), channels_last, torch.compile and OpenVINO; and whether bf16
keeps the demo model's hits.

Paths (`--paths`, comma-separated; the fp32 reference of each part always runs first):
  fp32, bf16 (autocast), bf16-weights (a bf16 copy of the UNet), channels_last, channels_last-bf16, compile,
  compile-bf16 (torch.compile; the first call pays the compilation), openvino, openvino-bf16 (OpenVINO's
  INFERENCE_PRECISION_HINT f32 / bf16; setup = conversion + compilation), vae-fp32, vae-bf16, taesd
  (`AutoencoderTiny()`, TAESD's shapes)

`--quality N`: the demo model's top-1 and random-candidate hit on N held-out edits (seeds HELDOUT_SEED_START +
950_000 upwards, used by no other bench) in fp32, in bf16 autocast and with bf16 weights.

    python -m bench.cpu_paths --quick                          # width 0.25, 256 px: a smoke test, nothing written
    python -m bench.cpu_paths --threads 2 --batch 1,2          # full size, 512 px: an idle machine, an hour or
                                                               # more (torch.compile, OpenVINO's conversion)
    python -m bench.cpu_paths --paths none --quality 200 --quality-models demo,demo-fast --threads 1
                                                               # bf16 against fp32 on the demo models

OpenVINO is not in requirements.txt: `pip install openvino` first. Writes docs/bench/cpu_paths.md (its timing
and quality sections separately: a run of one keeps the other).
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from blended_dev import scenes
from blended_dev.bench import params, table, wilson, write_doc_sections
from blended_dev.edits import engine_fn, evaluate, paired
from blended_dev.tiny import sd_components

QUALITY_BASE = scenes.HELDOUT_SEED_START + 950_000
TITLE = "## CPU paths of a Stable Diffusion edit"


@dataclass
class Graph:
    """The SD 1.5 graph and one call's inputs."""
    unet: Any
    vae: Any
    latents: torch.Tensor  # (1, 4, H/8, W/8): the VAE decode's input
    sample: torch.Tensor = None  # (B, 4, H/8, W/8), set by `with_batch`
    timestep: torch.Tensor = None  # (B,) int64
    context: torch.Tensor = None  # (B, 77, cross_attention_dim)
    ov_model: Any = None  # OpenVINO's conversion of the UNet, shared by its two precisions
    ov_convert_s: float = 0.0


@dataclass
class Ready:
    call: Callable[[], torch.Tensor]
    setup: float = 0.0  # seconds before the first call (conversion, compilation)
    note: str = ""


class UNetFn(torch.nn.Module):
    """The UNet as a function of tensors returning a tensor (for tracing)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, context):
        return self.unet(sample, timestep, context, return_dict=False)[0]


def bf16(call):
    """`call` under bf16 autocast on the CPU."""
    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return call()
    return run


def unet_call(g: Graph, m=None, x=None):
    """One UNet call on the graph's inputs (`m`: another module, e.g. compiled; `x`: another sample)."""
    m = g.unet if m is None else m  # (not `m or`: a compiled module has no truth value)
    return lambda: m(g.sample if x is None else x, g.timestep, g.context, return_dict=False)[0]


@contextmanager
def plain(g: Graph, autocast: bool):
    """The UNet as it is, in fp32 or under bf16 autocast."""
    yield Ready(bf16(unet_call(g)) if autocast else unet_call(g))


@contextmanager
def bf16_weights(g: Graph):
    """A bf16 copy of the UNet (what `Editor.load(..., dtype=\"bf16\")` does), freed afterwards."""
    t = time.perf_counter()
    m = copy.deepcopy(g.unet).to(torch.bfloat16)
    x, c = g.sample.bfloat16(), g.context.bfloat16()
    yield Ready(lambda: m(x, g.timestep, c, return_dict=False)[0], time.perf_counter() - t,
                "weights and inputs in bf16")


@contextmanager
def channels_last(g: Graph, autocast: bool):
    """The UNet's weights and the sample in channels_last for the call, contiguous again afterwards."""
    g.unet.to(memory_format=torch.channels_last)
    call = unet_call(g, x=g.sample.to(memory_format=torch.channels_last))
    try:
        yield Ready(bf16(call) if autocast else call)
    finally:
        g.unet.to(memory_format=torch.contiguous_format)


@contextmanager
def compiled(g: Graph, autocast: bool):
    """torch.compile of the UNet (default inductor backend); dynamo's caches reset before and after."""
    torch._dynamo.reset()
    call = unet_call(g, m=torch.compile(g.unet))
    try:
        yield Ready(bf16(call) if autocast else call, note="torch.compile (inductor); the first call compiles")
    finally:
        torch._dynamo.reset()


@contextmanager
def openvino(g: Graph, precision: str):
    """The UNet converted by OpenVINO (once per graph) and compiled for the CPU with `precision` (f32, bf16)."""
    import openvino as ov

    shared = g.ov_model is not None  # converted with dynamic shapes at an earlier batch
    if not shared:
        t = time.perf_counter()
        with torch.no_grad():
            g.ov_model = ov.convert_model(UNetFn(g.unet), example_input=(g.sample, g.timestep, g.context))
        g.ov_convert_s = time.perf_counter() - t
    t = time.perf_counter()
    model = ov.Core().compile_model(g.ov_model, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                                                        "PERFORMANCE_HINT": "LATENCY"})
    compile_s = time.perf_counter() - t
    inputs = [g.sample.numpy(), g.timestep.numpy(), g.context.numpy()]
    yield Ready(lambda: torch.from_numpy(np.array(model(inputs)[0])), g.ov_convert_s + compile_s,
                f"OpenVINO {ov.__version__.split('-')[0]}: convert_model {g.ov_convert_s:.1f} s"
                f"{' (once, dynamic shapes)' if shared else ''} + compile_model {compile_s:.1f} s")


@contextmanager
def vae_decode(g: Graph, autocast: bool):
    """The SD VAE's decode of the latents."""
    call = lambda: g.vae.decode(g.latents).sample  # noqa: E731
    yield Ready(bf16(call) if autocast else call)


@contextmanager
def taesd(g: Graph):
    """`AutoencoderTiny()` (TAESD's shapes, random weights) decoding the same latents."""
    from diffusers import AutoencoderTiny

    t = time.perf_counter()
    torch.manual_seed(0)
    m = AutoencoderTiny().eval()
    yield Ready(lambda: m.decode(g.latents).sample, time.perf_counter() - t,
                f"AutoencoderTiny(), {params(m):.1f} M params: another model, no difference column")


PATHS = {  # name: (part, context manager over a Graph, what it is)
    "fp32": ("unet", lambda g: plain(g, False), "UNet call, fp32"),
    "bf16": ("unet", lambda g: plain(g, True), "UNet call, fp32 weights, bf16 autocast"),
    "bf16-weights": ("unet", bf16_weights, "UNet call, weights cast to bf16"),
    "channels_last": ("unet", lambda g: channels_last(g, False), "UNet call, channels_last, fp32"),
    "channels_last-bf16": ("unet", lambda g: channels_last(g, True), "UNet call, channels_last, bf16 autocast"),
    "compile": ("unet", lambda g: compiled(g, False), "UNet call, torch.compile, fp32"),
    "compile-bf16": ("unet", lambda g: compiled(g, True), "UNet call, torch.compile, bf16 autocast"),
    "openvino": ("unet", lambda g: openvino(g, "f32"), "UNet call, OpenVINO CPU, precision hint f32"),
    "openvino-bf16": ("unet", lambda g: openvino(g, "bf16"), "UNet call, OpenVINO CPU, precision hint bf16"),
    "vae-fp32": ("vae", lambda g: vae_decode(g, False), "SD VAE decode, fp32"),
    "vae-bf16": ("vae", lambda g: vae_decode(g, True), "SD VAE decode, bf16 autocast"),
    "taesd": ("vae", taesd, "TAESD decode, fp32"),
}
REFERENCE = {"unet": "fp32", "vae": "vae-fp32"}


def time_path(ready_cm, reps: int) -> dict:
    """Setup, first call and the median of `reps` further calls (s); the first call's output in fp32."""
    with ready_cm as ready, torch.inference_mode():
        t = time.perf_counter()
        out = ready.call().float()
        first = time.perf_counter() - t
        steady = []
        for _ in range(reps):
            t = time.perf_counter()
            ready.call()
            steady.append(time.perf_counter() - t)
    return dict(setup=ready.setup, first=first, steady=statistics.median(steady), out=out, note=ready.note)


def build(width: float, size: int) -> Graph:
    """The graph's UNet and VAE (seed 0) with batch-1 inputs."""
    comps = sd_components(width, size)
    unet, vae = comps["unet"], comps["vae"]
    h = size // (2 ** (len(vae.config.block_out_channels) - 1))  # the VAE's downsampling factor
    latents = torch.randn(1, 4, h, h, generator=torch.Generator().manual_seed(1))
    return with_batch(Graph(unet, vae, latents), 1)


def with_batch(g: Graph, batch: int) -> Graph:
    """The UNet call's inputs at `batch` (seeded): latents, timestep 500, a random text embedding."""
    gen = torch.Generator().manual_seed(0)
    g.sample = torch.randn(batch, *g.latents.shape[1:], generator=gen)
    g.timestep = torch.full((batch,), 500, dtype=torch.long)
    g.context = torch.randn(batch, 77, g.unet.config.cross_attention_dim, generator=gen)
    return g


def run_paths(g: Graph, names: list[str], reps: int, label: str) -> list[list]:
    """Rows of the timing table for `names` (each part's reference added first)."""
    parts = {PATHS[n][0] for n in names}
    order = [REFERENCE[p] for p in ("unet", "vae") if p in parts]
    order += [n for n in names if n not in order]
    ref, rows = {}, []
    for name in order:
        part, make, what = PATHS[name]
        try:
            r = time_path(make(g), reps)
        except Exception as e:  # noqa: BLE001  (a path that fails is a finding: its row says why)
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
            print(name, "failed:", msg, flush=True)
            rows.append([name + label, what, "-", "-", "-", "-", "-", "-", "**failed**: " + msg.replace("|", "/")])
            continue
        if name == REFERENCE[part]:
            ref[part] = r
        base = ref.get(part)
        diff = (r["out"] - base["out"]).abs().max().item() if base and name != "taesd" else None
        scale = base["out"].abs().max().item() if base else 1.0
        rows.append([name + label, what, r["setup"], r["first"], r["steady"],
                     f"{base['steady'] / r['steady']:.2f}" if base else "-",
                     "-" if diff is None else f"{diff:.3g}", "-" if diff is None else f"{diff / scale:.2g}",
                     r["note"]])
        print(rows[-1], flush=True)
        del r
        gc.collect()
    return rows


def timing(args, names: list[str]) -> str:
    """The timing section: every path at each batch size (the decode at the first only)."""
    width, size = (0.25, 256) if args.quick else (1.0, 512)
    g, rows = build(width, size), []
    for i, batch in enumerate(int(b) for b in args.batch.split(",")):
        todo = names if i == 0 else [n for n in names if PATHS[n][0] == "unet"]  # the decode: batch 1 only
        rows += run_paths(with_batch(g, batch), todo, args.reps, f" (batch {batch})" if "," in args.batch else "")
    unet_m, lat = params(g.unet), g.latents.shape[-1]
    return (f"### One call of each part: SD 1.5 graph, width x{width} ({unet_m:.0f} M UNet params), {size} px "
            f"({lat}x{lat} latents), random weights, {torch.get_num_threads()} thread(s), batch {args.batch}\n\n"
            f"Command: `{command_line()}` ({time.strftime('%Y-%m-%d')}). Setup: seconds before the first call "
            "(a copy, conversion, compilation: what a Space pays at start); first call includes torch.compile's "
            f"compilation; steady: median of {args.reps} further calls. Speed-up: the fp32 reference's steady call "
            "over this one (UNet rows against `fp32`, decode rows against `vae-fp32`). Max |diff|: the largest "
            "absolute difference of the output from the fp32 reference on the same inputs (relative: over the "
            "reference's largest absolute value).\n\n"
            + table(["path", "what", "setup s", "first call s", "steady call s (median)", "speed-up vs fp32",
                     "max abs diff vs fp32", "relative", "note"], rows) + "\n")


def quality(n: int, models: list[str]) -> str:
    """Top-1 and random-candidate hits of the demo model(s) in fp32, bf16 autocast and bf16 weights."""
    from blended import Editor

    cases = [scenes.make_edit_case(QUALITY_BASE + i) for i in range(n)]
    rows = []
    for model in models:
        fp, bw = Editor.load(model, device="cpu"), Editor.load(model, device="cpu", dtype="bf16")
        fp_fn = engine_fn(fp)
        variants = {"fp32": fp_fn,
                    "bf16 autocast": lambda image, case: bf16(lambda: fp_fn(image, case))(),
                    "bf16 weights (`dtype=\"bf16\"`)": engine_fn(bw)}
        tops = {k: [] for k in variants}
        per = {k: [] for k in variants}
        for i, case in enumerate(cases):  # interleaved: a busy machine slows the variants alike
            for k, fn in variants.items():
                per[k].append(evaluate(lambda image, c: tops[k].append(fn(image, c)) or tops[k][-1], [case]))
            if (i + 1) % 20 == 0:
                print(model, f"{i + 1}/{n}", flush=True)
        res = {k: dict(tops="".join(r["tops"] for r in v), mean=float(np.mean([r["mean"] for r in v])),
                       psnr=statistics.median(r["psnr"] for r in v), seconds=statistics.median(r["seconds"] for r in v))
               for k, v in per.items()}
        for k, r in res.items():
            hits = r["tops"].count("1")
            lo, hi = wilson(hits, n)
            diff = statistics.median(float(np.abs(np.asarray(a[0], np.float32) - np.asarray(b[0], np.float32)).mean())
                                     for a, b in zip(tops[k], tops["fp32"]))
            rows.append([model, k, f"{hits / n:.3f} ({lo:.2f}-{hi:.2f})", paired(res["fp32"], r),
                         f"{r['mean']:.3f}", r["psnr"], f"{diff:.2f}", r["seconds"]])
            print(rows[-1], flush=True)
    return (f"### bf16 against fp32 on the demo: {n} held-out edits (seeds {QUALITY_BASE}..)\n\n"
            f"Command: `{command_line()}` ({time.strftime('%Y-%m-%d')}; {torch.get_num_threads()} thread(s), a "
            "shared machine: seconds noisy). The judge and ranker of bench/fewstep.py; the variants ran interleaved "
            "edit by edit. bf16 autocast wraps the whole edit (ranking included); bf16 weights is "
            "`Editor.load(model, dtype=\"bf16\")`. Paired: top-1 minus fp32's on the same edits (95 % interval). "
            "Top image vs fp32: the median over edits of the mean absolute pixel difference (0-255) between the "
            "ranked first candidates.\n\n"
            + table(["model", "precision", "top-1 hit (95 % CI)", "top-1 - fp32 (paired)", "random-candidate hit",
                     "PSNR outside (median dB)", "top image vs fp32 (mean abs, 0-255)", "median s per edit"], rows)
            + "\n")


def command_line() -> str:
    return "python -m bench.cpu_paths " + " ".join(sys.argv[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="width 0.25 and 256 px (a smoke test); nothing written")
    ap.add_argument("--reps", type=int, default=3, help="steady calls per path (after the first)")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, or 'none': {', '.join(PATHS)}")
    ap.add_argument("--batch", default="1", help="UNet batch sizes, e.g. 1,2 (the decode runs at batch 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quality", type=int, default=0, metavar="N", help="held-out demo edits for bf16 vs fp32")
    ap.add_argument("--quality-models", default="demo", help="comma-separated: demo, demo-fast")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = [] if args.paths == "none" else args.paths.split(",")
    unknown = [n for n in names if n not in PATHS]
    if unknown:
        ap.error(f"unknown path(s) {', '.join(unknown)}: choose from {', '.join(PATHS)}")
    sections = {}
    if names:
        sections["timing"] = timing(args, names)
    if args.quality:
        sections["quality"] = quality(args.quality, args.quality_models.split(","))
    print("\n\n".join(sections.values()))
    if not args.quick and sections:
        write_doc_sections("cpu_paths", TITLE, sections)


if __name__ == "__main__":
    main()
