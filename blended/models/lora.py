"""LoRAs (diffusers or kohya / A1111 format) applied at load time through diffusers' peft backend.

A LoRA is part of a model load, never of an edit: `load_model(..., loras=[LoraSpec(...)])` builds a fresh
pipeline and adds the adapters to it before anyone edits with it. One loaded model serves many users at once
(STYLE.md principle 4), and peft adapters live inside the UNet's modules, so switching them per edit would
change the weights under another user's running edit. The app's LoRA picker therefore loads a new model and
swaps it in once it is ready; edits that are running finish on the model they started with (docs/models.md).
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import InputError, ModelLoadError
from .detect import read_header
from .loaded import first_line, quiet_loading


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA file with its weight (the scale of its low-rank update; 0 = the base model exactly)."""

    path: str
    weight: float = 1.0
    sha256: str = ""  # of the file's bytes, filled in when it is applied


def parse_lora(text: str) -> LoraSpec:
    """'FILE' or 'FILE:WEIGHT' (the part after the last ':' when it is a number) -> LoraSpec."""
    path, weight = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
            path = head
        except ValueError:
            pass
    if not path.strip():
        raise InputError(f"--lora '{text}': give a file, optionally with :WEIGHT")
    if not -10.0 <= weight <= 10.0:
        raise InputError(f"--lora '{text}': the weight must be between -10 and 10")
    return LoraSpec(path=path, weight=weight)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _adapted(pipe: Any, name: str) -> int:
    """How many modules of the pipeline carry the adapter `name`."""
    count = 0
    for part in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, part, None)
        if module is not None:
            count += sum(name in getattr(m, "lora_A", {}) for m in module.modules())
    return count


def apply_loras(pipe: Any, loras: Sequence[LoraSpec | str]) -> tuple[LoraSpec, ...]:
    """Add every LoRA to `pipe` as its own peft adapter with its weight; return the specs with their digests."""
    specs = [parse_lora(l) if isinstance(l, str) else l for l in loras]
    if not specs:
        return ()
    from diffusers.utils import USE_PEFT_BACKEND

    if not USE_PEFT_BACKEND:
        raise ModelLoadError("LoRAs need the peft package (pip install 'peft>=0.17')")
    names, done = [], []
    for i, spec in enumerate(specs):
        path = Path(spec.path).expanduser()
        read_header(path, "LoRA")  # pickles refused; truncated or foreign files get their one line
        name = f"lora{i}"
        try:
            with quiet_loading(50), warnings.catch_warnings():  # a mismatch is logged line by line before it is
                # raised (the one line below says it); peft warns at every adapter after the first, which is the point
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                pipe.load_lora_weights(str(path), adapter_name=name)
        except Exception as e:  # size mismatches (another architecture), unknown key formats
            reason = "its layer shapes differ from this model's" if "size mismatch" in str(e) else first_line(e)
            raise ModelLoadError(f"LoRA {path.name} does not fit this model (made for another architecture, "
                                 f"e.g. SDXL vs SD 1.x?): {reason[:200]}") from e
        if _adapted(pipe, name) == 0:
            raise ModelLoadError(f"LoRA {path.name} changes none of this model's layers (made for another "
                                 "architecture?)")
        names.append(name)
        done.append(LoraSpec(path=str(path), weight=spec.weight, sha256=_digest(path)))
    pipe.set_adapters(names, adapter_weights=[s.weight for s in done])
    return tuple(done)
