"""A 9-channel inpainting variant of the bundled demo model: one seeded script, CPU only.

    OMP_NUM_THREADS=1 python -m tools.train_inpaint_demo --out /tmp/demo-inpaint        # ~12 min, 1 thread
    python -m tools.train_inpaint_demo --out /tmp/smoke --minutes 0.3 --n-train 500     # smoke test

The demo UNet (assets/demo) gets 5 zero-initialised input channels (the mask and the masked source's
latents, Stable Diffusion inpainting's layout: latents, mask, masked-image latents), so at step 0 it is the
text-to-image UNet exactly; it is then fine-tuned on training scenes (seeds < scenes.TRAIN_SEED_END) where
one object is hidden under a rectangle or ellipse mask and the caption asks for that object. VAE, text
encoder, tokenizer and scheduler are the demo model's, unchanged. Writes a diffusers folder `<out>` (about
12 MB: not committed) that `--model <out>` loads; bench/inpaint.py measures it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from blended_dev import ROOT, scenes
from blended_dev.training import log


def inpaint_case(seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """A training scene with one of its objects under a mask: (image uint8, mask bool, caption)."""
    sc = scenes.make_scene(seed)
    rng = np.random.default_rng([seed, 11])
    obj = sc.objects[int(rng.integers(len(sc.objects)))]
    grow = int(rng.integers(0, 6))
    x0, y0, x1, y1 = obj.box
    box = (max(0, x0 - grow), max(0, y0 - grow), min(scenes.SIZE, x1 + grow), min(scenes.SIZE, y1 + grow))
    if rng.random() < 0.5:
        mask = np.zeros((scenes.SIZE, scenes.SIZE), bool)
        mask[box[1]:box[3], box[0]:box[2]] = True
    else:
        mask = (scenes.shape_alpha("circle", box) > 0.5) | sc.masks[sc.objects.index(obj)]
    r = rng.random()
    caption = obj.phrase if r < 0.8 else sc.caption if r < 0.9 else ""
    return sc.image, mask, caption


def nine_channel_unet(unet):
    """The same UNet with 5 zero-initialised input channels after the 4 latent ones."""
    from diffusers import UNet2DConditionModel

    config = dict(unet.config)
    config["in_channels"] = 2 * unet.config.in_channels + 1
    new = UNet2DConditionModel.from_config(config)
    state = unet.state_dict()
    w = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([w, torch.zeros(w.shape[0], config["in_channels"] - w.shape[1],
                                                        *w.shape[2:])], 1)
    new.load_state_dict(state, strict=True)
    return new


@torch.no_grad()
def encode(vae, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """(N, 3, 64, 64) in [-1, 1] -> scaled latents, as the engine encodes (the distribution's mean)."""
    return torch.cat([vae.encode(x[i:i + batch]).latent_dist.mean for i in range(0, len(x), batch)]) \
        * vae.config.scaling_factor


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "assets" / "demo"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-train", type=int, default=12000)
    ap.add_argument("--minutes", type=float, default=12.0)
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    t0 = time.time()
    pipe = StableDiffusionPipeline.from_pretrained(args.model)
    vae, te, tok = pipe.vae.eval(), pipe.text_encoder.eval(), pipe.tokenizer
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    unet = nine_channel_unet(pipe.unet)

    # data: images, masks, masked images -> latents (the VAE and text encoder stay frozen)
    cases = [inpaint_case(s) for s in range(args.n_train)]
    x = torch.from_numpy(np.stack([c[0] for c in cases])).permute(0, 3, 1, 2).float() / 127.5 - 1
    m = torch.from_numpy(np.stack([c[1] for c in cases]))[:, None].float()  # (N, 1, 64, 64), 1 = hidden
    latents = encode(vae, x)
    masked = encode(vae, x * (1 - m))
    f = x.shape[-1] // latents.shape[-1]
    z_mask = F.max_pool2d(m, f)  # a latent is masked if any pixel under it is (the engine's "any")
    with torch.no_grad():
        ids = tok([c[2] for c in cases], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        emb = torch.cat([te(ids[i:i + 512])[0] for i in range(0, len(ids), 512)])
    log(f"{args.n_train} cases encoded in {time.time() - t0:.0f} s; latents {tuple(latents.shape)}")

    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=5.0) / (snr + 1)  # min-SNR-5 for v prediction, as the demo UNet was trained
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=1e-2)
    unet.train()
    start, step, run = time.time(), 0, 0.0
    while step < args.steps and time.time() - start < args.minutes * 60:
        lr = args.lr * min(1.0, (step + 1) / 50)
        for pg in opt.param_groups:
            pg["lr"] = lr
        idx = torch.randint(0, args.n_train, (args.batch,), generator=g)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (args.batch,), generator=g)
        xt = torch.cat([sched.add_noise(x0, noise, t), z_mask[idx], masked[idx]], 1)  # (B, 9, h, w)
        pred = unet(xt, t, emb[idx]).sample
        loss = ((pred - sched.get_velocity(x0, noise, t)).pow(2).mean(dim=(1, 2, 3)) * weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        step += 1
        run += loss.item()
        if step % 50 == 0:
            log(f"step {step} loss {run / 50:.4f} {step / (time.time() - start):.2f} it/s")
            run = 0.0
    unet.eval()
    out = Path(args.out)
    pipe.unet = unet
    StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=pipe.scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(out, safe_serialization=True)
    if (Path(args.model) / "blended.json").is_file():
        shutil.copy(Path(args.model) / "blended.json", out / "blended.json")
    report = {"args": vars(args), "steps": step, "seconds": round(time.time() - start, 1),
              "unet_params": sum(p.numel() for p in unet.parameters())}
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"saved {out} after {step} steps")


if __name__ == "__main__":
    main()
