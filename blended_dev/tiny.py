"""Stable-Diffusion-shaped models built in-process with fixed seeds (no download): tiny ones for tests, the SD
graph at reduced widths for benchmarks."""

from __future__ import annotations

from pathlib import Path

import torch


def clip_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """Write OpenAI CLIP's BPE vocabulary (shipped inside open_clip) as vocab.json + merges.txt."""
    from blended.models.single_file import clip_bpe_files

    return clip_bpe_files(folder)


def clip_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    vocab, merges = clip_tokenizer_files(folder)
    return CLIPTokenizer(str(vocab), str(merges), model_max_length=77, pad_token="<|endoftext|>")


def _text_encoder(cls, hidden: int, act: str, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    kw = {"projection_dim": projection_dim} if projection_dim else {}
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act=act,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, **kw)
    return cls(cfg).eval()


def _vae(force_upcast: bool = False):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=8,
                         layers_per_block=1, sample_size=32, scaling_factor=0.5, force_upcast=force_upcast)


def build_pipeline(kind: str, folder: Path):
    """Build a tiny `kind` ('sd1', 'sd2', 'sdxl') pipeline with seed 0, save it to `folder`, return the folder.

    VAE: x4 downsampling, 4 latent channels; UNet: native 32 px (8x8 latents), cross attention.
    """
    from diffusers import (DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer = clip_tokenizer(folder / "_tok")
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type="v_prediction" if kind == "sd2" else "epsilon")
    unet_common = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
                       block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    if kind == "sd1":
        unet = UNet2DConditionModel(cross_attention_dim=32, attention_head_dim=8, **unet_common)
        te = _text_encoder(CLIPTextModel, 32, "quick_gelu")
        pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=te, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    elif kind == "sd2":
        unet = UNet2DConditionModel(cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True,
                                    **unet_common)
        te = _text_encoder(CLIPTextModel, 32, "gelu")
        pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=te, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    elif kind == "sdxl":
        unet = UNet2DConditionModel(cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
                                    addition_embed_type="text_time", addition_time_embed_dim=8,
                                    transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
                                    **unet_common)
        te = _text_encoder(CLIPTextModel, 32, "gelu")
        te2 = _text_encoder(CLIPTextModelWithProjection, 32, "gelu", projection_dim=32)
        pipe = StableDiffusionXLPipeline(vae=_vae(force_upcast=True), text_encoder=te, text_encoder_2=te2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    else:
        raise ValueError(kind)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def sd_components(width: float = 0.25, size: int = 512, seed: int = 0, tokenizer_dir: Path = Path("/tmp/blended-bench-tok")) -> dict:
    """The SD 1.5 graph (UNet 4 levels, 2 layers per block, cross attention at 3 levels; the SD VAE;
    a CLIP text encoder) with channel widths scaled by `width`, random weights with a fixed seed; the
    UNet's native resolution is `size` pixels (the engine edits at about that area)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    ch = [max(32, int(c * width) // 32 * 32) for c in (320, 640, 1280, 1280)]
    text_dim = max(64, int(768 * width) // 64 * 64)
    unet = UNet2DConditionModel(sample_size=size // 8, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=ch, cross_attention_dim=text_dim, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3).eval()
    vch = [max(32, int(c * width) // 32 * 32) for c in (128, 256, 512, 512)]
    vae = AutoencoderKL(block_out_channels=vch, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                        sample_size=512, scaling_factor=0.18215).eval()
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=text_dim, intermediate_size=4 * text_dim,
                                      num_hidden_layers=max(2, int(12 * width)), num_attention_heads=max(1, text_dim // 64),
                                      max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                                      pad_token_id=49407)).eval()
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    return dict(vae=vae, text_encoder=te, tokenizer=clip_tokenizer(tokenizer_dir), unet=unet, scheduler=sched)
