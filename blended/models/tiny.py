"""Tiny decoders (TAESD, diffusers' `AutoencoderTiny`): a conv-only decoder that turns the UNet's latents into
images at a fraction of the full VAE decoder's cost (EditConfig.decode, docs/hosting.md).

`decode` is "full" (the model's own VAE), "tiny" (the model folder's `vae_tiny/`, else the family's TAESD from
the hub: `madebyollin/taesd` for SD 1.x/2.x, `madebyollin/taesdxl` for SDXL) or a path: a folder saved by
`AutoencoderTiny.save_pretrained` or one .safetensors file (diffusers' key layout, or the original TAESD
decoder's). A user's file is untrusted: safetensors only, its header read before any tensor, the model built on
the meta device and checked against the file's keys and shapes before memory is given to it; any mismatch is
one `ModelLoadError` line, and nothing is kept."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import ModelLoadError

TINY_FOLDER = "vae_tiny"  # a model folder's own tiny decoder (the demo models bundle one)
TINY_SOURCES = {"sd": "madebyollin/taesd", "sdxl": "madebyollin/taesdxl"}  # per family, from the hub
MAX_TINY_BYTES = 256 * 2**20  # a tiny decoder is a few MB (TAESD: 10 MB); a larger file is not one
WEIGHTS = "diffusion_pytorch_model.safetensors"
_FULL_VAE_KEYS = re.compile(r"^(first_stage_model\.|vae\.)?(decoder\.(conv_in|up_blocks|up\.|mid)|encoder\.(down|conv_in))")
_ORIGINAL_KEY = re.compile(r"^(\d+)\.(.*)$")  # madebyollin's taesd_decoder: Sequential(Clamp, conv, ...)


def tiny_source(spec: str, model: Any) -> str:
    """What `decode` = `spec` loads for `model` (a LoadedModel): a folder, a file or a hub id."""
    if spec != "tiny":
        return spec
    own = Path(model.source) / TINY_FOLDER
    return str(own) if own.is_dir() else TINY_SOURCES.get(model.family, TINY_SOURCES["sd"])


def _family_named(text: str) -> Optional[str]:
    """"sdxl" or "sd" when a name or a modelspec says which family a tiny decoder is for, else None."""
    text = text.lower()
    if "taesdxl" in text or "sdxl" in text or "stable-diffusion-xl" in text:
        return "sdxl"
    if "taesd" in text or "stable-diffusion-v1" in text or "stable-diffusion-v2" in text:
        return "sd"
    return None


def _read_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """A safetensors file's (key -> shape, metadata), read from its header only."""
    from safetensors import safe_open

    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"decode: '{path.name}' is not a .safetensors file (pickled weights are never loaded)")
    if path.stat().st_size > MAX_TINY_BYTES:
        raise ModelLoadError(f"decode: '{path.name}' is {path.stat().st_size / 2**20:.0f} MB, too large for a tiny "
                             f"decoder (at most {MAX_TINY_BYTES // 2**20} MB)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: one line
        raise ModelLoadError(f"decode: '{path.name}' is not a readable safetensors file ({type(e).__name__})") from None


def _diffusers_keys(keys: dict[str, tuple[int, ...]], name: str) -> dict[str, str]:
    """file key -> AutoencoderTiny key: diffusers' own layout, or the original TAESD decoder's (`1.weight` ->
    `decoder.layers.0.weight`, its layer 0 being the clamp)."""
    full = sorted(k for k in keys if _FULL_VAE_KEYS.match(k))
    if full:
        raise ModelLoadError(f"decode: '{name}' is a full VAE (it has {full[0]}), not a tiny decoder "
                             "(AutoencoderTiny / TAESD); use decode 'full' or give the model's VAE with --vae")
    if keys and all(_ORIGINAL_KEY.match(k) for k in keys):
        return {k: f"decoder.layers.{int(m.group(1)) - 1}.{m.group(2)}" for k in keys
                for m in [_ORIGINAL_KEY.match(k)]}
    return {k: k for k in keys}


def _config_for(path: Path, keys: dict[str, tuple[int, ...]]) -> dict:
    """The AutoencoderTiny config of a folder (its config.json) or of a bare file (TAESD's own shapes, with the
    latent channels its first layer reads)."""
    if path.is_dir():
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            raise ModelLoadError(f"decode: '{path}' has no readable config.json") from None
        kind = config.get("_class_name", "?")
        if kind != "AutoencoderTiny":
            raise ModelLoadError(f"decode: '{path.name}' holds a {kind}, not a tiny decoder (AutoencoderTiny)"
                                 + (" - it is a full VAE" if kind == "AutoencoderKL" else ""))
        return config
    return _config_from_keys(keys)


def _config_from_keys(keys: dict[str, tuple[int, ...]]) -> dict:
    """A bare file's decoder config, read off its layers as DecoderTiny lays them out: a conv, an activation,
    then per level its blocks (`N.conv.0.weight`), an upsampling (no weights) and a conv. Upsampling is x2 per
    level, as in TAESD."""
    first = keys.get("decoder.layers.0.weight")
    if not first or len(first) != 4:
        return {}
    blocks, widths, count, j = [], [], 0, 2
    while j < 1000 and len(blocks) < 16:
        block, conv = keys.get(f"decoder.layers.{j}.conv.0.weight"), keys.get(f"decoder.layers.{j}.weight")
        if block is not None:
            count, width = count + 1, block[0]
        elif conv is not None and len(conv) == 4:
            blocks.append(count)
            widths.append(width if count else conv[1])
            count = 0
        elif not any(k.startswith(f"decoder.layers.{j}.") for k in keys) and j > max(_indices(keys)):
            break
        j += 1
    if not blocks:
        return {"latent_channels": first[1]}
    return {"latent_channels": first[1], "decoder_block_out_channels": widths, "num_decoder_blocks": blocks,
            "encoder_block_out_channels": widths, "num_encoder_blocks": blocks}


def _indices(keys: dict[str, tuple[int, ...]]) -> list[int]:
    return [int(k.split(".")[2]) for k in keys if k.startswith("decoder.layers.") and k.split(".")[2].isdigit()] or [0]


def _check_fits(config: dict, model: Any, name: str, family: Optional[str]) -> None:
    """Refuse a tiny decoder that cannot decode `model`'s latents: channels, upsampling, family."""
    channels = int(config.get("latent_channels", 4))
    if channels != model.latent_channels:
        raise ModelLoadError(f"decode: '{name}' reads {channels} latent channels; the model's VAE has "
                             f"{model.latent_channels}")
    blocks = config.get("decoder_block_out_channels", (64, 64, 64, 64))
    factor = int(config.get("upsampling_scaling_factor", 2)) ** (len(blocks) - 1)
    if factor != model.vae_scale_factor:
        raise ModelLoadError(f"decode: '{name}' upsamples {factor}x; the model's VAE decodes {model.vae_scale_factor}x")
    if family is not None and family != model.family:
        wanted = "SDXL" if model.family == "sdxl" else "SD 1.x/2.x"
        raise ModelLoadError(f"decode: '{name}' is a tiny decoder for {'SDXL' if family == 'sdxl' else 'SD 1.x/2.x'}"
                             f"; this model is {wanted} ({TINY_SOURCES[model.family]} fits it)")


def _build(config: dict, state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], name: str):
    """An AutoencoderTiny from `config`, checked on the meta device against the file's keys and shapes, then
    given `state`. The encoder may be absent from the file (decoders only ship it sometimes): it stays unused."""
    from diffusers import AutoencoderTiny

    from .loaded import quiet_loading

    known = {k: v for k, v in config.items() if not k.startswith("_") and k != "block_out_channels"}
    try:
        with torch.device("meta"), quiet_loading():
            tiny = AutoencoderTiny.from_config(known)
    except Exception as e:  # noqa: BLE001 - a config that diffusers cannot build: one line
        raise ModelLoadError(f"decode: '{name}' has a config AutoencoderTiny cannot build ({type(e).__name__})") from None
    want = {k: tuple(v.shape) for k, v in tiny.state_dict().items() if k.startswith("decoder.")}
    missing = sorted(set(want) - set(shapes))
    extra = sorted(k for k in shapes if k not in want and not k.startswith("encoder."))
    wrong = sorted(k for k in want if k in shapes and shapes[k] != want[k])
    if missing or extra or wrong:
        what = (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}" if extra else
                f"{wrong[0]} is {list(shapes[wrong[0]])}, expected {list(want[wrong[0]])}")
        count = len(missing) + len(extra) + len(wrong)
        raise ModelLoadError(f"decode: '{name}' does not fit a tiny decoder: {what}"
                             + (f" (and {count - 1} more)" if count > 1 else ""))
    tiny = tiny.to_empty(device="cpu")
    tiny.load_state_dict({k: v for k, v in state.items() if k.startswith("decoder.")}, strict=False)
    return tiny.eval().requires_grad_(False)


def load_tiny_decoder(spec: str, model: Any, *, local_files_only: Optional[bool] = None):
    """The AutoencoderTiny that `decode` = `spec` names for `model`, on the model's device; `ModelLoadError` (one
    line naming the mismatch) for anything that is not a tiny decoder fitting the model."""
    from safetensors.torch import load_file

    source = tiny_source(spec, model)
    path = Path(source).expanduser()
    if not path.exists():
        if spec != "tiny":
            raise ModelLoadError(f"decode: no file or folder '{spec}' (use full, tiny or a path)")
        return _from_hub(source, model, local_files_only)
    weights = path / WEIGHTS if path.is_dir() else path
    config = _config_for(path, {}) if path.is_dir() else None  # a folder's class is checked before its weights
    if path.is_dir() and not weights.is_file():
        others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
        raise ModelLoadError(f"decode: '{path.name}' has no {WEIGHTS}"
                             + (f" (only {others[0]}: pickled weights are never loaded)" if others else ""))
    shapes, metadata = _read_header(weights)
    names = _diffusers_keys(shapes, path.name)
    shapes = {names[k]: v for k, v in shapes.items()}
    config = config if config is not None else _config_for(path, shapes)
    family = _family_named(metadata.get("modelspec.architecture", "")) or _family_named(
        str(config.get("_name_or_path", ""))) or _family_named(path.name)
    _check_fits(config, model, path.name, family)
    state = {names[k]: v for k, v in load_file(str(weights)).items()}
    return _placed(_build(config, state, shapes, path.name), model)


def _from_hub(repo: str, model: Any, local_files_only: Optional[bool]):
    """The family's TAESD from the hub (or its local cache), as any model is fetched."""
    from diffusers import AutoencoderTiny

    from .loaded import first_line, quiet_loading

    kwargs = {} if local_files_only is None else {"local_files_only": local_files_only}
    try:
        with quiet_loading(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tiny = AutoencoderTiny.from_pretrained(repo, use_safetensors=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - unreachable hub, no cache: one line
        raise ModelLoadError(f"decode: the tiny decoder '{repo}' could not be loaded ({first_line(e)}); use "
                             "decode 'full' or a local folder") from None
    _check_fits(dict(tiny.config), model, repo, _family_named(repo))
    return _placed(tiny.eval().requires_grad_(False), model)


def _placed(tiny: Any, model: Any) -> Any:
    """On the model's device, in its dtype (TAESD runs in fp16 where the full SDXL VAE needs fp32)."""
    from .loaded import quiet_loading

    with quiet_loading():  # diffusers warns on any dtype cast of a model without fp32-only modules
        return tiny.to(model.device) if model.dtype == torch.float32 else tiny.to(model.device, model.dtype)
