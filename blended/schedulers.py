"""Schedulers of the blending loop: a fresh one per run, and the timesteps a run uses after `blend_start`."""

from __future__ import annotations

from typing import Any

import torch

from .errors import InputError


def make_scheduler(pipe: Any, name: str) -> Any:
    """A fresh scheduler for one edit (schedulers hold per-run state) built from the checkpoint's config."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if name == "ddim":
        return DDIMScheduler.from_config(pipe.scheduler.config)
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    if name == "euler":
        return EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    raise InputError(f"unknown scheduler '{name}'")


def first_step(num_inference_steps: int, blend_start: float) -> int:
    """Index of the first timestep used: diffusers' img2img rule at strength = 1 - blend_start, except that
    at least one step always runs (img2img would run none for, e.g., 1 step at strength 0.75)."""
    kept = min(int(num_inference_steps * (1.0 - blend_start)), num_inference_steps)
    return num_inference_steps - max(kept, 1)


def schedule(pipe: Any, name: str, num_inference_steps: int, blend_start: float,
             device: Any = None) -> tuple[Any, Any, torch.Tensor]:
    """Fresh (scheduler, noiser, timesteps) for one run of the loop.

    The scheduler steps from the first timestep used; the noiser only serves `add_noise`, which looks
    each timestep up in its schedule (multistep schedulers would otherwise use their current step).
    """
    sched = make_scheduler(pipe, name)
    sched.set_timesteps(num_inference_steps, device=device)
    start = first_step(num_inference_steps, blend_start) * sched.order
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start)
    noiser = make_scheduler(pipe, name)
    noiser.set_timesteps(num_inference_steps, device=device)
    return sched, noiser, sched.timesteps[start:]
