"""Distil the bundled demo model into a few-step one (latent consistency distillation, LCM), CPU only.

    python -m tools.train_fast --out assets/demo-fast              # the bundled run (--minutes 40)
    python -m tools.train_fast --out /tmp/fast --minutes 0.5 --n-train 512   # smoke test

Latent consistency distillation (Luo et al. 2023, "Latent Consistency Models", Alg. 1 with a DDIM solver):

* teacher: the frozen demo UNet (v prediction) with classifier-free guidance at a scale drawn uniformly
  from [--guidance-min, --guidance-max] per sample;
* student: the same UNet plus a guidance embedding (`time_cond_proj_dim`, the projection zero-initialised,
  so it starts as the teacher), fed `guidance_scale - 1` like diffusers' LCM pipeline;
* a training pair: a latent noised to t_{n+k} on the 50-step DDIM grid (k = 20 training timesteps), the
  teacher's guided DDIM step to t_n, and the EMA target (decay --ema) evaluated there; the loss is the L2
  distance of the two consistency functions f(x, t) = c_skip(t) x + c_out(t) x0(x, t) with LCMScheduler's
  boundary conditions (sigma_data 0.5, timestep scaling 10).

The text encoder, tokenizer and VAE are the demo's (copied). The run stops at --steps or --minutes,
whichever comes first; every --save-minutes the EMA target is written, so a cut run is usable.
A second stage, `--method phase` (phase distillation of blended edits; tried, not bundled: docs/fewstep.md):

    python -m tools.train_fast --method phase --init assets/demo-fast --out /tmp/fast-phase --minutes 22 \
        --batch 64 --lr 1e-4 --ema 0.99 --save-minutes 4 --data-cache /tmp/teacher-edits.pt

* the teacher makes blended edits the way the few-step model is used: `--n-cases` edit cases of training seeds
  (a quarter of them whole-image generations from scene captions), guidance 7.5, the source noised with one
  fixed noise per case ("next" background rule), the core mask before t = 259 and the true mask after (the
  few-step model's `core_steps` 0.75 at 4 steps), 17 guided DDIM steps over a grid that contains every
  timestep LCMScheduler runs at 1, 2, 4 and 8 steps; the blended latents at those timesteps and the finished
  edit are kept (`--data-cache`: 8 000 edits, 336 MB, about 17 minutes on one core);
* the student (from `--init`) learns each phase of a 4- or 8-step run: its deterministic step (DDIM, TCD with
  gamma 0) from the teacher's latents at one of those timesteps must land on the teacher's latents at the next
  one (the finished edit after the last), weighted 4x in the mask dilated by one latent; AdamW, the EMA (--ema)
  is saved.

Writes <out>/ (a diffusers StableDiffusionPipeline folder with an LCMScheduler), <out>/blended.json and
<out>/train_report.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from blended.unet_call import guidance_embedding
from blended_dev import ROOT, scenes
from blended_dev.training import log, lr_at, nparams, to_tensor

COND_DIM = 64  # width of the guidance embedding the student reads
RECOMMENDED = {  # blended.json of the distilled model: picked on validation edits (bench/fewstep.py --sections tune)
    "scheduler": "lcm", "num_inference_steps": 4, "guidance_scale": 7.5, "num_candidates": 4, "blend_start": 0.0,
    "core_steps": 0.75, "background_timestep": "next", "background_noise": "fixed", "decoder_lr": 0.001,
    # decoder fine-tuning as the demo model's, not blended.fewstep.FAST_DECODER: on the 64 px VAE fixed costs dominate,
    # so the fast recipe still takes 6.8x the edit and loses 1.9 dB (docs/fewstep.md)
    "decoder_blocks": 0, "decoder_schedule": "constant", "decoder_steps": 75, "decoder_patience": 10,
}


def boundary(t: torch.Tensor, sigma_data: float = 0.5, scaling: float = 10.0):
    """LCMScheduler's c_skip, c_out at integer timesteps t (B,) -> two (B, 1, 1, 1)."""
    s = (t.float() * scaling)[:, None, None, None]
    return sigma_data**2 / (s**2 + sigma_data**2), s / (s**2 + sigma_data**2) ** 0.5


def x0_eps(v: torch.Tensor, x: torch.Tensor, a: torch.Tensor):
    """(x0, eps) from a v prediction at alpha_bar a (B, 1, 1, 1)."""
    return a.sqrt() * x - (1 - a).sqrt() * v, a.sqrt() * v + (1 - a).sqrt() * x


def build_student(teacher):
    from diffusers import UNet2DConditionModel

    student = UNet2DConditionModel.from_config({**teacher.config, "time_cond_proj_dim": COND_DIM})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert missing == ["time_embedding.cond_proj.weight"] and not unexpected, (missing, unexpected)
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.zero_()  # starts as the teacher, whatever the guidance
    return student


def save(out: Path, demo: Path, unet, report: dict):
    from diffusers import DDIMScheduler, LCMScheduler

    if not (out / "vae").is_dir():
        out.mkdir(parents=True, exist_ok=True)
        for part in ("vae", "text_encoder", "tokenizer"):
            shutil.copytree(demo / part, out / part)
        index = json.loads((demo / "model_index.json").read_text())
        index["scheduler"] = ["diffusers", "LCMScheduler"]
        (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        ddim = DDIMScheduler.from_pretrained(demo / "scheduler")
        LCMScheduler.from_config(ddim.config, original_inference_steps=50).save_pretrained(out / "scheduler")
        (out / "blended.json").write_text(json.dumps(RECOMMENDED, indent=2) + "\n")
    tmp = out / "unet.tmp"
    unet.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(out / "unet", ignore_errors=True)
    tmp.rename(out / "unet")
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")


EDIT_GUIDANCE = 7.5  # the teacher's scale in phase distillation: the few-step model's default


def student_timesteps(scheduler_dir: Path, counts=(1, 2, 4, 8)) -> list[int]:
    """Every timestep LCMScheduler runs at `counts` steps, high to low."""
    from diffusers import LCMScheduler

    sch = LCMScheduler.from_pretrained(scheduler_dir)
    ts: set[int] = set()
    for n in counts:
        sch.set_timesteps(n)
        ts.update(int(t) for t in sch.timesteps)
    return sorted(ts, reverse=True)


def teacher_grid(keep: list[int], gap: int = 70) -> list[int]:
    """A descending grid through every timestep in `keep` with no jump over `gap`, down to the lowest of `keep`
    and on to ~gap / 2 (the teacher's last step lands on the clean latents)."""
    points = sorted(set(keep) | {max(gap // 3, 1)}, reverse=True)
    grid = []
    for hi, lo in zip(points, points[1:]):
        n = max(1, -(-(hi - lo) // gap))
        grid += [round(hi - (hi - lo) * j / n) for j in range(n)]
    return grid + [points[-1]]


def edit_cases(n: int, seed: int):
    """Training edits: (image uint8, pixel mask bool, prompt); every 4th a whole-image generation of a scene."""
    cases = []
    for i in range(n):
        s = seed * 10_000_000 + i  # training seeds, apart from the held-out ones (>= scenes.HELDOUT_SEED_START)
        if i % 4 == 0:
            sc = scenes.make_scene(s)
            cases.append((sc.image, np.ones((scenes.SIZE, scenes.SIZE), bool), sc.caption))
        else:
            image, mask, prompt, _, _ = scenes.make_edit_case(s)
            cases.append((image, mask, prompt))
    return cases


@torch.no_grad()
def teacher_edits(cases, vae, tokenizer, text_encoder, teacher, alphas, grid, record, factor, g, batch=64,
                  boundary_t=259):
    """Blended teacher edits of `cases`: the latents at each `record` timestep (the UNet's input there) and the
    finished edit. Returns dict(states (N, R, C, h, w), cond (N, L, D), target (N, C, h, w), mask (N, 1, h, w))."""
    from blended.masks import core_mask, latent_mask

    uncond = text_encoder(tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                                    return_tensors="pt").input_ids)[0]
    out = {"states": [], "cond": [], "target": [], "mask": []}
    t0 = time.time()
    for b in range(0, len(cases), batch):
        chunk = cases[b : b + batch]
        B = len(chunk)
        src = vae.encode(to_tensor(np.stack([c[0] for c in chunk]))).latent_dist.mode() * vae.config.scaling_factor
        true = torch.cat([latent_mask(c[1], factor) for c in chunk])
        core = torch.cat([core_mask(c[1], factor) for c in chunk])
        core = torch.where(core.flatten(1).any(1)[:, None, None, None], core, true)  # a thin mask: its own
        cond = text_encoder(tokenizer([c[2] for c in chunk], padding="max_length", truncation=True,
                                      max_length=tokenizer.model_max_length, return_tensors="pt").input_ids)[0]
        noise = torch.randn(src.shape, generator=g)

        def noised(t):
            a = alphas[t]
            return a.sqrt() * src + (1 - a).sqrt() * noise

        x = noised(grid[0])
        states = []
        for i, t in enumerate(grid):
            if t in record:
                states.append(x.clone())
            a = alphas[t]
            tt = torch.full((2 * B,), t)
            v = teacher(torch.cat([x, x]), tt, torch.cat([uncond.expand(B, -1, -1), cond])).sample
            x0_u, eps_u = x0_eps(v[:B], x, a)
            x0_c, eps_c = x0_eps(v[B:], x, a)
            x0 = x0_u + EDIT_GUIDANCE * (x0_c - x0_u)
            eps = eps_u + EDIT_GUIDANCE * (eps_c - eps_u)
            last = i + 1 == len(grid)
            nxt = None if last else grid[i + 1]
            x = x0 if last else alphas[nxt].sqrt() * x0 + (1 - alphas[nxt]).sqrt() * eps
            m = true if (last or nxt <= boundary_t) else core  # the step ending at t_(i+1) blends with its mask
            x = m * x + (1 - m) * (src if last else noised(nxt))
        out["states"].append(torch.stack(states, 1))
        out["cond"].append(cond)
        out["target"].append(x)
        out["mask"].append(true)
        log(f"teacher edits {b + B}/{len(cases)} ({time.time() - t0:.0f}s)")
    return {k: torch.cat(v) for k, v in out.items()}


def distil(args, student, ema, batch_loss, save_to, report: dict, tag: str, warmup: int, started: float,
           **final) -> None:
    """The training loop both methods share: AdamW on `batch_loss()` (the lr schedule, clipping, the EMA `ema`
    of `student`), a log line every 50 steps, `save_to(ema, report)` every --save-minutes and at the end; stops
    at --steps or --minutes. `final` goes into the last report."""
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    t0, last_save, step, run = time.time(), time.time(), 0, 0.0
    student.train()
    report["steps"] = 0
    while True:
        progress = max(step / args.steps, (time.time() - t0) / (args.minutes * 60))
        if progress >= 1.0:
            break
        lr = lr_at(progress, step, args.lr, warmup)
        for pg in opt.param_groups:
            pg["lr"] = lr
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in student.parameters()], 1 - args.ema)
        step += 1
        run += loss.item()
        if step % 50 == 0:
            log(f"{tag} step {step} loss {run / 50:.5f} lr {lr:.2e} {step / (time.time() - t0):.3f} it/s")
            run = 0.0
        if time.time() - last_save > args.save_minutes * 60:
            report.update(steps=step, seconds=time.time() - t0)
            save_to(ema, report)
            last_save = time.time()
            log(f"checkpoint at step {step} -> {args.out}")
    report.update(steps=step, seconds=time.time() - t0, total_seconds=time.time() - started,
                  student_params=nparams(student), finished=True, **final)
    save_to(ema, report)
    log(f"done: {step} steps in {time.time() - t0:.0f}s; saved {args.out}")


def train_phase(args, report, vae, tokenizer, text_encoder, teacher, alphas, out: Path, g, started: float):
    """Phase distillation (`--method phase`): see the module's docstring."""
    from diffusers import UNet2DConditionModel

    init = Path(args.init)
    student = UNet2DConditionModel.from_pretrained(init / "unet")
    ema = UNet2DConditionModel.from_pretrained(init / "unet").eval().requires_grad_(False)
    report["init_from"] = json.loads((init / "train_report.json").read_text())
    record = student_timesteps(init / "scheduler")
    grid = teacher_grid(record)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    log(f"teacher grid ({len(grid)} guided steps): {grid}; recorded {record}")
    cache = Path(args.data_cache) if args.data_cache else None
    if cache is not None and cache.exists():
        data = torch.load(cache)
    else:
        data = teacher_edits(edit_cases(args.n_cases, args.seed), vae, tokenizer, text_encoder, teacher, alphas,
                             grid, record, factor, g)
        if cache is not None:
            torch.save(data, cache)
    report["data_seconds"] = time.time() - started
    N, R = data["states"].shape[:2]
    rec = torch.tensor(record + [0])  # the recorded timesteps, then 0: the finished edit
    states = torch.cat([data["states"], data["target"][:, None]], 1)  # (N, R + 1, C, h, w)
    # the phases: from each timestep of a 4- or 8-step run to the next one of that run (the 4-step ones twice as
    # often); the last phase of a run ends at the finished edit
    phases, weights = [], []
    for n_steps, w in ((4, 2.0), (8, 1.0)):
        run_ts = student_timesteps(init / "scheduler", (n_steps,)) + [0]
        for hi, lo in zip(run_ts, run_ts[1:]):
            phases.append((record.index(hi), R if lo == 0 else record.index(lo)))
            weights.append(w)
    phases, pick = torch.tensor(phases), torch.tensor(weights)
    w_emb = guidance_embedding(EDIT_GUIDANCE, student.config.time_cond_proj_dim)
    weight = 1 + 3 * F.max_pool2d(data["mask"], 3, 1, 1)  # (N, 1, h, w): the mask dilated by one latent, 4x

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(0, N, (args.batch,), generator=g)
        ph = phases[torch.multinomial(pick, args.batch, replacement=True, generator=g)]
        x, goal = states[idx, ph[:, 0]], states[idx, ph[:, 1]]
        t, t_next = rec[ph[:, 0]], rec[ph[:, 1]]
        a = alphas[t][:, None, None, None]
        a_next = torch.where(t_next[:, None, None, None] > 0, alphas[t_next][:, None, None, None], torch.ones(()))
        x0, eps = x0_eps(student(x, t, data["cond"][idx], timestep_cond=w_emb.expand(len(idx), -1)).sample, x, a)
        pred = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps  # the deterministic (DDIM, TCD gamma 0) step
        return (weight[idx] * (pred - goal) ** 2 / a_next).mean()  # / a_next: each phase on the clean scale

    distil(args, student, ema, batch_loss, lambda net, rep: save(out, init, net, rep), report, "phase", 50, started,
           cases=N, teacher_grid=grid, recorded=record)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", default=str(ROOT / "assets" / "demo"), help="the teacher pipeline folder")
    ap.add_argument("--out", default=str(ROOT / "assets" / "demo-fast"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=12000, help="training scenes (seeds 0..N-1, as the demo's)")
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--minutes", type=float, default=40.0, help="wall-clock cap of the distillation loop")
    ap.add_argument("--save-minutes", type=float, default=5.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--ema", type=float, default=0.95, help="decay of the EMA target network (LCM: 0.95)")
    ap.add_argument("--guidance-min", type=float, default=2.0)
    ap.add_argument("--guidance-max", type=float, default=9.0)
    ap.add_argument("--ddim-steps", type=int, default=50, help="the solver's grid: k = 1000 / this")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", default=None, help="a distilled model folder to go on from (its unet: student and target)")
    ap.add_argument("--method", choices=("lcd", "phase"), default="lcd",
                    help="lcd: latent consistency distillation from the demo model; phase: phase distillation of "
                         "blended teacher edits, from --init")
    ap.add_argument("--init", default=None, help="--method phase: the distilled model folder to start from")
    ap.add_argument("--n-cases", type=int, default=6000, help="--method phase: teacher edits (training seeds)")
    ap.add_argument("--data-cache", default=None, help="--method phase: a .pt file that keeps the teacher's edits")
    args = ap.parse_args()
    if args.method == "phase" and not args.init:
        ap.error("--method phase needs --init (a distilled model folder, e.g. assets/demo-fast)")

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    T0 = time.time()
    demo, out = Path(args.demo), Path(args.out)
    report: dict = {"args": vars(args), "command": "python " + " ".join(sys.argv)}

    # 1. the demo's parts; the teacher frozen
    vae = AutoencoderKL.from_pretrained(demo / "vae").eval()
    tokenizer = AutoTokenizer.from_pretrained(demo / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(demo / "text_encoder").eval()
    teacher = UNet2DConditionModel.from_pretrained(demo / "unet").eval()
    for m in (vae, text_encoder, teacher):
        m.requires_grad_(False)
    from diffusers import DDIMScheduler

    alphas = DDIMScheduler.from_pretrained(demo / "scheduler").alphas_cumprod.float()  # (1000,)
    if args.method == "phase":
        return train_phase(args, report, vae, tokenizer, text_encoder, teacher, alphas, out, g, T0)
    student = build_student(teacher)
    target = build_student(teacher).eval().requires_grad_(False)
    if args.resume:  # a second stage: both networks start from the saved EMA target, a fresh cosine schedule
        saved = UNet2DConditionModel.from_pretrained(Path(args.resume) / "unet").state_dict()
        student.load_state_dict(saved)
        target.load_state_dict(saved)
        report["resumed_from"] = json.loads((Path(args.resume) / "train_report.json").read_text())
    k = alphas.numel() // args.ddim_steps
    grid = torch.arange(1, args.ddim_steps + 1) * k - 1  # [19, 39, ..., 999]: LCMScheduler's training grid
    log(f"student params {nparams(student):,}; solver grid {grid[:3].tolist()}..{grid[-1].item()}, k={k}")

    # 2. data: training scenes, encoded once (posterior mode x scaling_factor, as the editor encodes)
    t = time.time()
    sc = [scenes.make_scene(s) for s in range(args.n_train)]
    x = to_tensor(np.stack([s.image for s in sc]))
    with torch.no_grad():
        latents = torch.cat([vae.encode(x[i : i + 256]).latent_dist.mode() for i in range(0, len(x), 256)])
    latents = latents * vae.config.scaling_factor
    ids = tokenizer([s.caption for s in sc], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        uncond = text_encoder(empty)[0]  # (1, L, D)
    del x, sc
    log(f"{args.n_train} scenes -> latents {tuple(latents.shape)} in {time.time() - t:.0f}s")

    # 3. distillation
    def batch_loss() -> torch.Tensor:
        B = args.batch
        idx = torch.randint(0, len(latents), (B,), generator=g)
        x0 = latents[idx]
        n = torch.randint(0, args.ddim_steps, (B,), generator=g)
        t_start, t_prev = grid[n], (grid[n] - k).clamp(min=0)
        a_s, a_p = alphas[t_start][:, None, None, None], alphas[t_prev][:, None, None, None]
        noise = torch.randn(x0.shape, generator=g)
        x_start = a_s.sqrt() * x0 + (1 - a_s).sqrt() * noise
        w = args.guidance_min + (args.guidance_max - args.guidance_min) * torch.rand(B, generator=g)
        w_emb = torch.cat([guidance_embedding(float(v), COND_DIM) for v in w])  # (B, COND_DIM)
        with torch.no_grad():
            cond = text_encoder(ids[idx])[0]
            # the teacher's guided DDIM step t_start -> t_prev
            v = teacher(torch.cat([x_start, x_start]), torch.cat([t_start, t_start]),
                        torch.cat([uncond.expand(B, -1, -1), cond])).sample
            x0_u, eps_u = x0_eps(v[:B], x_start, a_s)
            x0_c, eps_c = x0_eps(v[B:], x_start, a_s)
            gw = w[:, None, None, None]
            x0_g, eps_g = x0_u + gw * (x0_c - x0_u), eps_u + gw * (eps_c - eps_u)
            x_prev = a_p.sqrt() * x0_g + (1 - a_p).sqrt() * eps_g
            # the target: the EMA network's consistency function at t_prev
            cs, co = boundary(t_prev)
            target_x0 = x0_eps(target(x_prev, t_prev, cond, timestep_cond=w_emb).sample, x_prev, a_p)[0]
            goal = cs * x_prev + co * target_x0
        cs, co = boundary(t_start)
        pred = cs * x_start + co * x0_eps(student(x_start, t_start, cond, timestep_cond=w_emb).sample, x_start, a_s)[0]
        return F.mse_loss(pred, goal)

    distil(args, student, target, batch_loss, lambda net, rep: save(out, demo, net, rep), report, "lcd", 100, T0)


if __name__ == "__main__":
    main()
