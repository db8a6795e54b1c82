"""Schedulers of the blending loop: a fresh one per run, and the timesteps a run uses after `blend_start`."""

from __future__ import annotations

from typing import Any

import torch

from .errors import InputError


STRENGTH_SCHEDULERS = ("lcm", "tcd")  # `blend_start` shortens their range and keeps every step (LCM's img2img)
STOCHASTIC = ("lcm", "tcd", "euler-a")  # their `step` draws fresh noise: it comes from the candidates' generators


def make_scheduler(pipe: Any, name: str) -> Any:
    """A fresh scheduler for one edit (schedulers hold per-run state) built from the checkpoint's config.

    Few-step ones: `lcm` (LCM-distilled models and LCM-LoRAs), `tcd` (TCD-LoRAs) and `euler-a`, Euler
    ancestral with "trailing" spacing, which SD-Turbo and SDXL-Turbo use (its first step starts at t = 999).
    """
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler, LCMScheduler, TCDScheduler)

    if name == "lcm":
        return LCMScheduler.from_config(pipe.scheduler.config)
    if name == "tcd":
        return TCDScheduler.from_config(pipe.scheduler.config)
    if name == "euler-a":
        return EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
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


def steps_run(name: str, num_inference_steps: int, blend_start: float) -> int:
    """How many steps (UNet evaluations per candidate) a run takes: all of them for LCM/TCD, whose
    `blend_start` shortens the range instead (see `schedule`), else those after `first_step`."""
    if name in STRENGTH_SCHEDULERS:
        return num_inference_steps
    return num_inference_steps - first_step(num_inference_steps, blend_start)


def step_kwargs(name: str, generator: Any, tcd_gamma: float = 0.3) -> dict[str, Any]:
    """Extra keyword arguments of `scheduler.step`: the generator(s) where it draws noise (one per row, so a
    seed gives the same candidate whatever the batch), TCD's gamma (`EditConfig.tcd_gamma`)."""
    kwargs: dict[str, Any] = {"generator": generator} if name in STOCHASTIC else {}
    if name == "tcd":
        kwargs["eta"] = tcd_gamma
    return kwargs


def _set_timesteps(sched: Any, name: str, num_inference_steps: int, blend_start: float, device: Any) -> None:
    if name not in STRENGTH_SCHEDULERS:
        sched.set_timesteps(num_inference_steps, device=device)
        return
    try:  # LCM's img2img rule: all the steps, spread over the first (1 - blend_start) of the distillation grid
        sched.set_timesteps(num_inference_steps, device=device, strength=1.0 - blend_start)
    except ValueError:
        grid = int(sched.config.original_inference_steps * (1.0 - blend_start))
        raise InputError(f"{num_inference_steps} {name} steps do not fit in the {grid} distillation timesteps left "
                         f"after blend_start {blend_start}: use fewer steps or a lower blend_start") from None


def schedule(pipe: Any, name: str, num_inference_steps: int, blend_start: float,
             device: Any = None) -> tuple[Any, Any, torch.Tensor]:
    """Fresh (scheduler, noiser, timesteps) for one run of the loop.

    LCM and TCD keep all `num_inference_steps` over a range shortened by `blend_start` (diffusers' LCM
    img2img `strength`); the others skip the first steps (img2img's rule, at least one step runs).
    The scheduler steps from the first timestep used; the noiser only serves `add_noise`, which looks
    each timestep up in its schedule (multistep schedulers would otherwise use their current step).
    """
    sched = make_scheduler(pipe, name)
    _set_timesteps(sched, name, num_inference_steps, blend_start, device)
    start = (num_inference_steps - steps_run(name, num_inference_steps, blend_start)) * sched.order
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start)
    noiser = make_scheduler(pipe, name)
    _set_timesteps(noiser, name, num_inference_steps, blend_start, device)
    return sched, noiser, sched.timesteps[start:]
