"""Single-file checkpoints (`.safetensors` in the original LDM / A1111 layout) for SD 1.x, 2.x and SDXL, offline.

diffusers' `from_single_file` converts the weights; it needs a diffusers folder of configs (`config=`), which
it would otherwise download. The configs of each family ship in `configs/<family>/` (JSON only, about 8 KB);
the CLIP tokenizers' vocabulary is written at first use from the BPE file inside open_clip (already a
dependency) into a cache folder, with the UNet's input channels set for inpainting files.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import ModelLoadError
from .detect import CheckpointInfo, inspect
from .loaded import first_line, quiet_loading

CONFIGS = Path(__file__).resolve().parent / "configs"
CONFIG_VERSION = 1  # bump when a bundled config changes, so cached folders are rebuilt


def cache_dir() -> Path:
    """Where built config folders go: $BLENDED_CACHE, else ~/.cache/blended."""
    return Path(os.environ.get("BLENDED_CACHE") or Path.home() / ".cache" / "blended")


def clip_bpe_files(folder: Path) -> tuple[Path, Path]:
    """Write OpenAI CLIP's BPE vocabulary (shipped inside open_clip) as vocab.json + merges.txt in `folder`."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode

    lines = gzip.open(open_clip.tokenizer.default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1: 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder / "vocab.json", folder / "merges.txt"


def config_folder(family: str, in_channels: int = 4) -> Path:
    """A diffusers folder of configs (no weights) for `family`, built once in the cache."""
    target = cache_dir() / "configs" / f"{family}-{in_channels}ch-v{CONFIG_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    shutil.copytree(CONFIGS / family, tmp, dirs_exist_ok=True)
    unet = tmp / "unet" / "config.json"
    unet.write_text(json.dumps({**json.loads(unet.read_text()), "in_channels": in_channels}, indent=1))
    for tok in tmp.glob("tokenizer*"):
        clip_bpe_files(tok)
    try:
        tmp.rename(target)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_single_file(path: Path, *, dtype: torch.dtype, config: Optional[str] = None,
                     components: Optional[dict[str, Any]] = None) -> tuple[Any, CheckpointInfo]:
    """(pipeline, what the file holds) for an original-layout `.safetensors` checkpoint, without the network.

    Args:
        path: the file.
        dtype: weights' dtype.
        config: a diffusers folder whose configs fit the file (default: the bundled configs of its family).
        components: modules the file lacks, passed to the pipeline as they are (e.g. `text_encoder_2`).
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    info = inspect(path)
    components = dict(components or {})
    cls = StableDiffusionXLPipeline if info.family == "sdxl" else StableDiffusionPipeline
    needed = ("text_encoder", "text_encoder_2") if info.family == "sdxl" else ("text_encoder",)
    if not info.text_encoders and not all(n in components for n in needed):
        raise ModelLoadError(f"model {path.name} ({info.family}) holds no text encoder weights; use a full "
                             "checkpoint (UNet, VAE and text encoders in one file)")
    if not info.vae and "vae" not in components:
        raise ModelLoadError(f"model {path.name} ({info.family}) holds no VAE weights; add a VAE folder with --vae")
    folder = str(config) if config else str(config_folder(info.family, info.in_channels))
    if cls is StableDiffusionPipeline:
        components.setdefault("safety_checker", None)
        components.setdefault("requires_safety_checker", False)
    try:
        with quiet_loading():
            pipe = cls.from_single_file(str(path), config=folder, local_files_only=True, torch_dtype=dtype,
                                        **components)
    except Exception as e:  # shape mismatches, missing keys, broken tensors: one line for the user
        raise ModelLoadError(f"could not load model {path.name} as {info.family}: {first_line(e)}") from e
    return pipe, info
