"""Train the bundled demo text segmenter (assets/demo_textseg/) from the demo ranker: one seeded script, CPU only.

    nice python -m tools.train_textseg --out assets/demo_textseg           # the bundled run: 2500 steps, 16 min here
    python -m tools.train_textseg --out /tmp/textseg --steps 20 --eval 32   # smoke test

A small `CLIPSegForImageSegmentation` (the transformers class the real CLIPSeg uses; 0.73 M parameters): a ViT of
64 px with 8 px patches, 4 layers, 128 wide; a 2-layer text tower 64 wide over the demo model's word-level tokenizer
(`assets/demo/tokenizer`); the decoder 48 wide over vision layers 1-3, FiLM at its first layer, one transposed
convolution back to 64 px. Both towers start from the demo ranker (`assets/demo_ranker`, an open_clip CLIP trained on
the same scenes: `from_ranker`), whose image and text embeddings are aligned as CLIPSeg's decoder expects; the
decoder's projections and FiLM are re-initialised (`build_model` says why). All of it learns (CLIPSeg's own forward
freezes the vision tower; `logits_of` writes it out with gradients), on demo scenes of one to three objects, 32
pictures a step with three phrases each (`blended_dev.textseg.training_scene`: seeds from TRAIN_TEXT_START): "the red
circle", "the circle", "the red one", or a colour and shape not there (an empty target). Loss: binary cross-entropy
plus soft Dice on the 64 x 64 logits; AdamW, a warm-up and a cosine over `--steps` or `--minutes`, whichever ends
first. Checked every `--eval-every` steps and at the end on tuning scenes (TUNE_TEXT_START, never the benchmark's)
with two and three objects: IoU of the heatmap at 0.5 with the named object, and how often another object is
covered more.

Writes <out>/: model.safetensors + config.json (save_pretrained, safetensors), tokenizer.json +
tokenizer_config.json + processor_config.json (CLIPSegProcessor.save_pretrained), train_report.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from blended_dev.textseg import TRAIN_TEXT_START, TUNE_TEXT_START, demo_processor, heldout_cases, training_scene
from blended_dev.training import log, lr_at, nparams

SIZE = 64  # the demo world's scenes; the processor resizes any picture to this
RANKER = Path(__file__).resolve().parents[1] / "assets" / "demo_ranker"  # its CLIP starts both towers


def build_model(vocab_size: int, seed: int):
    """The demo text segmenter's architecture: the demo ranker's ViT (64 px, 8 px patches, 4 layers, 128 wide, GELU),
    a 2-layer text tower 64 wide over the word-level tokenizer, the decoder 48 wide over layers 1-3 with FiLM at its
    first layer, one transposed convolution back to 64 px."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

    torch.manual_seed(seed)
    cfg = CLIPSegConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=2, eos_token_id=3,
                         pad_token_id=0, hidden_act="gelu"),
        vision_config=dict(image_size=SIZE, patch_size=8, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                           num_attention_heads=4, hidden_act="gelu"),
        projection_dim=64, reduce_dim=48, extract_layers=[1, 2, 3], decoder_num_attention_heads=4,
        decoder_intermediate_size=96, conditional_layer=0, use_complex_transposed_convolution=False)
    model = CLIPSegForImageSegmentation._from_config(cfg, attn_implementation="sdpa")
    # the config's initializer leaves the decoder's input projections, FiLM and output convolution at std 1: with
    # a conditional embedding of norm about 8, FiLM then scrambles the features so badly that the decoder learns to
    # ignore the words (heatmaps identical for every phrase). PyTorch's defaults, and FiLM starting as the identity:
    d = model.decoder
    for layer in (*d.reduces, d.transposed_convolution):
        layer.reset_parameters()
    for film, bias in ((d.film_mul, 1.0), (d.film_add, 0.0)):
        torch.nn.init.normal_(film.weight, std=0.02)
        torch.nn.init.constant_(film.bias, bias)
    return model


def blocks(sd: dict, prefix: str) -> dict:
    """open_clip transformer blocks `prefix`resblocks.i.* renamed to transformers' CLIP encoder.layers.i.*."""
    out, i = {}, 0
    while f"{prefix}resblocks.{i}.ln_1.weight" in sd:
        src, dst = f"{prefix}resblocks.{i}.", f"encoder.layers.{i}."
        width = sd[src + "attn.in_proj_weight"].shape[1]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{dst}self_attn.{name}.weight"] = sd[src + "attn.in_proj_weight"][j * width:(j + 1) * width]
            out[f"{dst}self_attn.{name}.bias"] = sd[src + "attn.in_proj_bias"][j * width:(j + 1) * width]
        for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            out.update({f"{dst}{ours}.weight": sd[f"{src}{theirs}.weight"], f"{dst}{ours}.bias": sd[f"{src}{theirs}.bias"]})
        i += 1
    return out


def from_ranker(model, tokenizer, folder: Path = RANKER) -> int:
    """Start both towers from the demo ranker (an open_clip CLIP trained on the same scenes by tools/train_demo.py):
    its image and text embeddings are aligned, which is what CLIPSeg's decoder builds on. The weights are renamed
    to transformers' CLIP layout; the text tower's token embeddings keep only the rows of the word-level tokenizer's
    words (CLIP BPE ids: each demo word is one token; unknown words start as "the"). Returns the tensors copied."""
    import open_clip
    from safetensors.torch import load_file

    sd = load_file(folder / "open_clip_model.safetensors")
    v = {k[len("visual."):]: t for k, t in sd.items() if k.startswith("visual.")}
    vision = {"embeddings.class_embedding": v["class_embedding"], "embeddings.patch_embedding.weight": v["conv1.weight"],
              "embeddings.position_embedding.weight": v["positional_embedding"], **blocks(v, "transformer.")}
    for ours, theirs in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        vision.update({f"{ours}.weight": v[f"{theirs}.weight"], f"{ours}.bias": v[f"{theirs}.bias"]})
    bpe = open_clip.get_tokenizer("ViT-B-32")
    special = {"<pad>": 0, "<bos>": 49406, "<eos>": 49407, "<unk>": int(bpe(["the"])[0][1])}
    rows = [special.get(w, int(bpe([w])[0][1])) for w, _ in sorted(tokenizer.get_vocab().items(), key=lambda x: x[1])]
    text = {"embeddings.token_embedding.weight": sd["token_embedding.weight"][rows],
            "embeddings.position_embedding.weight": sd["positional_embedding"],
            "final_layer_norm.weight": sd["ln_final.weight"], "final_layer_norm.bias": sd["ln_final.bias"],
            **blocks(sd, "transformer.")}
    for tower, weights in ((model.clip.vision_model, vision), (model.clip.text_model, text)):
        missing, unexpected = tower.load_state_dict(weights, strict=False)
        assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    model.clip.visual_projection.weight.data.copy_(v["proj"].T)
    model.clip.text_projection.weight.data.copy_(sd["text_projection"].T)
    return len(vision) + len(text) + 2


def batch(processor, seeds, k: int) -> tuple[dict, torch.Tensor]:
    """Model inputs for the training scenes `seeds` (B pictures, k phrases each, `training_scene`) and the targets
    (B * k, 64, 64), phrases grouped by picture."""
    scenes = [training_scene(int(s), k) for s in seeds]
    inputs = processor(text=[p for _, named in scenes for p, _ in named], images=[im for im, _ in scenes],
                       padding="max_length", return_tensors="pt")
    return dict(inputs), torch.from_numpy(np.stack([m for _, named in scenes for _, m in named])).float()


def logits_of(model, inputs: dict, k: int, train_vision: bool) -> torch.Tensor:
    """(B * k, 64, 64) logits: CLIPSeg's forward written out so each picture goes through the vision tower once for
    its k phrases. CLIPSeg's own forward keeps the vision tower frozen (torch.no_grad, as the paper does with CLIP);
    with `train_vision` it learns to localise too."""
    with contextlib.nullcontext() if train_vision else torch.no_grad():
        hidden = model.clip.vision_model(pixel_values=inputs["pixel_values"], output_hidden_states=True).hidden_states
    activations = [hidden[i + 1].repeat_interleave(k, 0) for i in model.extract_layers]
    cond = model.get_conditional_embeddings(batch_size=len(inputs["input_ids"]), input_ids=inputs["input_ids"],
                                            attention_mask=inputs["attention_mask"])
    return model.decoder(activations, cond).logits


def loss_of(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice (1 for an empty target predicted empty)."""
    p = torch.sigmoid(logits)
    inter = (p * target).flatten(1).sum(1)
    dice = 1 - (2 * inter + 1) / (p.flatten(1).sum(1) + target.flatten(1).sum(1) + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + dice.mean()


@torch.no_grad()
def evaluate(model, processor, n: int, threshold: float = 0.5) -> dict:
    """Mean IoU of the thresholded heatmap with the named object, and how often it covers another object more,
    on `n` tuning scenes each with two and with three objects."""
    model.eval()
    out = {}
    for k in (2, 3):
        cases = heldout_cases(n, k, start=TUNE_TEXT_START)
        inputs = processor(text=[c.phrase for c in cases], images=[c.image for c in cases], padding="max_length",
                           return_tensors="pt")
        heat = torch.sigmoid(model(**inputs).logits).numpy() >= threshold
        ious = [float((h & c.mask).sum() / max(1, (h | c.mask).sum())) for h, c in zip(heat, cases)]
        wrong = [any((h & o).sum() > (h & c.mask).sum() for o in c.others) for h, c in zip(heat, cases)]
        out[f"{k}_objects"] = {"iou": round(float(np.mean(ious)), 4), "wrong_object": round(float(np.mean(wrong)), 4)}
    model.train()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="assets/demo_textseg")
    ap.add_argument("--steps", type=int, default=2500, help="at most this many steps ...")
    ap.add_argument("--minutes", type=float, default=20.0, help="... and at most this many minutes of training (the "
                    "schedule follows whichever ends first, as tools/train_demo.py's phases do)")
    ap.add_argument("--batch", type=int, default=32, help="pictures per step ...")
    ap.add_argument("--phrases", type=int, default=3, help="... each with this many phrases")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scratch", action="store_true", help="start from random weights, not the demo ranker's")
    ap.add_argument("--frozen-vision", action="store_true", help="train the decoder and text tower only (CLIPSeg's "
                    "own recipe with a frozen CLIP); default: the vision tower learns too")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval", type=int, default=200, help="tuning scenes per object count at the end")
    ap.add_argument("--eval-every", type=int, default=250)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    processor = demo_processor(SIZE)
    model = build_model(len(processor.tokenizer), args.seed).train()
    if not args.scratch:
        log(f"both towers from {RANKER}: {from_ranker(model, processor.tokenizer)} tensors")
    log(f"text segmenter: {nparams(model):,} parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    t0, history, step = time.time(), [], 0
    while (progress := max(step / args.steps, (time.time() - t0) / (60 * args.minutes))) < 1:
        for g in opt.param_groups:
            g["lr"] = lr_at(progress, step, args.lr, 50)
        inputs, target = batch(processor, range(TRAIN_TEXT_START + step * args.batch,
                                                TRAIN_TEXT_START + (step + 1) * args.batch), args.phrases)
        loss = loss_of(logits_of(model, inputs, args.phrases, not args.frozen_vision), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append(loss.item())
        step += 1
        if step % 50 == 0:
            log(f"step {step}/{args.steps} loss {np.mean(history[-50:]):.4f} ({time.time() - t0:.0f} s)")
        if args.eval_every and step % args.eval_every == 0:
            log("tuning scenes:", evaluate(model, processor, 64))
    seconds = time.time() - t0
    result = evaluate(model, processor, args.eval)
    log("tuning scenes:", result)
    out = Path(args.out)
    model.eval().save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    report = {"command": "python -m tools.train_textseg " + " ".join(sys.argv[1:] if argv is None else argv), "args": vars(args),
              "params": nparams(model), "steps": step, "seconds": round(seconds, 1), "final_loss": round(float(np.mean(history[-50:])), 4),
              "tuning": result, "seeds": {"train_from": TRAIN_TEXT_START, "tuning_from": TUNE_TEXT_START}}
    (out / "train_report.json").write_text(json.dumps(report, indent=2))
    log(f"wrote {out} in {seconds:.0f} s of training")


if __name__ == "__main__":
    main()
