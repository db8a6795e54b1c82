"""What a `.safetensors` file holds, read from its header alone: family, UNet channels, which parts are there.

diffusers' own probe (`infer_diffusers_model_type`) compares full-size shapes, so small or unusual files all
read as SD 1.x; this one looks at key prefixes and at shapes that do not depend on width: SDXL's UNet has an
added-conditions embedding (`label_emb`), SD 2.x projects into its transformers with linear layers (2-D
`proj_in` weights) where SD 1.x uses 1x1 convolutions (4-D), and the first convolution's input channels tell
a text-to-image UNet (4) from an inpainting one (9). Before guessing, Stability's model-spec metadata is read
from the header's `__metadata__` (`modelspec.architecture`, `modelspec.prediction_type`; github.com/Stability-AI/
ModelSpec) where a file carries it. Nothing from the file is executed or even loaded here.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import ModelLoadError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
UNET = "model.diffusion_model."
MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
FAMILIES = ("sd1", "sd2", "sdxl")
# modelspec.architecture -> (family, the prediction type the architecture implies, None = the family's default)
MODELSPEC_ARCHITECTURES = {"stable-diffusion-v1": ("sd1", None), "stable-diffusion-v2-512": ("sd2", "epsilon"),
                           "stable-diffusion-v2-768-v": ("sd2", "v_prediction"),
                           "stable-diffusion-xl-v1-base": ("sdxl", None)}
MODELSPEC_PREDICTION = {"epsilon": "epsilon", "eps": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction",
                        "v-prediction": "v_prediction"}


@dataclass(frozen=True)
class CheckpointInfo:
    """A single-file Stable Diffusion checkpoint, as its header describes it."""

    family: str  # one of FAMILIES
    in_channels: int  # 4: text-to-image; 9: inpainting (latents, mask, masked-source latents)
    text_encoders: bool  # the file holds its text encoder(s)
    vae: bool  # the file holds its VAE (first_stage_model.*)
    prediction_type: Optional[str] = None  # "epsilon" / "v_prediction" where the file's modelspec says; None: unknown
    architecture: str = ""  # the file's modelspec.architecture, "" when it has none (the family came from its keys)


def refuse_pickle(path: Path, what: str = "model") -> None:
    """Raise for a pickle checkpoint: loading one can run any code it carries."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"{what} {path.name}: '{path.suffix}' files are Python pickles, which can run code when loaded; blended "
            "reads .safetensors only. Convert it once where you trust it (e.g. `safetensors.torch.save_file(torch.load("
            "f, weights_only=True)['state_dict'], 'model.safetensors')`) or download the .safetensors version")


def read_header(path: Path, what: str = "model") -> dict[str, list[int]]:
    """Tensor name -> shape, from the file's JSON header; one-line ModelLoadError if it is not a whole safetensors file."""
    return read_header_and_metadata(path, what)[0]


def read_header_and_metadata(path: Path, what: str = "model") -> tuple[dict[str, list[int]], dict[str, str]]:
    """(tensor name -> shape, the header's `__metadata__` string pairs) from the file's JSON header alone (at most
    MAX_HEADER bytes, never past the file's end); one-line ModelLoadError if it is not a whole safetensors file."""
    path = Path(path)
    refuse_pickle(path, what)
    if not path.exists():
        raise ModelLoadError(f"{what} file {path} does not exist")
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{what} {path.name}: expected a .safetensors file (or a diffusers folder)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or n > min(MAX_HEADER, size - 8):
            raise ModelLoadError(f"{what} {path.name} is not a safetensors file ({size} bytes; no header): "
                                 "another format renamed, or cut off early")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ModelLoadError(f"{what} {path.name} is not a safetensors file (its header is not JSON)") from None
    shapes, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            shapes[name] = list(entry["shape"])
            end = max(end, int(entry["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise ModelLoadError(f"{what} {path.name}: broken header entry for '{name}'") from None
    if 8 + n + end > size:
        raise ModelLoadError(f"{what} {path.name} is truncated: {size} of {8 + n + end} bytes (download it again)")
    if not shapes:
        raise ModelLoadError(f"{what} {path.name} holds no tensors")
    meta = header.get("__metadata__")
    meta = {k: v for k, v in meta.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(meta, dict) else {}
    return shapes, meta


def modelspec(metadata: dict[str, str], name: str = "model") -> tuple[Optional[str], Optional[str], str]:
    """(family or None, prediction type or None, architecture) from Stability's model-spec keys; None where the
    file does not say (or names an architecture not listed here: its keys decide). One-line ModelLoadError for an
    architecture that is not a checkpoint blended edits with (a LoRA, an embedding, a refiner)."""
    arch = metadata.get("modelspec.architecture", "").strip()
    base, _, adapter = arch.lower().partition("/")
    if adapter or base.endswith(("-lora", "-textual-inversion")):
        what = "a LoRA: pass it with --lora" if "lora" in arch.lower() else "an adapter (textual inversion, ...)"
        raise ModelLoadError(f"{name} is {arch[:80]!r} by its modelspec.architecture: {what}")
    if base.endswith("-refiner"):
        raise ModelLoadError(f"{name} is an SDXL refiner (modelspec.architecture); blended edits with the SDXL base model")
    family, implied = MODELSPEC_ARCHITECTURES.get(base, (None, None))
    stated = metadata.get("modelspec.prediction_type", "").strip().lower()
    return family, MODELSPEC_PREDICTION.get(stated, implied), arch[:200]


def kind_of(keys: list[str]) -> str:
    """'checkpoint', 'lora', 'vae', 'diffusers-unet', 'sd3', 'flux' or 'other', from tensor names alone."""
    if any(k.startswith(UNET + "input_blocks.") for k in keys):
        return "checkpoint"
    if any(".lora_" in k or k.startswith(("lora_unet_", "lora_te")) or "lora_A" in k for k in keys):
        return "lora"
    if any(k.startswith(("encoder.", "decoder.", "first_stage_model.", "vae.")) for k in keys):
        return "vae"
    if any(k.startswith(("down_blocks.", "conv_in.")) for k in keys):
        return "diffusers-unet"
    if any(".joint_blocks." in k for k in keys):
        return "sd3"
    if any(k.startswith(("double_blocks.", UNET + "double_blocks.")) for k in keys):
        return "flux"
    return "other"


WHAT_ELSE = {"lora": "a LoRA: pass it with --lora (the app's LoRA picker)", "vae": "a VAE: pass it with --vae",
             "diffusers-unet": "a UNet in diffusers' layout alone: point --model at its diffusers folder",
             "sd3": "Stable Diffusion 3, which blended does not run", "flux": "a Flux model, which blended does not run",
             "other": "not a Stable Diffusion checkpoint"}


def detect(shapes: dict[str, list[int]], name: str = "model", metadata: Optional[dict[str, str]] = None) -> CheckpointInfo:
    """The family and parts of an original-layout (LDM / A1111) checkpoint; one-line ModelLoadError otherwise. The
    family and prediction type come from the file's modelspec metadata where it has them, else from its keys."""
    spec_family, prediction, arch = modelspec(metadata or {}, name)
    keys = list(shapes)
    conv_in = shapes.get(UNET + "input_blocks.0.0.weight")
    if conv_in is None:
        raise ModelLoadError(f"{name} has no Stable Diffusion UNet (model.diffusion_model.*): "
                             f"{WHAT_ELSE.get(kind_of(keys), WHAT_ELSE['other'])}")
    latent = shapes.get(UNET + "out.2.weight", [conv_in[1]])[0]
    in_channels = conv_in[1]
    if in_channels not in (latent, 2 * latent + 1):
        raise ModelLoadError(f"{name} has a {in_channels}-channel UNet; blended runs text-to-image ({latent}) and "
                             f"inpainting ({2 * latent + 1}) UNets (depth or instruct-pix2pix models are other tasks)")
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys) and \
            not any(k.startswith("conditioner.embedders.1.") for k in keys):
        raise ModelLoadError(f"{name} is an SDXL refiner; blended edits with the SDXL base model")
    if spec_family is not None:
        family = spec_family
    elif UNET + "label_emb.0.0.weight" in shapes or any(k.startswith("conditioner.embedders.1.") for k in keys):
        family = "sdxl"
    elif any(k.startswith("cond_stage_model.model.") for k in keys) or \
            any(k.startswith(UNET) and k.endswith("proj_in.weight") and len(s) == 2 for k, s in shapes.items()):
        family = "sd2"
    else:
        family = "sd1"
    text = {"sd1": ("cond_stage_model.transformer.",), "sd2": ("cond_stage_model.model.",),
            "sdxl": ("conditioner.embedders.0.", "conditioner.embedders.1.")}[family]
    has_text = all(any(k.startswith(p) for k in keys) for p in text)
    has_vae = any(k.startswith("first_stage_model.") for k in keys)
    return CheckpointInfo(family=family, in_channels=in_channels, text_encoders=has_text, vae=has_vae,
                          prediction_type=prediction, architecture=arch)


def inspect(path: str | Path) -> CheckpointInfo:
    """`detect` on the file's header and metadata (one read of the header)."""
    path = Path(path)
    shapes, metadata = read_header_and_metadata(path)
    return detect(shapes, f"model {path.name}", metadata)
