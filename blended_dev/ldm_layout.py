"""Test helper: diffusers state dicts -> the original (LDM / A1111) single-file layout.

diffusers ships only the forward converters (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint` in
diffusers/loaders/single_file_utils.py); these functions mirror them in reverse, so a tiny pipeline built in a
test can be written as the kind of `.safetensors` file people download. tests/test_single_file.py checks the
round trip through the forward converters tensor for tensor.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_SD1 = "cond_stage_model.transformer."
CLIP_SDXL_1 = "conditioner.embedders.0.transformer."

_UNET_DIRECT = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
                "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_DIRECT = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    head, tail = rest.split(".", 1)
    return f"{_RESNET[head]}.{tail}"


def unet_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict -> `model.diffusion_model.*` keys (no prefix added here)."""
    lpb = config["layers_per_block"]
    has_attn = {int(m.group(1)) for k in state if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for key, value in state.items():
        module, param = key.rsplit(".", 1)
        if module in _UNET_DIRECT:
            out[f"{_UNET_DIRECT[module]}.{param}"] = value
        elif m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            i = 1 + int(m.group(1)) * (lpb + 1) + int(m.group(3))
            out[f"input_blocks.{i}.0.{_resnet(m.group(4))}" if m.group(2) == "resnets"
                else f"input_blocks.{i}.1.{m.group(4)}"] = value
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            out[f"input_blocks.{1 + int(m.group(1)) * (lpb + 1) + lpb}.0.op.{m.group(2)}"] = value
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            out[f"middle_block.{2 * int(m.group(1))}.{_resnet(m.group(2))}"] = value
        elif m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
            out[f"middle_block.1.{m.group(1)}"] = value
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            i = int(m.group(1)) * (lpb + 1) + int(m.group(3))
            out[f"output_blocks.{i}.0.{_resnet(m.group(4))}" if m.group(2) == "resnets"
                else f"output_blocks.{i}.1.{m.group(4)}"] = value
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            b = int(m.group(1))
            out[f"output_blocks.{b * (lpb + 1) + lpb}.{2 if b in has_attn else 1}.conv.{m.group(2)}"] = value
        else:
            raise KeyError(f"no LDM name for UNet key {key}")
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict -> `first_stage_model.*` keys (no prefix added here)."""
    n_up = len(config["up_block_types"])
    out = {}
    for key, value in state.items():
        module, param = key.rsplit(".", 1)
        if module in _VAE_DIRECT:
            out[f"{_VAE_DIRECT[module]}.{param}"] = value
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
            part, rest = m.group(1), m.group(2)
            head = next(h for h in _VAE_ATTN if rest.startswith(h + "."))
            conv = value[:, :, None, None] if value.ndim == 2 else value  # LDM's attention uses 1x1 convs
            out[f"{part}.mid.attn_1.{_VAE_ATTN[head]}{rest[len(head):]}"] = conv
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            out[f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{m.group(3).replace('conv_shortcut', 'nin_shortcut')}"] = value
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            out[f"encoder.down.{m.group(1)}.block.{m.group(2)}.{m.group(3).replace('conv_shortcut', 'nin_shortcut')}"] = value
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            out[f"encoder.down.{m.group(1)}.downsample.conv.{m.group(2)}"] = value
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            b = n_up - 1 - int(m.group(1))
            out[f"decoder.up.{b}.block.{m.group(2)}.{m.group(3).replace('conv_shortcut', 'nin_shortcut')}"] = value
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            out[f"decoder.up.{n_up - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}"] = value
        else:  # conv_in, conv_out, quant_conv, post_quant_conv keep their names
            out[key] = value
    return out


def _text_model(key: str) -> str:
    """Original files name CLIP's weights `text_model.*` (transformers 5's state dict drops that level)."""
    return key if key.startswith("text_model.") else f"text_model.{key}"


_OPENCLIP = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
_OPENCLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def clip_to_openclip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIP text encoder -> OpenCLIP's layout (SD 2.x `cond_stage_model.model.`, SDXL's second
    encoder): q/k/v stacked into `in_proj`, `text_projection` transposed (the identity when there is none);
    the reverse of diffusers' `convert_open_clip_checkpoint`."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {_OPENCLIP[k]: v for k, v in state.items() if k in _OPENCLIP}
    hidden = state["final_layer_norm.weight"].shape[0]
    proj = state.get("text_projection.weight")
    out["text_projection"] = proj.T if proj is not None else torch.eye(hidden)
    for key, value in state.items():
        m = re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
        if not m:
            continue
        i, module, param = m.groups()
        if module == "self_attn.q_proj":
            qkv = [state[f"encoder.layers.{i}.self_attn.{p}_proj.{param}"] for p in "qkv"]
            out[f"transformer.resblocks.{i}.attn.in_proj_{param}"] = torch.cat(qkv)
        elif module in _OPENCLIP_LAYER:
            out[f"transformer.resblocks.{i}.{_OPENCLIP_LAYER[module]}.{param}"] = value
    return out


def write_single_file(pipe, path: Path, *, text_encoders: bool = True) -> Path:
    """Write `pipe` (SD 1.x, 2.x or SDXL components) as one original-layout `.safetensors` file.

    Text encoders as the family's files hold them: SD 1.x's CLIP under `cond_stage_model.transformer.`, SD 2.x's
    OpenCLIP under `cond_stage_model.model.`, SDXL's two under `conditioner.embedders.0.transformer.` and
    `conditioner.embedders.1.model.`; `text_encoders=False` writes the UNet and the VAE only.
    """
    from safetensors.torch import save_file

    state = {UNET + k: v for k, v in unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config).items()}
    state.update({VAE + k: v for k, v in vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config).items()})
    if text_encoders:
        clip = pipe.text_encoder.state_dict()
        if getattr(pipe, "text_encoder_2", None) is not None:
            state.update({CLIP_SDXL_1 + _text_model(k): v for k, v in clip.items()})
            state.update({"conditioner.embedders.1.model." + k: v
                          for k, v in clip_to_openclip(pipe.text_encoder_2.state_dict()).items()})
        elif pipe.unet.config.use_linear_projection:  # SD 2.x
            state.update({"cond_stage_model.model." + k: v for k, v in clip_to_openclip(clip).items()})
        else:
            state.update({CLIP_SD1 + _text_model(k): v for k, v in clip.items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path
