"""Benchmark of background reconstruction (paper §4.2): how well each method keeps the source outside
the mask, how visible its seam is, and what it costs next to generating the edit.

    python -m bench.background                # the bundled demo model (assets/demo) when it exists
    python -m bench.background --train-vae 120  # a stand-in VAE of the demo's architecture, trained here

Parts:
  A. real edits with the demo model (held-out scene edits of blended_dev/scenes.py), every method through
     `Editor.edit` with the same seeds, so all methods start from the same candidates;
  B. photos (a face, handwriting) at 128 px: candidates made by putting another photo's latents inside
     the mask (what the blend loop's last step gives), then `reconstruct` on them;
  C. cost at the Stable Diffusion architecture with reduced widths (random weights): measured seconds
     per UNet step, per decode and per fine-tuning step, generation vs reconstruction of a 4-candidate edit.

Prints the tables and writes them into docs/background.md between the `bench:` markers.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from blended import EditConfig, Editor
from blended.background import decoder_settings, reconstruct
from blended_dev import ROOT, scenes

DOC = ROOT / "docs" / "background.md"
PHOTOS = ROOT / "assets" / "photos"

# (label, EditConfig overrides)
FAST = {"decoder_blocks": 1, "decoder_steps": 40, "decoder_lr": 1e-3}  # the last up block only, fewer steps
METHODS = [
    ("none", {"background": "none"}),
    ("stitch", {"background": "stitch"}),
    ("poisson", {"background": "poisson"}),
    ("latent", {"background": "latent"}),
    # defaults: one shared copy per edit, the paper's lr, steps and λ; window, pinned norms, early stopping;
    # the candidate inside, the source beyond the seam band
    ("decoder", {"background": "decoder"}),
    ("decoder lr=1e-3", {"background": "decoder", "decoder_lr": 1e-3}),
    ("decoder λ=10", {"background": "decoder", "decoder_lambda": 10.0}),
    ("decoder feather=2", {"background": "decoder", "feather": 2}),  # a narrower seam band (default 8)
    ("decoder feather=4", {"background": "decoder", "feather": 4}),
    ("decoder, whole window", {"background": "decoder", "exact_outside": False}),
    ("decoder, copy per candidate", {"background": "decoder", "decoder_shared": False}),
    ("decoder fast", {"background": "decoder", **FAST}),
    ("decoder paper", {"background": "decoder", "decoder_shared": False, "decoder_margin": 1024,  # whole image,
                       "decoder_patience": 0, "keep_inside": False, "exact_outside": False}),  # its whole decode
]
# part C: (label, the METHODS row it times, with that row's settings and early-stopping steps)
COSTS = [
    ("decoder (default: one copy per edit, whole decoder, window)", "decoder"),
    ("decoder, a copy per candidate", "decoder, copy per candidate"),
    ("decoder fast (one copy, last up block)", "decoder fast"),
    ("decoder paper (a copy per candidate, whole image, 75 steps)", "decoder paper"),
]


# -- metrics on uint8 images -------------------------------------------------------------------

def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    """PSNR in dB over the pixels `where` (H, W); inf when identical there."""
    d = (a.astype(np.float64) - b.astype(np.float64))[where]
    mse = float((d ** 2).mean()) if d.size else 0.0
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def same(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    """Percentage of the pixels `where` that are identical in a and b (all three channels)."""
    return float((a == b).all(axis=-1)[where].mean() * 100)


def ring(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels outside the mask within `width` pixels of it (where a method's own output shows)."""
    import cv2

    dist = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return (dist > 0) & (dist <= width)


def seam(result: np.ndarray, source: np.ndarray, mask: np.ndarray) -> float:
    """Excess jump across the mask's border: mean |r(p) - r(q)| over neighbouring pairs p inside, q outside,
    minus the same mean of the source (its own gradient there), in 8-bit levels."""
    r, s = result.astype(np.float64), source.astype(np.float64)
    jumps_r, jumps_s = [], []
    for axis in (0, 1):
        a = [slice(None)] * 2
        b = [slice(None)] * 2
        a[axis], b[axis] = slice(None, -1), slice(1, None)
        cross = mask[tuple(a)] != mask[tuple(b)]
        jumps_r.append(np.abs(r[tuple(a)] - r[tuple(b)]).mean(-1)[cross])
        jumps_s.append(np.abs(s[tuple(a)] - s[tuple(b)]).mean(-1)[cross])
    return float(np.concatenate(jumps_r).mean() - np.concatenate(jumps_s).mean())


def fmt(x: float, digits: int = 1) -> str:
    return "exact" if x == float("inf") else f"{x:.{digits}f}"


# -- models --------------------------------------------------------------------------------------

def demo_vae_architecture():
    """The demo model's VAE shape (tools/train_demo.py): x4 down, 4 latent channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                         sample_size=64, mid_block_add_attention=False)


def train_standin_vae(seconds: float, seed: int = 0):
    """A small real VAE trained here on scenes and photo crops (deterministic encoder mean, L1 + MSE)."""
    torch.manual_seed(seed)
    vae = demo_vae_architecture()
    imgs, _ = scenes.dataset(range(2000))
    data = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    photos = [torch.from_numpy(np.asarray(Image.open(PHOTOS / n).convert("RGB"), np.float32) / 127.5 - 1)
              .permute(2, 0, 1) for n in ("coffee.png", "chelsea.png")]  # not the evaluated ones
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    t0, step = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        x = data[torch.randint(0, len(data), (12,), generator=g)]
        crops = []
        for _ in range(4):
            p = photos[int(torch.randint(0, len(photos), (1,), generator=g))]
            p = F.interpolate(p[None], scale_factor=float(torch.empty(1).uniform_(0.25, 0.5, generator=g)),
                              mode="area")[0]
            y = int(torch.randint(0, p.shape[1] - 63, (1,), generator=g))
            xx = int(torch.randint(0, p.shape[2] - 63, (1,), generator=g))
            crops.append(p[:, y:y + 64, xx:xx + 64])
        x = torch.cat([x, torch.stack(crops)])
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        lat = torch.cat([vae.encode(data[i:i + 64]).latent_dist.mode() for i in range(0, 256, 64)])
    vae.register_to_config(scaling_factor=round(1.0 / float(lat.std()), 5))
    return vae, f"stand-in VAE of the demo's architecture trained here for {seconds:.0f} s ({step} steps)"


# -- part A: real edits with the demo model ------------------------------------------------------

def part_a(editor: Editor, cases: int, candidates: int) -> tuple[list[dict], dict]:
    rows: dict[str, list[dict]] = {label: [] for label, _ in METHODS}
    cost: dict[str, list[float]] = {"generation": []}
    for c in range(cases):
        image, mask, prompt, *_ = scenes.make_edit_case(scenes.HELDOUT_SEED_START + c)
        mask_img = Image.fromarray(mask.astype(np.uint8) * 255)
        near = ring(mask, 8)
        cand = None
        for label, over in METHODS:
            calls = []
            result = editor.edit(Image.fromarray(image), mask_img, prompt, num_candidates=candidates, rank=False,
                                 progress=lambda stage, done, total: calls.append((stage, done, total)), **over)
            outs = [np.asarray(im) for im in result.images]
            if label == "none":
                cand = outs
                cost["generation"].append(result.timings["denoise"] + result.timings["decode"])
            steps = steps_run([(d, t) for st, d, t in calls if st == "reconstructing"][1:], result.config)
            for out, ref in zip(outs, cand):
                rows[label].append({
                    "out": psnr(out, image, ~mask), "same": same(out, image, ~mask), "near": psnr(out, image, near),
                    "in": psnr(out, ref, mask),
                    "seam": seam(out, image, mask), "time": result.timings.get("background", 0.0) / candidates,
                    "steps": steps})
    return summarise(rows), {k: statistics.mean(v) / candidates for k, v in cost.items()}


def steps_run(calls: list[tuple[int, int]], cfg: EditConfig) -> float:
    """Optimisation steps per candidate group, from the (done, total) progress calls (the last one is the
    final total); groups = total / configured steps."""
    if len(calls) < 2:
        return 0.0
    configured = cfg.latent_steps if cfg.background == "latent" else cfg.decoder_steps
    groups = calls[-1][1] / configured
    return (len(calls) - 1) / groups


def summarise(rows: dict[str, list[dict]]) -> list[dict]:
    out = []
    for label, rs in rows.items():
        if not rs:
            continue

        def mean(key):
            vals = [r[key] for r in rs]
            return float("inf") if all(v == float("inf") for v in vals) else \
                statistics.mean(v for v in vals if v != float("inf"))

        out.append({"method": label, **{k: mean(k) for k in ("out", "same", "near", "in", "seam", "time", "steps")}})
    return out


# -- part B: photos, synthetic candidates -----------------------------------------------------------

PHOTO_CASES = [  # (file, work size, mask box (l, t, r, b) at that size, what is around the mask)
    ("astronaut.png", (128, 128), (84, 4, 120, 72), "the face and flag next to the shuttle"),
    ("astronaut.png", (128, 128), (72, 88, 128, 128), "the suit; mask touches two borders"),
    ("text.png", (224, 88), (92, 20, 140, 64), "handwriting"),
]
FILLS = ("coffee.png", "chelsea.png")  # what the candidates show inside the mask


def _load(name: str, size: tuple[int, int]) -> torch.Tensor:
    a = np.asarray(Image.open(PHOTOS / name).convert("RGB").resize(size, Image.Resampling.LANCZOS), np.float32)
    return torch.from_numpy(a / 127.5 - 1).permute(2, 0, 1)[None]


def _u8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def part_b(vae) -> list[dict]:
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    sf = vae.config.scaling_factor
    rows: dict[str, list[dict]] = {label: [] for label, _ in METHODS}
    for name, size, box, _ in PHOTO_CASES:
        source = _load(name, size)
        mask = torch.zeros(1, 1, size[1], size[0])
        mask[..., box[1]:box[3], box[0]:box[2]] = 1
        with torch.no_grad():
            z_src = vae.encode(source).latent_dist.mode() * sf
            z_mask = F.max_pool2d(mask, f)
            latents = torch.cat([z_mask * vae.encode(_load(fill, size)).latent_dist.mode() * sf
                                 + (1 - z_mask) * z_src for fill in FILLS])
            decoded = vae.decode(latents / sf).sample.clamp(-1, 1)
        src_u8, m = _u8(source[0]), mask[0, 0].bool().numpy()
        near = ring(m, 16)
        for label, over in METHODS:
            cfg = EditConfig().replace(**over)
            calls = []
            t0 = time.perf_counter()
            out = reconstruct(cfg.background, vae=vae, latents=latents, decoded=decoded, source=source, mask=mask,
                              config=cfg, progress=lambda d, t: calls.append((d, t)))
            seconds = time.perf_counter() - t0
            steps = steps_run(calls, cfg)
            for out_i, cand_i in zip(out, decoded):
                o = _u8(out_i)
                rows[label].append({"out": psnr(o, src_u8, ~m), "same": same(o, src_u8, ~m),
                                    "near": psnr(o, src_u8, near),
                                    "in": psnr(o, _u8(cand_i), m), "seam": seam(o, src_u8, m),
                                    "time": seconds / len(FILLS), "steps": steps})
    return summarise(rows)


# -- part C: cost at the SD architecture, reduced widths ---------------------------------------------

def part_c(divisor: int, size: int, mask_side: int, steps: dict[str, int], verify: bool = True) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from blended.background import finetune_decoder

    w = lambda c: c // divisor  # noqa: E731
    groups = max(32 // divisor, 1)
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=tuple(w(c) for c in (128, 256, 512, 512)),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=4, layers_per_block=2, norm_num_groups=groups).eval()
    unet = UNet2DConditionModel(block_out_channels=tuple(w(c) for c in (320, 640, 1280, 1280)),
                                cross_attention_dim=w(768), attention_head_dim=8, norm_num_groups=groups,
                                sample_size=size // 8).eval()
    h = size // 8
    n = 4  # candidates, denoised together, with classifier-free guidance: UNet batch 8
    x, emb = torch.randn(2 * n, 4, h, h), torch.randn(2 * n, 77, w(768))
    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    with torch.no_grad():  # medians of 3 after a warm-up: the CPU may be shared
        unet(x, 500, emb)
        t_unet = statistics.median(timed(lambda: unet(x, 500, emb)) for _ in range(3))
        t_decode = statistics.median(timed(lambda: vae.decode(torch.randn(n, 4, h, h))) for _ in range(3))
    from blended.schedulers import first_step

    denoise_steps = 50 - first_step(50, 0.25)  # the default edit: 50 steps, blend_start 0.25 -> 37 run
    generation = denoise_steps * t_unet + t_decode
    lat = torch.randn(n, 4, h, h)
    img = torch.rand(n, 3, size, size) * 2 - 1
    mask = torch.zeros(1, 1, size, size)
    lo = (size - mask_side) // 2
    mask[..., lo:lo + mask_side, lo:lo + mask_side] = 1

    def run(k: int, kw: dict) -> float:
        return timed(lambda: finetune_decoder(vae, lat, img, img[:1], mask, steps=k, patience=0, **kw))

    rows = []
    for label, method in COSTS:
        kw = decoder_settings(EditConfig().replace(**dict(METHODS)[method]), 8)  # as `reconstruct` passes them, x8
        del kw["steps"], kw["patience"]  # set by `run`
        copies = 1 if kw["share"] else n  # trained copies; each runs `steps` steps
        t2, t6 = run(2, kw), run(6, kw)
        per_step = max(t6 - t2, 0.0) / (4 * copies)
        fixed = t2 - 2 * copies * per_step  # the whole decodes that record the norms' statistics, the final decodes
        k = steps[method]
        estimate = fixed + copies * k * per_step
        measured = run(k, kw) if verify and copies == 1 else None  # the one-copy methods, really run
        total = measured if measured is not None else estimate
        rows.append({"label": label, "margin": kw["margin"], "per_step": per_step, "fixed": fixed, "steps": k,
                     "copies": copies,
                     "estimate": estimate, "measured": measured, "total": total, "ratio": total / generation})
    return {"divisor": divisor, "size": size, "mask": mask_side,
            "unet_params": sum(p.numel() for p in unet.parameters()) / 1e6,
            "decoder_params": sum(p.numel() for p in vae.decoder.parameters()) / 1e6,
            "t_unet": t_unet, "t_decode": t_decode, "denoise_steps": denoise_steps, "generation": generation,
            "rows": rows}


# -- report ---------------------------------------------------------------------------------------

def quality_table(rows: list[dict], gen: float | None) -> str:
    head = ("| method | PSNR outside (dB) | outside exact (%) | PSNR ≤ ring (dB) | PSNR inside vs candidate (dB) "
            "| seam (levels) | steps | s / candidate |" + (" × generation |" if gen else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = (f"| {r['method']} | {fmt(r['out'])} | {r['same']:.1f} | {fmt(r['near'])} | {fmt(r['in'])} "
                f"| {r['seam']:+.1f} | {r['steps']:.0f} | {r['time']:.2f} |")
        if gen:
            line += f" {r['time'] / gen:.2f} |"
        lines.append(line)
    return "\n".join(lines)


def cost_table(c: dict) -> str:
    lines = [f"SD architecture at 1/{c['divisor']} widths (UNet {c['unet_params']:.1f} M, decoder "
             f"{c['decoder_params']:.1f} M parameters, random weights), {c['size']} px, a {c['mask']} px square "
             f"mask, 4 candidates: UNet step (batch 8) {c['t_unet']:.2f} s, decode {c['t_decode']:.2f} s, "
             f"generation ({c['denoise_steps']} steps + decode) **{c['generation']:.1f} s**.", "",
             "| method | margin (latents) | copies | s / step | steps per copy | fixed s | s / edit, estimated "
             "| s / edit, run | × generation |", "|---|---|---|---|---|---|---|---|---|"]
    for r in c["rows"]:
        run = f"{r['measured']:.1f}" if r["measured"] is not None else "–"
        lines.append(f"| {r['label']} | {r['margin']} | {r['copies']} | {r['per_step']:.3f} | {r['steps']} | {r['fixed']:.1f} "
                     f"| {r['estimate']:.1f} | {run} | **{r['ratio']:.2f}** |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo", help="model for part A and its VAE for part B (default: demo)")
    ap.add_argument("--train-vae", type=float, default=0.0, metavar="SECONDS",
                    help="use a stand-in VAE trained for SECONDS instead of the model's (part A is skipped)")
    ap.add_argument("--cases", type=int, default=4, help="scene edits in part A")
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--sd-divisor", type=int, default=4, help="width divisor of the SD architecture in part C")
    ap.add_argument("--sd-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    ap.add_argument("--skip", default="", help="parts to skip, e.g. 'C'")
    ap.add_argument("--no-doc", action="store_true", help="print only, leave docs/background.md as it is")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 1 edit x 2 candidates, no photos, a tiny SD graph; prints only")
    args = ap.parse_args(argv)
    if args.quick:
        args.cases, args.candidates, args.sd_divisor, args.sd_size, args.no_doc = 1, 2, 16, 64, True
        args.skip += "B"
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*batching rule.*")
    command = "python -m bench.background " + " ".join(argv if argv is not None else sys.argv[1:])
    sections = [f"Command: `{command.strip()}`  ",
                f"Machine: {platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), CPU; "
                f"{time.strftime('%Y-%m-%d')}", ""]

    editor, vae = None, None
    if "A" in args.skip and "B" in args.skip:
        what = "none (parts A and B skipped)"
    elif args.train_vae > 0:
        vae, what = train_standin_vae(args.train_vae)
    else:
        editor = Editor.load(args.model, ranker=None, device="cpu")
        vae, what = editor.model.pipe.vae, f"the VAE of model `{args.model}`"
    print(what)
    sections += [f"VAE: {what}.", ""]
    gen_per_candidate = None
    steps_seen: dict[str, list[float]] = {}  # method -> steps it ran before early stopping, per part

    if editor is not None and "A" not in args.skip:
        rows, cost = part_a(editor, args.cases, args.candidates)
        gen_per_candidate = cost["generation"]
        for r in rows:
            steps_seen.setdefault(r["method"], []).append(r["steps"])
        table = quality_table(rows, gen_per_candidate)
        print(table)
        sections += [f"### A. Real edits, demo model ({args.cases} held-out scene edits × {args.candidates} "
                     f"candidates, 64 px, default settings)", "",
                     f"Generation (denoise + decode) per candidate: {gen_per_candidate:.2f} s. "
                     "Ring = outside the mask within 8 px.", "", table, ""]
    if "B" not in args.skip:
        rows = part_b(vae)
        for r in rows:
            steps_seen.setdefault(r["method"], []).append(r["steps"])
        table = quality_table(rows, None)
        print(table)
        sections += ["### B. Photos (face, handwriting) at 128 px, synthetic candidates", "",
                     "Cases: " + "; ".join(f"{n} {s[0]}×{s[1]} mask {b} ({w})" for n, s, b, w in PHOTO_CASES)
                     + f"; candidates show {' / '.join(FILLS)} inside. Ring = outside the mask within 16 px.", "",
                     table, ""]
    if "C" not in args.skip:
        configured = {label: EditConfig().replace(**over).decoder_steps for label, over in METHODS}
        steps = {label: int(round(statistics.mean(steps_seen[label]))) if label in steps_seen else configured[label]
                 for label, _ in METHODS}
        c = part_c(args.sd_divisor, args.sd_size, args.sd_size * 3 // 8, steps, verify=not args.quick)
        table = cost_table(c)
        print(table)
        sections += ["### C. Cost at the Stable Diffusion architecture", "",
                     "Steps: the mean that early stopping ran in A and B for each method (the configured steps when "
                     "those parts were skipped). Seconds per step and the fixed cost (the whole decodes that record "
                     "the GroupNorm statistics, the final decodes) from runs of 2 and 6 steps; estimated s / edit = "
                     "fixed + copies × steps × s / step. The one-copy methods are also run for real with their "
                     "steps; × generation uses that run where there is one, else the estimate.", "", table, ""]

    if not args.no_doc:
        start, end = "<!-- bench:start -->", "<!-- bench:end -->"
        text = DOC.read_text() if DOC.exists() else f"# Background reconstruction\n\n{start}\n{end}\n"
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1]
        DOC.write_text(head + start + "\n" + "\n".join(sections) + "\n" + end + tail)
        print(f"wrote {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
