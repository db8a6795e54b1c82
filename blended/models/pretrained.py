"""diffusers folders and hub ids (`save_pretrained` layout), safetensors weights only; a preset's sources in turn."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ..errors import ModelLoadError
from .loaded import PRESET_NOTES, PRESETS, first_line, quiet_loading

INSTEAD = "pass --model a local diffusers folder or a .safetensors checkpoint instead"


def _from_pretrained(source: str, dtype: torch.dtype, local_files_only: Optional[bool]) -> Any:
    from diffusers import DiffusionPipeline

    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True}
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    with quiet_loading():  # the hub's retry chatter and per-file bars would bury our one-line message
        return DiffusionPipeline.from_pretrained(source, **kwargs)


def _reason(source: str, e: BaseException) -> str:
    """Why `source` did not load, in a few words."""
    reason = first_line(e)
    if not Path(source).is_dir() and any(w in reason.lower() for w in ("offline", "connect", "resolve", "cache",
                                                                       "not found")):
        reason = "not in the local cache and the hub cannot be reached"
    return reason


def load_pretrained(model: str, source: str, *, dtype: torch.dtype, local_files_only: Optional[bool] = None) -> Any:
    """The pipeline in the folder or hub repository `source` (`model` is what the user asked for)."""
    is_dir = Path(source).is_dir()
    if model in ("demo", "demo-fast") and not is_dir:
        raise ModelLoadError(f"the bundled {model} model is missing from {source}")
    if not is_dir and (source.startswith((".", "/", "~")) or source.count("/") != 1):
        raise ModelLoadError(f"model '{model}' is neither a preset ({', '.join(PRESETS)}), a folder, a .safetensors "
                             "file, nor a hub id")
    try:
        return _from_pretrained(source, dtype, local_files_only)
    except Exception as e:  # diffusers raises many kinds; the user needs one line
        where = "" if source == model else f" ({source})"
        raise ModelLoadError(f"could not load model '{model}'{where}: {_reason(source, e)}") from e


def load_preset(model: str, sources: Sequence[str], *, dtype: torch.dtype, local_files_only: Optional[bool] = None,
                check: Callable[[Any, str], Any] = lambda pipe, source: pipe) -> tuple[Any, str]:
    """(pipeline, source) from the first of a preset's `sources` (hub ids or folders) that loads and passes
    `check(pipe, source)` (which returns the pipeline to use or raises ModelLoadError). One ModelLoadError line
    names each source tried with why it failed, and what to pass instead."""
    tried = []
    for source in sources:
        is_dir = Path(source).is_dir()
        if not is_dir and (source.startswith((".", "/", "~")) or source.count("/") != 1):
            tried.append(f"{source} (no such folder)")
            continue
        try:
            return check(_from_pretrained(source, dtype, local_files_only), source), source
        except ModelLoadError as e:
            tried.append(f"{source} ({e})")
        except Exception as e:  # noqa: BLE001  (diffusers raises many kinds; the next source may load)
            tried.append(f"{source} ({_reason(source, e)})")
    note = f"; {PRESET_NOTES[model]}" if model in PRESET_NOTES else ""
    raise ModelLoadError(f"could not load preset '{model}': tried {'; '.join(tried)}{note}; {INSTEAD}")
