"""A Space without a GPU starts with the settings docs/hosting.md measured fastest on a 2-vCPU CPU: the model's
few-step sibling, the tiny decoder and, on CPUs that compute bfloat16 natively, bf16 weights. `app.py` applies
`cpu_space_plan` before loading the model and shows its one line."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping, Optional

FEW_STEP = {"demo": "demo-fast", "sd21": "sd-turbo", "sdxl": "sdxl-turbo"}  # preset -> its few-step sibling
FALLBACK = "demo-fast"  # what a CPU Space falls back to when its model cannot be loaded


def on_cpu_space(env: Optional[Mapping[str, str]] = None, cuda: Optional[bool] = None) -> bool:
    """True on a Hugging Face Space without a GPU (SPACE_ID set, no CUDA, not ZeroGPU), or where
    BLENDED_CPU_SPACE=1 asks for the same start-up; BLENDED_CPU_SPACE=0 turns it off."""
    env = os.environ if env is None else env
    forced = env.get("BLENDED_CPU_SPACE", "").strip().lower()
    if forced in ("0", "false", "no", "1", "true", "yes"):
        return forced in ("1", "true", "yes")
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    zero_gpu = env.get("SPACES_ZERO_GPU", "").strip().lower() not in ("", "0", "false", "no")
    return bool(env.get("SPACE_ID")) and not cuda and not zero_gpu


def native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX): bf16 weights then run SD 1.5's UNet
    2.9x faster than fp32 at 512 px on 2 threads (docs/hosting.md); elsewhere bf16 is emulated and slower."""
    try:
        flags = Path(cpuinfo).read_text(errors="ignore")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_space_plan(args, limits, env: Optional[Mapping[str, str]] = None, bf16: Optional[bool] = None):
    """(args, limits, line): the model, dtype and decode a CPU Space starts with, and the one line saying so.
    What the owner set (--model / BLENDED_MODEL naming a model without a few-step sibling, --dtype,
    BLENDED_DECODE) is kept."""
    env = os.environ if env is None else env
    changes, said = {}, []
    model = FEW_STEP.get(args.model)
    if model:
        changes["model"] = model
        said.append(f"{model} (few-step) instead of {args.model}")
    bundled = changes.get("model", args.model) in ("demo", "demo-fast")  # tiny convolutions: bf16 does not pay
    if args.dtype is None and not bundled and (native_bf16() if bf16 is None else bf16):
        changes["dtype"] = "bf16"
        said.append("bf16 weights (this CPU has native bfloat16)")
    if not env.get("BLENDED_DECODE"):
        limits = dataclasses.replace(limits, decode="tiny")
        said.append("the tiny decoder")
    args = dataclasses.replace(args, **changes) if dataclasses.is_dataclass(args) else _replaced(args, changes)
    line = ("No GPU here, so this Space runs " + ", ".join(said) + ": the fastest settings measured on a CPU Space "
            "(docs/hosting.md).") if said else None
    return args, limits, line


def _replaced(namespace, changes: dict):
    """A copy of an argparse Namespace with `changes`."""
    import argparse

    return argparse.Namespace(**{**vars(namespace), **changes})
