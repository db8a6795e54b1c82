"""Few-step models (LCM, TCD, SD-Turbo): the settings they need, read off a loaded checkpoint or a LoRA file.

A few-step model edits in 1 to 8 steps without classifier-free guidance, but only with its own scheduler
and guidance; at the defaults of a 50-step model (DDIM, guidance 7.5) it gives noise or burnt colours.
These functions return `EditConfig` overrides; a model folder's `blended.json` still wins over them. Besides
the scheduler, steps and guidance they set decoder fine-tuning's fast recipe (`FAST_DECODER`), so that
"Preserve faces and text" stays about twice the edit instead of five times.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .errors import InputError

# "Preserve faces and text" (`--background decoder`) at few-step speed: the last up block only, a rate decaying
# linearly from 2e-3 over 100 steps, no early stop (with the default band loss). On the SD 1.5 graph: 1.8x a 4-step
# edit and 41.9 dB outside, against 5.2x and 43.6 dB for the 75-step default (docs/fewstep.md, bench/decoder_fast.py)
FAST_DECODER = {"decoder_blocks": 1, "decoder_schedule": "linear", "decoder_lr": 2e-3, "decoder_steps": 100,
                "decoder_patience": 0}
# candidates counted by the second: on 60 held-out demo edits, 4 LCM steps x 8 candidates reach a top-1 of 0.87 against
# 0.93 for the 20-step model's 4 candidates, in 0.33x its time (x4: 0.73); docs/bench/candidates.md
FEW_STEP_CANDIDATES = {"num_candidates": 8}
LCM = {"scheduler": "lcm", "num_inference_steps": 4, "guidance_scale": 1.0, **FAST_DECODER, **FEW_STEP_CANDIDATES}  # LCM-LoRA: 2-8 steps, guidance 1-2
TCD = {"scheduler": "tcd", "num_inference_steps": 4, "guidance_scale": 1.0, **FAST_DECODER, **FEW_STEP_CANDIDATES}  # TCD-LoRA: 2-8 steps
TURBO = {"scheduler": "euler-a", "num_inference_steps": 4, "guidance_scale": 0.0, **FAST_DECODER, **FEW_STEP_CANDIDATES}  # SD/SDXL-Turbo: 1-4 steps
DISTILLED_UNET = {"scheduler": "lcm", "num_inference_steps": 4, **FAST_DECODER, **FEW_STEP_CANDIDATES}  # a guidance embedding: keeps its scale

_STEPS = re.compile(r"(?<![0-9])([1-8])[-_ ]?steps?(?![a-z])")  # "4step", "8-steps", "2_step"


def _family(text: str) -> dict[str, Any]:
    text = text.lower()
    if "tcd" in text:
        return dict(TCD)
    if re.search(r"(?<![a-z])lcm|latent[-_ ]?consistency", text):
        return dict(LCM)
    if "turbo" in text:
        return dict(TURBO)
    return {}


def recommended_for_model(source: str, pipe: Any) -> dict[str, Any]:
    """Settings a loaded checkpoint needs to edit in few steps: from its scheduler class (LCM, TCD), its UNet's
    guidance embedding (`time_cond_proj_dim`, LCM-distilled) or its hub id (`*turbo*`); {} for other models."""
    kind = type(getattr(pipe, "scheduler", None)).__name__
    if kind == "LCMScheduler":
        rec = dict(LCM)
    elif kind == "TCDScheduler":
        rec = dict(TCD)
    else:
        rec = _family(Path(str(source)).name)
    if getattr(pipe.unet.config, "time_cond_proj_dim", None) is not None:
        rec.update(DISTILLED_UNET)  # the scale feeds its embedding: the EditConfig default (7.5) stays
        rec.pop("guidance_scale", None)
    return rec


def recommended_for_lora(path: str | Path) -> dict[str, Any]:
    """`EditConfig` overrides for a LoRA file: LCM or TCD LoRAs get their scheduler, 4 steps (or the step
    count their name gives, e.g. `..._8steps_lora`) and guidance 1; any other LoRA gets {}.

    The family is read from the file name, then from the safetensors header (its metadata, e.g. kohya's
    `ss_output_name`, and whether a key adapts `time_embedding.cond_proj`, an LCM guidance embedding);
    the weights themselves are not loaded.

    Raises:
        InputError: the file does not exist.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"LoRA file not found: {path}")
    rec = _family(path.stem)
    keys: list[str] = []
    if not rec and path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                keys, meta = list(f.keys()), f.metadata() or {}
        except Exception as e:  # noqa: BLE001  (a broken header: say so in one line)
            raise InputError(f"{path.name} is not a readable safetensors file: {str(e).splitlines()[0][:200]}") \
                from None
        rec = _family(" ".join(f"{k} {v}" for k, v in meta.items()))
        if not rec and any("cond_proj" in k for k in keys):
            rec = dict(LCM)
    if rec and rec["scheduler"] != "euler-a":
        found = _STEPS.search(path.stem.lower())
        if found:
            rec["num_inference_steps"] = int(found.group(1))
    return rec if rec.get("scheduler") in ("lcm", "tcd") else {}
