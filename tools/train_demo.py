"""Rebuild the bundled demo models from nothing: one seeded script, CPU only.

    python -m tools.train_demo --out assets            # full run (~58 min on 2 cores, 1 thread)
    python -m tools.train_demo --out /tmp/smoke --vae-minutes 0.5 --polish-minutes 0.2 \
        --unet-minutes 0.5 --clip-minutes 0.3 --n-train 2000   # smoke test
    python -m tools.train_demo --out /tmp/p --vae-from assets/demo/vae --polish-only \
        --polish-minutes 12                              # polish a trained VAE's decoder, save <out>/demo/vae

Writes
  <out>/demo/          diffusers StableDiffusionPipeline (VAE x4, tiny UNet, tiny CLIP text
                       encoder, word-level tokenizer, DDIM scheduler) + blended.json
  <out>/demo_ranker/   open_clip model: open_clip_config.json + open_clip_model.safetensors

Phases (each bounded by wall-clock minutes, so the run length is predictable):
  1. data: N training scenes from blended_dev/scenes.py (seeds 0..N-1, all < TRAIN_SEED_END)
  2. VAE (AutoencoderKL, 64 px -> 4x16x16) with L1+MSE and a tiny KL term; then a decoder-only
     polish (encoder and quant_conv frozen, latents bit-identical) on scenes with 0-3 objects,
     edit sources and blended edits, the images the editor decodes
  3. latents of the dataset encoded once (posterior mode), standardised per channel
     (folded into the VAE's 1x1 quant convs); scaling_factor = 1/std
  4. UNet2DConditionModel + CLIPTextModel trained jointly on the cached latents
     (v prediction, min-SNR-5 loss weights, 10% empty-caption dropout, EMA)
  5. open_clip ranker trained contrastively on the same scenes
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from blended_dev import scenes
from blended_dev.training import log, lr_at, nparams, to_tensor

WORDS = ["a", "and"] + list(scenes.COLOURS) + list(scenes.SHAPES)
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
MAX_LEN = 16


# ----------------------------------------------------------------------------- builders
def build_tokenizer():
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex(r"[^a-z0-9]+"), " ")]
    )
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos, eos = vocab["<bos>"], vocab["<eos>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>",
        pair="<bos> $A <eos> $B <eos>",
        special_tokens=[("<bos>", bos), ("<eos>", eos)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=MAX_LEN,
        padding_side="right",
    )


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        projection_dim=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_LEN,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # 3, so pooling uses the first <eos> (not argmax)
    )
    return CLIPTextModel(cfg)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        mid_block_add_attention=False,
    )


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=4,
        norm_num_groups=32,
    )


def build_schedulers():
    from diffusers import DDIMScheduler, DDPMScheduler

    kw = dict(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="v_prediction",
        clip_sample=False,
    )
    train = DDPMScheduler(**kw)
    infer = DDIMScheduler(**kw, set_alpha_to_one=False, steps_offset=1)
    return train, infer


RANKER_CFG = {
    "model_cfg": {
        "embed_dim": 64,
        "vision_cfg": {
            "image_size": 64,
            "patch_size": 8,
            "width": 128,
            "layers": 4,
            "head_width": 32,
            "mlp_ratio": 2.0,
        },
        "text_cfg": {
            "context_length": 16,
            "vocab_size": 49408,
            "width": 64,
            "heads": 2,
            "layers": 2,
            "mlp_ratio": 2.0,
        },
    },
    "preprocess_cfg": {
        "size": 64,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    },
}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.clamp(-1, 1) - b) / 2).pow(2).mean().item()
    return 10 * math.log10(1.0 / max(mse, 1e-10))


# ----------------------------------------------------------------------------- phases
def train_vae(vae, x_train, x_val, steps, minutes, batch, g):
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    t0 = time.time()
    budget = minutes * 60
    step = 0
    n = x_train.shape[0]
    vae.train()
    while True:
        progress = max(step / steps, (time.time() - t0) / budget)
        if progress >= 1.0:
            break
        for pg in opt.param_groups:
            pg["lr"] = lr_at(progress, step, 2e-3, 100)
        idx = torch.randint(0, n, (batch,), generator=g)
        x = x_train[idx]
        if step % 2:
            x = x.flip(3)
        post = vae.encode(x).latent_dist
        z = post.sample(generator=g)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / (4 * 16 * 16)
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-5 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0:
            log(
                f"vae step {step} loss {loss.item():.4f} kl {kl.item():.2f} "
                f"psnr(batch) {psnr(rec.detach(), x):.2f} dB  {step / (time.time() - t0):.2f} it/s"
            )
    vae.eval()
    with torch.no_grad():
        rec = torch.cat([vae.decode(vae.encode(x_val[i : i + 128]).latent_dist.mode()).sample for i in range(0, len(x_val), 128)])
    p = psnr(rec, x_val)
    log(f"vae done: {step} steps in {time.time() - t0:.0f}s, held-out PSNR {p:.2f} dB")
    return {"steps": step, "seconds": time.time() - t0, "heldout_psnr_db": p}


POLISH_SEED_START = 50_000_000  # decoder polish scenes: training seeds, apart from 0..n_train-1


def polish_example(seed: int):
    """One decoder-polish example from training seed ``seed``: (source, target, pixel mask) uint8/bool.

    A third each: a scene with 0-3 objects (uniform), the source of a make_edit_case-like edit
    (0-2 objects), and that source with a new object drawn inside its edit mask (the target), whose
    latents will be blended like the editor's (edited inside the latent mask, source outside).
    Without an edit the target is the source and the mask is empty.
    """
    rng = np.random.default_rng([seed, 13])
    kind = seed % 3
    if kind == 0:
        image = scenes.make_scene(seed, n_objects=int(rng.integers(0, 4))).image
        return image, image, np.zeros(image.shape[:2], bool)
    image, mask, _prompt, colour, shape = scenes.make_edit_case(seed)
    if kind == 1:
        return image, image, np.zeros_like(mask)
    ys, xs = np.nonzero(mask)
    x0, y0, side = int(xs.min()), int(ys.min()), int(min(xs.max() - xs.min(), ys.max() - ys.min()) + 1)
    size = int(rng.integers(max(scenes.MIN_OBJ, int(0.6 * side)), side + 1))
    ox, oy = x0 + int(rng.integers(0, side - size + 1)), y0 + int(rng.integers(0, side - size + 1))
    drawn, _ = scenes.render(image, [scenes.SceneObject(shape, colour, ox, oy, size)], rng)
    return image, np.where(mask[..., None], drawn, image), mask


@torch.no_grad()
def polish_latents(vae, src, tgt, mask):
    """Latents (posterior mode) the decoder gets: the target's inside the max-pooled latent mask, the
    source's outside, as the editor blends them (z_init outside the mask)."""
    z = vae.encode(src).latent_dist.mode()  # (B, 4, 16, 16)
    edited = mask.flatten(1).any(1)
    if edited.any():
        f = src.shape[-1] // z.shape[-1]
        m = F.max_pool2d(mask[edited].float(), kernel_size=f, stride=f)  # (E, 1, 16, 16), like blended.masks
        z[edited] = m * vae.encode(tgt[edited]).latent_dist.mode() + (1 - m) * z[edited]
    return z


def polish_decoder(vae, steps, minutes, batch, seed0=POLISH_SEED_START):
    """Train post_quant_conv + decoder on reconstruction (L1 + MSE) with the encoder and quant_conv
    frozen: the latents, hence a UNet trained on them, stay exactly valid. The data covers what the
    editor decodes: scenes with 0-3 objects, edit sources, and blended edits (polish_example)."""
    frozen = [vae.encoder, vae.quant_conv]
    for m in frozen:
        m.requires_grad_(False)
    params = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    probe = to_tensor(np.stack([polish_example(seed0 - 1 - i)[0] for i in range(8)]))
    with torch.no_grad():
        probe_z = vae.encode(probe).latent_dist.parameters.clone()
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    t0 = time.time()
    budget = minutes * 60
    step = 0
    run_loss = 0.0
    vae.eval()
    vae.decoder.train()
    vae.post_quant_conv.train()
    while True:
        progress = max(step / steps, (time.time() - t0) / budget) if steps > 0 else 1.0
        if progress >= 1.0:
            break
        for pg in opt.param_groups:
            pg["lr"] = lr_at(progress, step, 1e-3, 50)
        ex = [polish_example(seed0 + step * batch + j) for j in range(batch)]  # fresh training scenes every step
        src = to_tensor(np.stack([e[0] for e in ex]))
        tgt = to_tensor(np.stack([e[1] for e in ex]))
        mask = torch.from_numpy(np.stack([e[2] for e in ex]))[:, None]  # (B, 1, 64, 64) bool
        z = polish_latents(vae, src, tgt, mask)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, tgt) + F.mse_loss(rec, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        run_loss += loss.item()
        if step % 100 == 0:
            log(f"polish step {step} loss {run_loss / 100:.4f} psnr(batch) {psnr(rec.detach(), tgt):.2f} dB  "
                f"{step / (time.time() - t0):.2f} it/s")
            run_loss = 0.0
    vae.eval()
    for m in frozen:
        m.requires_grad_(True)
    with torch.no_grad():
        same = torch.equal(vae.encode(probe).latent_dist.parameters, probe_z)
    if not same:
        raise RuntimeError("decoder polish changed the encoder's outputs")
    log(f"polish done: {step} steps in {time.time() - t0:.0f}s, encoder outputs bit-identical")
    return {"steps": step, "seconds": time.time() - t0, "encoder_bit_identical": same}


@torch.no_grad()
def reconstruction_psnr(vae, n=256):
    """Held-out PSNR (dB) of plain reconstruction: whole scenes, and edit sources outside their masks."""
    x = to_tensor(np.stack([scenes.make_scene(scenes.HELDOUT_SEED_START + i).image for i in range(n)]))
    rec = torch.cat([vae.decode(vae.encode(x[i : i + 128]).latent_dist.mode()).sample for i in range(0, n, 128)])
    cases = [scenes.make_edit_case(scenes.HELDOUT_SEED_START + 800_000 + i) for i in range(n)]
    xe = to_tensor(np.stack([c[0] for c in cases]))
    keep = ~torch.from_numpy(np.stack([c[1] for c in cases]))[:, None].expand(-1, 3, -1, -1)
    rece = vae.decode(vae.encode(xe).latent_dist.mode()).sample
    outside = [psnr(r[k][None], x0[k][None]) for r, x0, k in zip(rece, xe, keep)]
    return {"heldout_psnr_db": psnr(rec, x), "edit_source_outside_psnr_db_median": float(np.median(outside))}


@torch.no_grad()
def standardize_latent_channels(vae, mean: torch.Tensor, std: torch.Tensor):
    """Fold a per-channel affine map into the VAE so that its latents have zero mean and unit
    std per channel: z' = (z - mean) / std. An exact reparametrisation (quant_conv and
    post_quant_conv are 1x1 convolutions); the standard pipelines then only need scaling_factor.
    Without it the latent channels had stds from 0.14 to 1.4 and samples went off-distribution.
    """
    c = mean.numel()
    q, pq = vae.quant_conv, vae.post_quant_conv
    q.weight[:c] /= std[:, None, None, None]
    q.bias[:c] = (q.bias[:c] - mean) / std
    q.bias[c:] -= 2 * torch.log(std)
    w = pq.weight.clone()  # (out, in, 1, 1)
    pq.bias += w[:, :, 0, 0] @ mean
    pq.weight.copy_(w * std[None, :, None, None])


@torch.no_grad()
def encode_all(vae, x, batch=256):
    out = []
    for i in range(0, x.shape[0], batch):
        out.append(vae.encode(x[i : i + batch]).latent_dist.mode())
    return torch.cat(out)


def train_unet(unet, text_encoder, latents, ids, empty_ids, steps, minutes, batch, g, sched):
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2, betas=(0.9, 0.99))
    ema = [p.detach().clone() for p in params]
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=5.0) / (snr + 1)  # min-SNR-5 for v prediction
    n = latents.shape[0]
    t0 = time.time()
    budget = minutes * 60
    step = 0
    run_loss = 0.0
    unet.train()
    text_encoder.train()
    while True:
        progress = max(step / steps, (time.time() - t0) / budget)
        if progress >= 1.0:
            break
        lr = lr_at(progress, step, 1e-3, 150)
        for pg in opt.param_groups:
            pg["lr"] = lr
        idx = torch.randint(0, n, (batch,), generator=g)
        x0 = latents[idx]
        tok = ids[idx].clone()
        drop = torch.rand(batch, generator=g) < 0.1
        tok[drop] = empty_ids
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
        xt = sched.add_noise(x0, noise, t)
        cond = text_encoder(tok)[0]
        pred = unet(xt, t, cond).sample
        target = sched.get_velocity(x0, noise, t)
        loss = ((pred - target).pow(2).mean(dim=(1, 2, 3)) * weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(0.998, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        run_loss += loss.item()
        if step % 100 == 0:
            log(
                f"unet step {step} loss {run_loss / 100:.4f} lr {lr:.2e} "
                f"{step / (time.time() - t0):.2f} it/s ({batch * step / (time.time() - t0):.0f} samples/s)"
            )
            run_loss = 0.0
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    unet.eval()
    text_encoder.eval()
    log(f"unet done: {step} steps in {time.time() - t0:.0f}s")
    return {"steps": step, "seconds": time.time() - t0}


def ranker_batch(images, scene_objs, captions, full_tok, phrase_tok, phrase_index, batch, g):
    """Images (B,3,64,64) in [-1,1], open_clip token ids (B,16) and caption strings.

    40% full caption, 35% the phrase of one object of the scene, 25% a crop around one object
    with its phrase; random mirror and a mild blur on 30% (like decoded samples).
    """
    from torchvision.ops import roi_align

    n = images.shape[0]
    idx = torch.randint(0, n, (batch,), generator=g)
    r = torch.rand(batch, generator=g).tolist()
    pick = torch.rand(batch, generator=g).tolist()
    marg = torch.rand(batch, generator=g).tolist()
    x = images[idx].clone()
    toks, keys, crop_rows, crop_boxes = [], [], [], []
    for b, i in enumerate(idx.tolist()):
        objs = scene_objs[i]
        if r[b] < 0.4 or not objs:
            toks.append(full_tok[i])
            keys.append(captions[i])
            continue
        o = objs[int(pick[b] * len(objs))]
        key = f"a {o[0]} {o[1]}"
        toks.append(phrase_tok[phrase_index[key]])
        keys.append(key)
        if r[b] >= 0.75:
            x0, y0, s = o[2], o[3], o[4]
            side = min(64.0, s * (1.3 + 1.0 * marg[b]))  # square crop, shifted to stay inside
            cx = min(max(0.0, x0 + s / 2 - side / 2), 64.0 - side)
            cy = min(max(0.0, y0 + s / 2 - side / 2), 64.0 - side)
            crop_rows.append(b)
            crop_boxes.append([0.0, cx, cy, cx + side, cy + side])
    if crop_rows:
        rows = torch.tensor(crop_rows)
        boxes = torch.tensor(crop_boxes)
        boxes[:, 0] = torch.arange(len(crop_rows), dtype=torch.float32)
        x[rows] = roi_align(x[rows], boxes, output_size=(64, 64), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    flip = torch.rand(batch, generator=g) < 0.5
    x[flip] = x[flip].flip(3)
    blur = torch.rand(batch, generator=g) < 0.3
    if blur.any():
        xb = x[blur]
        x[blur] = 0.5 * xb + 0.5 * F.avg_pool2d(F.pad(xb, (1, 1, 1, 1), mode="replicate"), 3, 1)
    return x, torch.stack(toks), keys


def train_ranker(model, images, scene_objs, captions, steps, minutes, batch, g):
    import open_clip

    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=RANKER_CFG["model_cfg"]["text_cfg"]["context_length"])
    phrases = [f"{c} {s}" for c in scenes.COLOURS for s in scenes.SHAPES]
    phrase_index = {f"a {p}": i for i, p in enumerate(phrases)}
    phrase_tok = tokenizer([f"a {p}" for p in phrases])
    uniq = sorted(set(captions))
    uniq_tok = tokenizer(uniq)
    where = {c: i for i, c in enumerate(uniq)}
    full_tok = uniq_tok[[where[c] for c in captions]]

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    t0 = time.time()
    budget = minutes * 60
    step = 0
    model.train()
    while True:
        progress = max(step / steps, (time.time() - t0) / budget)
        if progress >= 1.0:
            break
        for pg in opt.param_groups:
            pg["lr"] = lr_at(progress, step, 1e-3, 100)
        x, tok, keys = ranker_batch(images, scene_objs, captions, full_tok, phrase_tok, phrase_index, batch, g)
        # soft targets: every pair with the same caption text is a positive
        kid = {k: j for j, k in enumerate(set(keys))}
        kv = torch.tensor([kid[k] for k in keys])
        same = (kv[:, None] == kv[None, :]).float()
        fi = F.normalize(model.encode_image(x), dim=-1)
        ft = F.normalize(model.encode_text(tok), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100)
        logits = scale * fi @ ft.t()
        tgt = same / same.sum(1, keepdim=True)
        loss = 0.5 * (-(tgt * logits.log_softmax(1)).sum(1).mean() - (tgt * logits.t().log_softmax(1)).sum(1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            log(f"ranker step {step} loss {loss.item():.4f} scale {scale.item():.1f} {step / (time.time() - t0):.2f} it/s")
    model.eval()
    log(f"ranker done: {step} steps in {time.time() - t0:.0f}s")
    return {"steps": step, "seconds": time.time() - t0}


@torch.no_grad()
def ranker_zero_shot(model, n=300):
    """Accuracy of picking the right one of 18 phrases for held-out single-object scenes."""
    import open_clip

    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=16)
    phrases = [f"a {c} {s}" for c in scenes.COLOURS for s in scenes.SHAPES]
    ft = F.normalize(model.encode_text(tokenizer(phrases)), dim=-1)
    sc = [scenes.make_scene(scenes.HELDOUT_SEED_START + 500_000 + i, n_objects=1) for i in range(n)]
    x = to_tensor(np.stack([s.image for s in sc]))
    fi = F.normalize(model.encode_image(x), dim=-1)
    pred = (fi @ ft.t()).argmax(1).tolist()
    return float(np.mean([phrases[p] == s.caption for p, s in zip(pred, sc)]))


def polish_phase(vae, args) -> dict:
    """Held-out reconstruction before, the decoder polish, held-out reconstruction after."""
    before = reconstruction_psnr(vae)
    log(f"before polish: {before}")
    rep = polish_decoder(vae, args.polish_steps, args.polish_minutes, args.polish_batch)
    rep.update(before=before, after=reconstruction_psnr(vae))
    log(f"after polish: {rep['after']}")
    return rep


# ----------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="assets")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=24000)
    # Lengths: each phase stops at its number of steps or its wall-clock cap, whichever comes
    # first (the caps add up to 56 min; with data, encoding, checks and the preview about 58 min on 2 cores).
    # On a busy machine the caps bind; for a bit-reproducible run give large --*-minutes.
    ap.add_argument("--vae-steps", type=int, default=4000)
    ap.add_argument("--unet-steps", type=int, default=20000)
    ap.add_argument("--clip-steps", type=int, default=1500)
    ap.add_argument("--polish-steps", type=int, default=3000)
    ap.add_argument("--vae-minutes", type=float, default=8.0)
    ap.add_argument("--polish-minutes", type=float, default=3.0)
    ap.add_argument("--unet-minutes", type=float, default=40.0)
    ap.add_argument("--clip-minutes", type=float, default=5.0)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--polish-batch", type=int, default=16)
    ap.add_argument("--unet-batch", type=int, default=64)
    ap.add_argument("--clip-batch", type=int, default=128)
    # 1 thread: on a shared 2-core machine, 2 OpenMP threads collapse when another process
    # is busy (measured: VAE step 0.26 it/s with 2 threads vs 1.0 it/s with 1 thread).
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-ranker", action="store_true")
    ap.add_argument("--vae-from", default=None, help="load a trained VAE folder instead of training one")
    ap.add_argument("--polish-only", action="store_true",
                    help="with --vae-from: polish its decoder, save <out>/demo/vae and stop (latents unchanged, "
                    "so a UNet trained on that VAE stays valid)")
    args = ap.parse_args()
    if args.polish_only and not args.vae_from:
        ap.error("--polish-only needs --vae-from")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    T0 = time.time()
    out = Path(args.out)
    report: dict = {"args": vars(args)}

    if args.polish_only:  # polish a trained VAE's decoder, save it, stop
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae_from).eval()
        report["vae"] = {"from": args.vae_from, "params": nparams(vae)}
        report["polish"] = polish_phase(vae, args)
        vae.save_pretrained(out / "demo" / "vae", safe_serialization=True)
        report["total_seconds"] = time.time() - T0
        (out / "demo" / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
        log(f"saved polished VAE to {out / 'demo' / 'vae'}")
        return

    # 1. data
    assert args.n_train <= scenes.TRAIN_SEED_END
    log(f"generating {args.n_train} training scenes")
    imgs, captions, scene_objs = [], [], []
    for s in range(args.n_train):
        sc = scenes.make_scene(s)
        imgs.append(sc.image)
        captions.append(sc.caption)
        scene_objs.append([(o.colour, o.shape, o.x0, o.y0, o.size) for o in sc.objects])
    x_train = to_tensor(np.stack(imgs))
    del imgs
    x_val = to_tensor(np.stack([scenes.make_scene(scenes.HELDOUT_SEED_START + i).image for i in range(256)]))
    log(f"data ready in {time.time() - T0:.0f}s")

    # 2. VAE
    if args.vae_from:  # reuse a trained VAE (its latents get standardised again below)
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae_from).eval()
        report["vae"] = {"from": args.vae_from, "params": nparams(vae)}
        log(f"VAE loaded from {args.vae_from}")
    else:
        vae = build_vae()
        log(f"VAE params {nparams(vae):,}")
        report["vae"] = train_vae(vae, x_train, x_val, args.vae_steps, args.vae_minutes, args.vae_batch, g)
        report["vae"]["params"] = nparams(vae)

    # 2b. decoder polish: encoder frozen, so the latents stay exactly what they were
    if args.polish_steps > 0 and args.polish_minutes > 0:
        report["polish"] = polish_phase(vae, args)

    # 3. latents of the training scenes, encoded once
    t = time.time()
    latents = encode_all(vae, x_train)
    ch_mean, ch_std = latents.mean((0, 2, 3)), latents.std((0, 2, 3))
    log(f"raw latent channel mean {ch_mean.tolist()} std {ch_std.tolist()}")
    standardize_latent_channels(vae, ch_mean, ch_std)
    latents = (latents - ch_mean[None, :, None, None]) / ch_std[None, :, None, None]
    std = latents.std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    latents = latents * vae.config.scaling_factor
    log(f"latents {tuple(latents.shape)} std {std:.4f} -> scaling_factor {vae.config.scaling_factor} ({time.time() - t:.0f}s)")
    report["latent_channel_mean_raw"] = ch_mean.tolist()
    report["latent_channel_std_raw"] = ch_std.tolist()
    report["latent_std"] = std

    # 4. UNet + text encoder
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(tokenizer)
    unet = build_unet()
    train_sched, infer_sched = build_schedulers()
    log(f"UNet params {nparams(unet):,}  text encoder params {nparams(text_encoder):,}")
    enc = tokenizer(captions, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt")
    ids = enc.input_ids
    empty_ids = tokenizer([""], padding="max_length", max_length=MAX_LEN, return_tensors="pt").input_ids[0]
    report["unet"] = train_unet(unet, text_encoder, latents, ids, empty_ids, args.unet_steps, args.unet_minutes, args.unet_batch, g, train_sched)
    report["unet"]["params"] = nparams(unet)
    report["text_encoder_params"] = nparams(text_encoder)

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=infer_sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    demo_dir = out / "demo"
    pipe.save_pretrained(demo_dir, safe_serialization=True)
    defaults = {"num_inference_steps": 20, "guidance_scale": 5.0, "num_candidates": 4, "blend_start": 0.0,
                "decoder_lr": 0.001, "core_steps": 0.5}  # measured best on held-out edits (docs/demo_model.md)
    if not (demo_dir / "blended.json").exists():
        (demo_dir / "blended.json").write_text(json.dumps(defaults, indent=2) + "\n")
    log(f"saved pipeline to {demo_dir}")

    # a quick look: one sample per phrase
    try:
        from PIL import Image

        phrases = [f"a {c} {s}" for c in scenes.COLOURS for s in scenes.SHAPES]
        gen = torch.Generator().manual_seed(1)
        res = pipe(phrases, height=64, width=64, num_inference_steps=20, guidance_scale=5.0, generator=gen, output_type="np").images
        sheet = np.concatenate([np.concatenate(list(res[r * 6 : r * 6 + 6]), axis=1) for r in range(3)], axis=0)
        Image.fromarray((sheet * 255).round().astype(np.uint8)).resize((6 * 128, 3 * 128), Image.NEAREST).save(out / "demo_samples_preview.png" if False else "/tmp/demo_samples.png")
        log("wrote /tmp/demo_samples.png")
    except Exception as e:  # a preview failure must not lose the run
        log("preview failed:", repr(e))

    # 5. ranker
    if not args.skip_ranker:
        import open_clip
        from safetensors.torch import save_file

        model = open_clip.CLIP(**RANKER_CFG["model_cfg"])
        log(f"ranker params {nparams(model):,}")
        report["ranker"] = train_ranker(model, x_train, scene_objs, captions, args.clip_steps, args.clip_minutes, args.clip_batch, g)
        report["ranker"]["params"] = nparams(model)
        report["ranker"]["zero_shot_acc_18way"] = ranker_zero_shot(model)
        log(f"ranker held-out 18-way zero-shot accuracy {report['ranker']['zero_shot_acc_18way']:.3f}")
        rdir = out / "demo_ranker"
        rdir.mkdir(parents=True, exist_ok=True)
        (rdir / "open_clip_config.json").write_text(json.dumps(RANKER_CFG, indent=2) + "\n")
        sd = {k: v.detach().to(torch.float16 if v.dtype == torch.float32 and k != "logit_scale" else v.dtype).contiguous() for k, v in model.state_dict().items()}
        save_file(sd, str(rdir / "open_clip_model.safetensors"))
        log(f"saved ranker to {rdir}")

    report["total_seconds"] = time.time() - T0
    log(f"total {report['total_seconds'] / 60:.1f} min")
    (out / "demo").mkdir(parents=True, exist_ok=True)
    (out / "demo" / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
