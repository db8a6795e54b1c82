"""Every default of an edit in one frozen dataclass (the CLI flags and UI sliders derive from it)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Optional

from .errors import InputError
from .images import MAX_RESOLUTION

START_FROM = ("source", "noise")
BACKGROUND_NOISE = ("fixed", "fresh")
BACKGROUND_TIMESTEPS = ("next", "own")
LATENT_MASK_MODES = ("any", "nearest", "core")
BACKGROUND_METHODS = ("none", "stitch", "poisson", "latent", "decoder")
DECODER_LOSSES = ("window", "band")  # where `decoder` fits the decode (blended.background.shown)
DECODER_SCHEDULES = ("constant", "linear", "cosine")  # learning rate over `decoder_steps` (blended.background.lr_factor)
SCHEDULERS = ("ddim", "dpm++", "euler", "euler-a", "lcm", "tcd")  # the last three: few-step models (docs/fewstep.md)
REMOVE_FILLS = ("telea", "ns")
DECODES = ("full", "tiny")  # `decode`: the model's VAE decoder, or its tiny one (TAESD); or a path (blended.models.tiny)  # `remove_fill`: OpenCV's inpainting methods (blended.remove.prefill)


@dataclass(frozen=True)
class EditConfig:
    """Settings of one edit. Model-specific recommendations (``blended.json`` in a model folder) override these."""

    negative_prompt: str = ""  # what classifier-free guidance steers away from
    num_candidates: int = 4  # images generated per edit; candidate i uses seed `seed + i`
    num_inference_steps: int = 50  # scheduler steps of the full schedule (before `blend_start` skips some)
    guidance_scale: float = 7.5  # classifier-free guidance weight; 1 disables the unconditional pass
    seed: int = 0  # base seed; the same seed and settings give the same images
    blend_start: float = 0.25  # fraction of the schedule skipped: start from z_init noised there (paper §3)
    shrink: bool = True  # progressive mask shrinking (paper §4.1)
    shrink_kernels: tuple[int, ...] = (7, 5, 3, 1)  # latent dilation kernels over equal parts of the steps; 1 = true mask
    start_from: str = "source"  # the loop's first latents: "source" = z_init noised to the first timestep used; "noise" = pure noise (the paper's code)
    background_noise: str = "fresh"  # the noise of the noised source outside the mask: "fresh" = a new draw at every step (the paper's code); "fixed" = one draw per candidate for all steps
    background_timestep: str = "own"  # after the step t_i -> t_i+1 the background is the source noised to "own" = t_i, one step noisier than the latents (the paper's code), or "next" = t_i+1, the latents' level (clean after the last step); fresh + own: 160 demo edits, a random candidate's hit 0.64 -> 0.74, top-1 0.91 -> 0.94 (docs/benchmarks.md)
    latent_mask_mode: str = "any"  # pixel mask -> latent mask: "any" = a latent is edited if any pixel under it is; "nearest" = the pixel at its centre (the paper's code); "core" = only if all are (a mask without a core falls back to "any")
    mask_blur: float = 0.0  # Gaussian blur (standard deviation, in pixels of the uploaded image) of the mask's edge, outwards, into a soft strength map that the final composite uses instead of `feather`; the loop keeps the hard mask unless `soft_mask` (measured: docs/benchmarks.md); 0 = a hard mask
    soft_mask: bool = False  # strengths steer the loop per latent (Differential Diffusion: a latent of strength s changes only in the last s of the steps): a mask's grey levels / alpha, and `mask_blur`'s soft edge; False = the mask thresholded at `mask_threshold`
    core_steps: float = 0.0  # fraction of the steps, from the first, that blend with the mask's core (latents wholly inside it): content forms inside the mask; 0 = the paper's schedule
    scheduler: str = "ddim"  # one of SCHEDULERS; any diffusers scheduler with `add_noise` fits the loop
    tcd_gamma: float = 0.3  # `tcd`: the stochasticity gamma (diffusers' `eta`) of each step, 0 = deterministic (a DDIM step), 1 = LCM's fresh noise; 0.3 = the TCD paper's default
    batch_size: int = 4  # candidates denoised together (bounds memory; results do not depend on it)
    mask_threshold: float = 0.5  # mask pixels above this (0..1 of the channel's range) are edited
    invert_mask: bool = False  # edit where the mask is black instead of white
    crop_margin: int = 32  # pixels of context around the mask's box when an oversized image is cropped
    resolution: int = 0  # shorter side, in pixels, the edited region is worked at; 0 = the model's native size (never less); more gives big regions more detail, up to the region's own pixels (GPU time and memory grow with its square)
    background: str = "stitch"  # background reconstruction, one of BACKGROUND_METHODS (paper §4.2); all but "none" keep the upload exactly beyond the seam band
    feather: int = 8  # seam band in pixels of the upload, outside the mask, over which the edit fades into the upload
    decoder_steps: int = 75  # Adam steps of per-edit decoder fine-tuning (paper: 75)
    decoder_lr: float = 1e-4  # Adam learning rate of decoder fine-tuning (paper: 1e-4)
    decoder_schedule: str = "constant"  # the rate over the steps: "constant" (paper), "linear" or "cosine" decay from `decoder_lr` to 0 at `decoder_steps`
    decoder_lambda: float = 100.0  # weight of the source term outside the mask, `decoder` and `latent` (paper: 100)
    decoder_margin: int = 0  # latent pixels around the mask's box that `decoder`/`latent` decode (outer half fades); 0 = auto: twice the seam band
    decoder_loss: str = "band"  # `decoder` fits its decode only in the "band" the result shows it in (`keep_inside`/`exact_outside`: `feather` px outside the mask, `feather / 2` inside; the window is then just that band) or over the whole "window" (paper)
    decoder_blocks: int = 0  # `decoder` tunes only the last N up blocks + output layers; 0 = all (paper)
    decoder_shared: bool = True  # `decoder`: one per-edit copy trained on all candidates in turn; False = a copy per candidate
    decoder_patience: int = 10  # `decoder`/`latent` stop once this many steps cut the loss < 10%; 0 = never
    keep_inside: bool = True  # `decoder`/`latent`: keep the candidate's own pixels inside the mask (False: the paper's whole decode)
    exact_outside: bool = True  # the upload bit for bit beyond `feather` px outside the mask, at full resolution (False: the method's result over the whole edited region, scaled back)
    latent_steps: int = 100  # Adam steps of `latent` background optimisation
    latent_lr: float = 0.05  # Adam learning rate of `latent` (on scaled latents)
    # -- selection (issue 22: blended/select) --
    mask_grow: int = 0  # pixels of the upload the mask grows by before the edit (negative: shrinks); grey levels grow as a max filter
    inpainting_mask_weight: float = 1.0  # 9-channel inpainting UNets: the source they see, lerp(source, source with the mask blanked, w) (A1111's inpainting_mask_weight): 1 = the hole, 0 = the whole source
    inpainting_conditioning: bool = True  # 9-channel inpainting UNets: give them the mask and masked source (False: zeros, the UNet runs as text-to-image); the latent blend runs either way
    rank: bool = True  # score candidates with CLIP and sort them best first
    safety_checker: bool = True  # run the checkpoint's safety checker where it has one
    # -- removal (issue 29: blended/remove.py, docs/remove.md); "added" keeps old batch results' hashes --
    remove: bool = dataclasses.field(default=False, metadata={"added": 29})  # remove what the mask covers, no prompt needed: the hole pre-filled from its surroundings (`remove_fill`), the loop started from it at `remove_strength` with the prompt (may be empty) as a background prompt, the candidates ranked by how little object is left
    remove_strength: float = dataclasses.field(default=0.2, metadata={"added": 29})  # `remove`: the fraction of the schedule run from the noised pre-fill (the loop's blend_start is 1 - this, `blend_start` is not used); 0 = the pre-fill alone, no diffusion
    remove_fill: str = dataclasses.field(default="telea", metadata={"added": 29})  # `remove`: how the hole is pre-filled, one of REMOVE_FILLS: "telea" (fast marching) or "ns" (Navier-Stokes), OpenCV's cv2.inpaint
    # -- speed on a CPU (issue 31: blended/codec.py, blended/models/tiny.py, docs/hosting.md) --
    decode: str = dataclasses.field(default="full", metadata={"added": 31})  # what decodes the candidates: "full" = the model's VAE decoder; "tiny" = a tiny decoder (TAESD: the model folder's vae_tiny/, else madebyollin/taesd or taesdxl), about 1/10 of the time on a CPU; or the path of an AutoencoderTiny folder or .safetensors file. The composite keeps the upload exactly outside the mask either way; background "decoder" and "latent" need the full decoder and use it

    def replace(self, **changes: Any) -> "EditConfig":
        """A copy with `changes` applied; unknown names raise TypeError."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def validate(self) -> "EditConfig":
        """Raise ValueError naming the first setting out of range; return self."""
        checks = [
            (1 <= self.num_candidates <= 64, "num_candidates must be between 1 and 64"),
            (1 <= self.num_inference_steps <= 1000, "num_inference_steps must be between 1 and 1000"),
            (0.0 <= self.guidance_scale <= 50.0, "guidance_scale must be between 0 and 50"),
            (0 <= self.seed < 2**63, "seed must be between 0 and 2**63 - 1"),
            (0.0 <= self.blend_start < 1.0, "blend_start must be in [0, 1)"),
            (len(self.shrink_kernels) >= 1 and all(k >= 1 and k % 2 == 1 for k in self.shrink_kernels),
             "shrink_kernels must be odd integers >= 1"),
            (0.0 <= self.core_steps < 1.0, "core_steps must be in [0, 1)"),
            (0.0 <= self.tcd_gamma <= 1.0, "tcd_gamma must be in [0, 1]"),
            (self.start_from in START_FROM, f"start_from must be one of {', '.join(START_FROM)}"),
            (self.background_noise in BACKGROUND_NOISE, f"background_noise must be one of {', '.join(BACKGROUND_NOISE)}"),
            (self.background_timestep in BACKGROUND_TIMESTEPS,
             f"background_timestep must be one of {', '.join(BACKGROUND_TIMESTEPS)}"),
            (self.latent_mask_mode in LATENT_MASK_MODES, f"latent_mask_mode must be one of {', '.join(LATENT_MASK_MODES)}"),
            (0.0 <= self.mask_blur <= 256.0, "mask_blur must be between 0 and 256 pixels"),
            (self.scheduler in SCHEDULERS, f"scheduler must be one of {', '.join(SCHEDULERS)}"),
            (1 <= self.batch_size <= 64, "batch_size must be between 1 and 64"),
            (0.0 <= self.mask_threshold < 1.0, "mask_threshold must be in [0, 1)"),
            (-256 <= self.mask_grow <= 256, "mask_grow must be between -256 and 256 pixels"),
            (0 <= self.crop_margin <= 4096, "crop_margin must be between 0 and 4096 pixels"),
            (self.resolution == 0 or 64 <= self.resolution <= MAX_RESOLUTION,
             f"resolution must be 0 (the model's native size) or between 64 and {MAX_RESOLUTION} pixels"),
            (self.background in BACKGROUND_METHODS, f"background must be one of {', '.join(BACKGROUND_METHODS)}"),
            (0 <= self.feather <= 256, "feather must be between 0 and 256 pixels"),
            (1 <= self.decoder_steps <= 1000, "decoder_steps must be between 1 and 1000"),
            (0.0 < self.decoder_lr <= 1.0, "decoder_lr must be in (0, 1]"),
            (self.decoder_loss in DECODER_LOSSES, f"decoder_loss must be one of {', '.join(DECODER_LOSSES)}"),
            (self.decoder_schedule in DECODER_SCHEDULES, f"decoder_schedule must be one of {', '.join(DECODER_SCHEDULES)}"),
            (0.0 <= self.decoder_lambda <= 1e6, "decoder_lambda must be between 0 and 1e6"),
            (0 <= self.decoder_margin <= 1024, "decoder_margin must be between 0 (auto) and 1024 latent pixels"),
            (0 <= self.decoder_blocks <= 16, "decoder_blocks must be between 0 (all) and 16"),
            (0 <= self.decoder_patience <= 1000, "decoder_patience must be between 0 and 1000 steps"),
            (0.0 <= self.inpainting_mask_weight <= 1.0, "inpainting_mask_weight must be in [0, 1]"),
            (1 <= self.latent_steps <= 1000, "latent_steps must be between 1 and 1000"),
            (0.0 < self.latent_lr <= 10.0, "latent_lr must be in (0, 10]"),
            (0.0 <= self.remove_strength <= 1.0, "remove_strength must be in [0, 1]"),
            (self.remove_fill in REMOVE_FILLS, f"remove_fill must be one of {', '.join(REMOVE_FILLS)}"),
            (isinstance(self.decode, str) and 0 < len(self.decode.strip()) <= 4096,
             "decode must be full, tiny or the path of a tiny decoder"),
        ]
        checks += [(isinstance(getattr(self, f.name), bool), f"{f.name} must be true or false")
                   for f in dataclasses.fields(self) if isinstance(f.default, bool)]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self

    def checked(self) -> "EditConfig":
        """`validate`, raising `InputError` (a message meant for the user) instead of ValueError; return self."""
        try:
            return self.validate()
        except ValueError as e:
            raise InputError(str(e)) from None

    @classmethod
    def from_json(cls, settings: Optional[dict[str, Any]], base: Optional["EditConfig"] = None) -> "EditConfig":
        """The one coercer of settings given as JSON (CLI, batch manifest, app, API): `base` (default the
        defaults) with `settings` applied, each value coerced to its field's type (5.0 is the integer 5, 5 the
        float 5.0, a list a tuple; None keeps the base's value) and the whole checked. `InputError` names an
        unknown setting or the first value of a wrong type or out of range."""
        if settings is not None and not isinstance(settings, dict):
            raise InputError("settings must be a JSON object of setting names and values")
        base = base or cls()
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings or {}) - set(fields))
        if unknown:
            raise InputError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(fields)}")
        changes = {name: coerce(name, value, getattr(base, name))
                   for name, value in (settings or {}).items() if value is not None}
        return base.replace(**changes).checked()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def coerce(name: str, value: Any, default: Any) -> Any:
    """A JSON `value` as the type of the EditConfig field `name` (whose default is `default`); InputError if it
    has the wrong type. A whole float is an integer (5.0 -> 5), an integer a float (5 -> 5.0)."""

    def wrong(want: str) -> InputError:
        return InputError(f"setting {name} must be {want}, got {json.dumps(value, default=repr)[:80]}")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or float(value) != int(value):
            raise wrong("an integer")
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong("a number")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise wrong("a string")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or not value:
            raise wrong("a list of integers")
        return tuple(coerce(name, v, default[0] if default else 0) for v in value)
    return value

