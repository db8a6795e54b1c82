"""Distil the bundled demo model into a few-step one (latent consistency distillation, LCM), CPU only.

    python tools/train_fast.py --out assets/demo-fast              # the bundled run (--minutes 40)
    python tools/train_fast.py --out /tmp/fast --minutes 0.5 --n-train 512   # smoke test

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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))
import scenes  # noqa: E402
from train_demo import log, lr_at, nparams, to_tensor  # noqa: E402

from blended.unet_call import guidance_embedding  # noqa: E402

COND_DIM = 64  # width of the guidance embedding the student reads
RECOMMENDED = {  # blended.json of the distilled model: picked on validation edits (bench/fewstep.py --sections tune)
    "scheduler": "lcm", "num_inference_steps": 4, "guidance_scale": 7.5, "num_candidates": 4, "blend_start": 0.0,
    "core_steps": 0.75, "background_timestep": "next", "background_noise": "fixed", "decoder_lr": 0.001,
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
    args = ap.parse_args()

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
    student = build_student(teacher)
    target = build_student(teacher).eval().requires_grad_(False)
    if args.resume:  # a second stage: both networks start from the saved EMA target, a fresh cosine schedule
        saved = UNet2DConditionModel.from_pretrained(Path(args.resume) / "unet").state_dict()
        student.load_state_dict(saved)
        target.load_state_dict(saved)
        report["resumed_from"] = json.loads((Path(args.resume) / "train_report.json").read_text())
    from diffusers import DDIMScheduler

    alphas = DDIMScheduler.from_pretrained(demo / "scheduler").alphas_cumprod.float()  # (1000,)
    T = alphas.numel()
    k = T // args.ddim_steps
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
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    t0, last_save, step, run = time.time(), time.time(), 0, 0.0
    student.train()
    report["steps"] = 0
    while True:
        progress = max(step / args.steps, (time.time() - t0) / (args.minutes * 60))
        if progress >= 1.0:
            break
        lr = lr_at(progress, step, args.lr, 100)
        for pg in opt.param_groups:
            pg["lr"] = lr
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
        loss = F.mse_loss(pred, goal)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(target.parameters()), [p.detach() for p in student.parameters()], 1 - args.ema)
        step += 1
        run += loss.item()
        if step % 50 == 0:
            log(f"lcd step {step} loss {run / 50:.5f} lr {lr:.2e} {step / (time.time() - t0):.3f} it/s")
            run = 0.0
        if time.time() - last_save > args.save_minutes * 60:
            report.update(steps=step, seconds=time.time() - t0)
            save(out, demo, target, report)
            last_save = time.time()
            log(f"checkpoint at step {step} -> {out}")
    report.update(steps=step, seconds=time.time() - t0, total_seconds=time.time() - T0,
                  student_params=nparams(student), finished=True)
    save(out, demo, target, report)
    log(f"done: {step} steps in {time.time() - t0:.0f}s; saved {out}")


if __name__ == "__main__":
    main()
