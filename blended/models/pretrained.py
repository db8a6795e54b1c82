"""diffusers folders and hub ids (`save_pretrained` layout), safetensors weights only."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import ModelLoadError
from .loaded import PRESETS, first_line, quiet_loading


def load_pretrained(model: str, source: str, *, dtype: torch.dtype, local_files_only: Optional[bool] = None) -> Any:
    """The pipeline in the folder or hub repository `source` (`model` is what the user asked for)."""
    from diffusers import DiffusionPipeline

    is_dir = Path(source).is_dir()
    if model == "demo" and not is_dir:
        raise ModelLoadError(f"the bundled demo model is missing from {source}")
    if not is_dir and (source.startswith((".", "/", "~")) or source.count("/") != 1):
        raise ModelLoadError(f"model '{model}' is neither a preset ({', '.join(PRESETS)}), a folder, a .safetensors "
                             "file, nor a hub id")
    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True}
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    try:
        with quiet_loading():  # the hub's retry chatter and per-file bars would bury our one-line message
            return DiffusionPipeline.from_pretrained(source, **kwargs)
    except Exception as e:  # diffusers raises many kinds; the user needs one line
        reason = first_line(e)
        if not is_dir and any(w in reason.lower() for w in ("offline", "connect", "resolve", "cache", "not found")):
            reason = "not in the local cache and the hub cannot be reached"
        where = "" if source == model else f" ({source})"
        raise ModelLoadError(f"could not load model '{model}'{where}: {reason}") from e
