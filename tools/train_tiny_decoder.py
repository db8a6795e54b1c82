"""Distil a tiny decoder (a diffusers `AutoencoderTiny`, as TAESD) for the bundled demo VAE, CPU only.

    python -m tools.train_tiny_decoder --out assets/demo/vae_tiny --copy-to assets/demo-fast/vae_tiny \
        --minutes 28 --data-cache /tmp/tiny_data.pt                     # the bundled run's first stage (issue 31)
    python -m tools.train_tiny_decoder --init assets/demo/vae_tiny --out assets/demo/vae_tiny \
        --copy-to assets/demo-fast/vae_tiny --minutes 25 --data-cache /tmp/tiny_data.pt --lr 0.001 \
        --gen-fraction 0.75 --warmup 50                                 # its second stage: the bundled decoder
    python -m tools.train_tiny_decoder --out /tmp/vae_tiny --minutes 1 --n-scenes 512 --n-fast-edits 32 \
        --n-demo-edits 8 --n-val 64                                     # smoke test

As TAESD was made: a small conv + ReLU decoder (no GroupNorm, no attention, so its receptive field is finite)
learns to reproduce the FULL decoder's images from the same latents, not the original pictures.

* the student: `AutoencoderTiny` whose decoder upsamples as often as the demo VAE downsamples (one
  `num_decoder_blocks` entry per resolution, 2x nearest upsampling between them: 16x16 latents -> 64x64 RGB),
  `latent_channels` and `scaling_factor` from the demo VAE, so that it decodes UNet-space latents straight
  (`AutoencoderTiny.decode(latents).sample`, images in [-1, 1]). DecoderTiny needs one width for all its stages.
  The default, width 16 with 3, 3, 0 blocks (none at 64 px: there only the upsampled conv and the output conv),
  has 40 M conv MACs per 64 px image against the full decoder's 252 M; a pilot of 500 steps each matched
  2, 2, 1 blocks (60 M MACs) in loss at half its training time. Only the decoder is trained: the encoder is
  small (width 8) and stays at its random initialisation (the editor never uses it; do not encode with it).
* the data (UNet-space latents, `LoadedModel.encode` semantics: the posterior mean scaled by the VAE's config):
  training scenes (seeds 0..--n-scenes-1) encoded; as many again perturbed (Gaussian noise of a random level,
  or two scenes' latents blended under a random box, as the blending loop joins them); and the final latents of
  blended edits the demo UNets make (--n-fast-edits demo-fast edits at its defaults, --n-demo-edits demo edits
  at 20 steps, 4 candidates each, training seeds, every fourth a whole-image generation), caught at the VAE's
  decode. The target of every latent is the full demo decoder's image of it (`LoadedModel.decode`, clamped).
* validation: held-out scenes (seeds HELDOUT_SEED_START + 950_000..) encoded, and held-out demo-fast edits'
  latents (HELDOUT_SEED_START + 960_000..); PSNR of the tiny decode against the full one (median, dB).
* training: MSE (+ --l1 x L1) on [-1, 1] images, AdamW, linear warm-up then cosine (blended_dev.training.lr_at);
  half of each batch from the UNets' latents; stops at --steps or --minutes. Preparing the data is not counted
  (the bundled run's: 27 min on one core of a busy 2-core machine, mostly the edits and the full decodes;
  --data-cache keeps it, 265 MB, for the next run).

Writes <out>/ (`AutoencoderTiny.save_pretrained`, safetensors) with <out>/train_report.json, and copies the
folder to each --copy-to (demo-fast shares the demo VAE, so it gets the same decoder).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from blended_dev import ROOT, scenes
from blended_dev.training import log, lr_at, nparams, to_tensor

VAL_SCENES = scenes.HELDOUT_SEED_START + 950_000  # held-out scenes no bench uses
VAL_EDITS = scenes.HELDOUT_SEED_START + 960_000  # held-out demo-fast edits no bench uses
TRAIN_EDITS = 60_000_000  # training edit seeds (< scenes.TRAIN_SEED_END), apart from the scenes' 0..N


def build_tiny(vae, width: int, blocks: tuple[int, ...]):
    """An AutoencoderTiny whose decoder inverts `vae`'s downsampling: len(blocks) stages, 2x between them."""
    from diffusers import AutoencoderTiny

    ups = len(vae.config.block_out_channels) - 1  # the demo VAE: [16, 32, 64] -> 4x
    if len(blocks) != ups + 1:
        raise ValueError(f"--blocks needs {ups + 1} entries (one per resolution of a {2 ** ups}x VAE), got {blocks}")
    return AutoencoderTiny(
        in_channels=3, out_channels=3, latent_channels=vae.config.latent_channels,
        decoder_block_out_channels=(width,) * (ups + 1), num_decoder_blocks=tuple(blocks),
        encoder_block_out_channels=(8,) * (ups + 1), num_encoder_blocks=(1,) * (ups + 1),  # untrained, minimal
        upsampling_scaling_factor=2, act_fn="relu", upsample_fn="nearest",
        scaling_factor=float(vae.config.scaling_factor), shift_factor=float(vae.config.shift_factor or 0.0))


def unet_space(vae, z: torch.Tensor) -> torch.Tensor:
    """Latents as the VAE's decoder takes them -> as the UNet sees them (LoadedModel's scale and shift)."""
    return (z - float(vae.config.shift_factor or 0.0)) * float(vae.config.scaling_factor)


@contextmanager
def decode_inputs(vae):
    """Collects the latents (UNet space) every `vae.decode` of the block gets (its post_quant_conv's input)."""
    caught: list[torch.Tensor] = []
    hook = vae.post_quant_conv.register_forward_pre_hook(lambda mod, args: caught.append(unet_space(vae, args[0])))
    try:
        yield caught
    finally:
        hook.remove()


def edit_cases(n: int, base: int):
    """(image, mask, prompt, seed) of edits from seed `base` on; every 4th a whole-image generation of a scene."""
    cases = []
    for i in range(n):
        if i % 4 == 0:
            sc = scenes.make_scene(base + i)
            cases.append((sc.image, np.ones((scenes.SIZE, scenes.SIZE), bool), sc.caption, base + i))
        else:
            image, mask, prompt, _, _ = scenes.make_edit_case(base + i)
            cases.append((image, mask, prompt, base + i))
    return cases


@torch.no_grad()
def edit_latents(editor, cases, tag: str, **settings) -> torch.Tensor:
    """The final latents of `editor`'s edits of `cases` (4 candidates each, no ranking), (N * 4, C, h, w)."""
    t0 = time.time()
    with decode_inputs(editor.model.pipe.vae) as caught:
        for k, (image, mask, prompt, seed) in enumerate(cases):
            editor.edit(Image.fromarray(image), Image.fromarray(mask.astype(np.uint8) * 255), prompt,
                        seed=seed, num_candidates=4, rank=False, **settings)
            if (k + 1) % 100 == 0:
                log(f"{tag} edits {k + 1}/{len(cases)} ({time.time() - t0:.0f}s)")
    return torch.cat(caught).float()


@torch.no_grad()
def encode_scenes(model, seeds) -> torch.Tensor:
    """Scenes of `seeds` -> UNet-space latents (`LoadedModel.encode`: the posterior mean, scaled)."""
    out = []
    seeds = list(seeds)
    for b in range(0, len(seeds), 256):
        x = to_tensor(np.stack([scenes.make_scene(s).image for s in seeds[b:b + 256]]))
        out.append(model.encode(x).float())
    return torch.cat(out)


def perturbed(z: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One variant per latent: half noised (std up to 0.5 of the latents'), half two latents joined under a box."""
    n, _, h, w = z.shape
    noisy = z + torch.rand(n, 1, 1, 1, generator=g) * 0.5 * z.std() * torch.randn(z.shape, generator=g)
    other = z[torch.randperm(n, generator=g)]
    box = torch.zeros(n, 1, h, w)
    for i in range(n):
        bh, bw = (int(v) for v in torch.randint(3, h, (2,), generator=g))
        y, x = int(torch.randint(0, h - bh + 1, (1,), generator=g)), int(torch.randint(0, w - bw + 1, (1,), generator=g))
        box[i, :, y:y + bh, x:x + bw] = 1.0
    joined = box * other + (1 - box) * z
    return torch.where((torch.arange(n) % 2 == 0)[:, None, None, None], noisy, joined)


@torch.no_grad()
def full_decode(model, z: torch.Tensor) -> torch.Tensor:
    """The full decoder's images of UNet-space latents, uint8 (N, 3, H, W)."""
    out = [model.decode(z[b:b + 128]).clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
           for b in range(0, len(z), 128)]
    return torch.cat(out)


def build_data(args, demo, fast, g: torch.Generator) -> dict:
    """Training and validation latents with the full decoder's images of them (cached in --data-cache)."""
    cache = Path(args.data_cache) if args.data_cache else None
    if cache is not None and cache.exists():
        log(f"data from {cache}")
        return torch.load(cache)
    t0 = time.time()
    z_scenes = encode_scenes(demo.model, range(args.n_scenes))
    log(f"{len(z_scenes)} scenes encoded ({time.time() - t0:.0f}s)")
    z_pert = perturbed(z_scenes, g)
    z_gen = torch.cat([edit_latents(fast, edit_cases(args.n_fast_edits, TRAIN_EDITS), "demo-fast"),
                       edit_latents(demo, edit_cases(args.n_demo_edits, TRAIN_EDITS + 1_000_000), "demo",
                                    num_inference_steps=20)])
    val_scenes = encode_scenes(demo.model, range(VAL_SCENES, VAL_SCENES + args.n_val))
    val_gen = edit_latents(fast, edit_cases(args.n_val // 4, VAL_EDITS), "validation")
    data = {"z": torch.cat([z_scenes, z_pert]), "z_gen": z_gen, "val_scenes": val_scenes, "val_gen": val_gen}
    for key in list(data):
        data[key + "_y"] = full_decode(demo.model, data[key])
        log(f"{key}: {tuple(data[key].shape)} decoded ({time.time() - t0:.0f}s)")
    data["prep_seconds"] = torch.tensor(time.time() - t0)  # kept with the cache, for the report
    if cache is not None:
        torch.save(data, cache)
    return data


def psnr(images: torch.Tensor, target_u8: torch.Tensor) -> list[float]:
    """Per-image PSNR (dB) of [-1, 1] images against uint8 ones, both as the editor rounds them."""
    a = images.clamp(-1, 1).add(1).mul(127.5).round()
    mse = (a - target_u8.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(255.0**2 / mse)).tolist()


@torch.no_grad()
def validate(tiny, data: dict) -> dict:
    """Median and 10th-percentile PSNR of the tiny decode against the full one on both validation sets."""
    out = {}
    for key in ("val_scenes", "val_gen"):
        p = psnr(torch.cat([tiny.decode(z).sample for z in data[key].split(256)]), data[key + "_y"])
        out[key] = {"median_db": statistics.median(p), "p10_db": float(np.percentile(p, 10)), "n": len(p)}
    return out


def conv_macs(module: torch.nn.Module, fn, x: torch.Tensor) -> float:
    """Multiply-accumulates per image of the Conv2d layers inside `module` during `fn(x)`."""
    total = [0]

    def count(m, i, o):
        total[0] += o.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    hooks = [m.register_forward_hook(count) for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        fn(x)
    for h in hooks:
        h.remove()
    return total[0] / x.shape[0]


@torch.no_grad()
def decode_cost(model, tiny, z: torch.Tensor, reps: int = 50) -> dict:
    """Conv MACs per image and median seconds of a batch decode, full (`LoadedModel.decode`) and tiny, alternating."""
    full_fn, tiny_fn = model.decode, (lambda x: tiny.decode(x).sample)
    times = {"full": [], "tiny": []}
    for r in range(reps + 3):
        for name, fn in (("full", full_fn), ("tiny", tiny_fn)):
            t = time.perf_counter()
            fn(z)
            if r >= 3:  # warm-up
                times[name].append(time.perf_counter() - t)
    out = {"batch": z.shape[0], "threads": torch.get_num_threads(),
           "full_macs_m": conv_macs(model.pipe.vae, full_fn, z) / 1e6, "tiny_macs_m": conv_macs(tiny, tiny_fn, z) / 1e6,
           "full_s": statistics.median(times["full"]), "tiny_s": statistics.median(times["tiny"])}
    out["macs_ratio"] = out["full_macs_m"] / out["tiny_macs_m"]
    out["time_ratio"] = out["full_s"] / out["tiny_s"]
    return out


def train(args, tiny, data: dict, report: dict, save_to) -> None:
    """AdamW on the decoder: MSE (+ --l1 L1) against the full decode, half of each batch from the UNets' latents."""
    dec = tiny.decoder
    opt = torch.optim.AdamW(dec.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    g = torch.Generator().manual_seed(args.seed + 1)
    z, y, zg, yg = data["z"], data["z_y"], data["z_gen"], data["z_gen_y"]
    n_gen = int(round(args.batch * args.gen_fraction))
    t0, last_save, step, run = time.time(), time.time(), 0, 0.0
    tiny.train()
    while True:
        progress = max(step / args.steps, (time.time() - t0) / (args.minutes * 60))
        if progress >= 1.0:
            break
        lr = lr_at(progress, step, args.lr, args.warmup)
        for pg in opt.param_groups:
            pg["lr"] = lr
        i = torch.randint(0, len(z), (args.batch - n_gen,), generator=g)
        j = torch.randint(0, len(zg), (n_gen,), generator=g)
        x = torch.cat([z[i], zg[j]])
        target = torch.cat([y[i], yg[j]]).float().div(127.5).sub(1.0)
        pred = dec(x)
        loss = F.mse_loss(pred, target) + (args.l1 * F.l1_loss(pred, target) if args.l1 else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        run += loss.item()
        if step % 100 == 0:
            log(f"step {step} loss {run / 100:.5f} lr {lr:.2e} {step / (time.time() - t0):.2f} it/s")
            run = 0.0
        if time.time() - last_save > args.save_minutes * 60:
            tiny.eval()
            report.update(steps=step, seconds=time.time() - t0, val=validate(tiny, data))
            tiny.train()
            save_to(report)
            last_save = time.time()
            log(f"checkpoint at step {step}: {report['val']}")
    tiny.eval()
    report.update(steps=step, seconds=time.time() - t0)


def save(tiny, out: Path, copies: list[Path], report: dict) -> None:
    """`save_pretrained` (safetensors) + train_report.json into `out`, then byte-identical copies."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tiny.save_pretrained(tmp, safe_serialization=True)
    (tmp / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    for dest in [out, *copies]:
        shutil.rmtree(dest, ignore_errors=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(tmp, dest)
    shutil.rmtree(tmp)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", default=str(ROOT / "assets" / "demo"), help="the model whose VAE is distilled")
    ap.add_argument("--fast", default=str(ROOT / "assets" / "demo-fast"), help="its few-step model (same VAE)")
    ap.add_argument("--out", default=str(ROOT / "assets" / "demo" / "vae_tiny"))
    ap.add_argument("--copy-to", action="append", default=[], help="also copy the folder here (repeatable)")
    ap.add_argument("--width", type=int, default=16, help="channels of every decoder stage (DecoderTiny: one width)")
    ap.add_argument("--blocks", default="3,3,0", help="AutoencoderTinyBlocks per resolution, lowest first")
    ap.add_argument("--init", default=None, help="a tiny decoder folder to go on from (--width/--blocks ignored)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-scenes", type=int, default=6000, help="training scenes encoded (and as many perturbed)")
    ap.add_argument("--n-fast-edits", type=int, default=800, help="demo-fast edits whose final latents are kept")
    ap.add_argument("--n-demo-edits", type=int, default=120, help="demo edits (20 steps) whose final latents are kept")
    ap.add_argument("--n-val", type=int, default=256, help="held-out scenes (and a quarter as many edits)")
    ap.add_argument("--data-cache", default=None, help="a .pt file that keeps the latents and their full decodes")
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--minutes", type=float, default=28.0, help="wall-clock cap of the training loop")
    ap.add_argument("--save-minutes", type=float, default=5.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--gen-fraction", type=float, default=0.5, help="share of each batch from the UNets' latents")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--l1", type=float, default=0.0, help="weight of an L1 term next to the MSE")
    ap.add_argument("--threads", type=int, default=1)
    return ap.parse_args()


def main():
    args = parse_args()
    from blended import Editor

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    T0 = time.time()
    out, copies = Path(args.out), [Path(p) for p in args.copy_to]
    report: dict = {"args": vars(args), "command": "python -m tools.train_tiny_decoder " + " ".join(sys.argv[1:])}

    # 1. the demo models (their VAE is the teacher; their UNets make the generated latents)
    demo = Editor.load(args.demo, device="cpu", ranker=None)
    fast = Editor.load(args.fast, device="cpu", ranker=None)
    vae = demo.model.pipe.vae
    if args.init:  # a second stage: the saved decoder (its shapes) trained on, a fresh schedule
        from diffusers import AutoencoderTiny

        tiny = AutoencoderTiny.from_pretrained(args.init)
        report["init_from"] = json.loads((Path(args.init) / "train_report.json").read_text())
    else:
        tiny = build_tiny(vae, args.width, tuple(int(b) for b in args.blocks.split(",")))
    tiny.encoder.requires_grad_(False)
    log(f"tiny decoder params {nparams(tiny.decoder):,} (encoder {nparams(tiny.encoder):,}, untrained); "
        f"full decoder {nparams(vae.decoder) + nparams(vae.post_quant_conv):,}")

    # 2. data: latents and the full decoder's images of them
    data = build_data(args, demo, fast, g)
    prep = data.pop("prep_seconds", None)  # a cache made before this field: unknown
    report["data_seconds"] = None if prep is None else float(prep)
    report["data"] = {k: len(v) for k, v in data.items() if not k.endswith("_y")}

    # 3. distillation
    save_to = lambda rep: save(tiny, out, copies, rep)  # noqa: E731
    train(args, tiny, data, report, save_to)
    report.update(val=validate(tiny, data), decode=decode_cost(demo.model, tiny, data["val_gen"][:4]),
                  params={"decoder": nparams(tiny.decoder), "encoder_untrained": nparams(tiny.encoder),
                          "full_decoder": nparams(vae.decoder) + nparams(vae.post_quant_conv)},
                  encoder="untrained (random initialisation): the editor only decodes; do not encode with it",
                  total_seconds=time.time() - T0, finished=True)
    save_to(report)
    log(f"done: {report['steps']} steps in {report['seconds']:.0f}s; val {report['val']}; decode {report['decode']}")


if __name__ == "__main__":
    main()
