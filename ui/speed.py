"""Honest speed: how long an edit takes on this machine, from one timed UNet call (no gradio here)."""

from __future__ import annotations

from typing import Optional

from blended import EditConfig, Editor
from blended.schedulers import steps_run
from blended.unet_call import is_guided, time_unet_call


def unet_seconds(editor: Editor) -> float:
    """Seconds of one UNet call at the model's native size on a guided batch (2: one candidate), timed once
    through `blended.unet_call` (the one place a UNet is called)."""
    return time_unet_call(editor.model, guided=True)


def edit_seconds(config: EditConfig, per_call: float, guided: Optional[bool] = None) -> float:
    """Estimated denoising seconds of one edit: UNet calls (one per step run per candidate) x `per_call`, halved
    without guidance (`guided`; default: a scale above 1; a few-step UNet with a guidance embedding is unguided)."""
    guided = config.guidance_scale > 1.0 if guided is None else guided
    steps = steps_run(config.scheduler, config.num_inference_steps, config.blend_start)
    per_candidate = per_call if guided else per_call / 2
    return steps * config.num_candidates * per_candidate


def duration(seconds: float) -> str:
    """'40 s', '3 min', '1.5 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def cpu_notice(editor: Editor, defaults: EditConfig, per_call: Optional[float] = None) -> Optional[str]:
    """A warning when a Stable Diffusion model runs on the CPU, with the measured time per edit; None on an
    accelerator. `per_call` is a measured UNet call (timed here when not given)."""
    if editor.model.device.type != "cpu":
        return None
    per_call = unet_seconds(editor) if per_call is None else per_call
    total = edit_seconds(defaults, per_call, is_guided(editor.model.pipe.unet, defaults.guidance_scale))
    steps = steps_run(defaults.scheduler, defaults.num_inference_steps, defaults.blend_start)
    return (f"**{editor.model.name} is running on the CPU: one edit with the default settings "
            f"({defaults.num_candidates} candidates x {steps} steps) takes about {duration(total)} here** "
            f"(one UNet call took {per_call:.1f} s). On a GPU it takes seconds. Fewer candidates and steps "
            f"make it shorter; for a quick try offline, start the bundled demo model: `python app.py --model demo`.")
