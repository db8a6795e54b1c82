"""A VAE of one's own (`--vae FOLDER|FILE`) in place of the checkpoint's.

A diffusers folder brings its own config: `scaling_factor` (SD 0.18215, SDXL 0.13025) and `force_upcast`
(False for the SDXL fp16-fix VAE, which then runs in fp16). A single `.safetensors` file (original layout,
`first_stage_model.*` or bare `encoder.*`/`decoder.*`, or diffusers' layout) has no config: it takes the
loaded checkpoint's VAE config, so its weights must fit that architecture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError
from .detect import read_header
from .loaded import first_line, quiet_loading


def load_vae(spec: str, pipe: Any, dtype: torch.dtype) -> Any:
    """An AutoencoderKL from a diffusers folder (or a pipeline folder's `vae/`) or a `.safetensors` file."""
    from diffusers import AutoencoderKL

    path = Path(spec).expanduser()
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"VAE folder {path} has no config.json (a diffusers AutoencoderKL folder)")
        try:
            with quiet_loading():
                return AutoencoderKL.from_pretrained(str(folder), torch_dtype=dtype, use_safetensors=True)
        except Exception as e:
            raise ModelLoadError(f"could not load the VAE in {path}: {first_line(e)}") from e
    shapes = read_header(path, "VAE")
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import load_file

    keys = list(shapes)
    if any(k.startswith("model.diffusion_model.") for k in keys):
        raise ModelLoadError(f"VAE {path.name} is a whole checkpoint; pass it with --model")
    state = load_file(str(path))
    config = dict(pipe.vae.config)
    if any(".down_blocks." in k or ".up_blocks." in k for k in keys):  # diffusers layout
        state = {k.removeprefix("vae."): v for k, v in state.items()}
    else:  # original layout: convert_ldm_vae_checkpoint strips `first_stage_model.` itself
        state = convert_ldm_vae_checkpoint(state, config)
    vae = AutoencoderKL.from_config(config)
    try:
        missing, unexpected = vae.load_state_dict(state, strict=False)
    except RuntimeError:  # size mismatches
        raise ModelLoadError(f"VAE {path.name} does not fit this model's VAE: its tensor shapes differ "
                             "(a VAE of another family or size?)") from None
    if missing or unexpected:
        raise ModelLoadError(f"VAE {path.name} does not fit this model's VAE: {len(missing)} tensors missing, "
                             f"{len(unexpected)} unexpected (e.g. '{(missing or unexpected)[0]}')")
    return vae.to(dtype)
