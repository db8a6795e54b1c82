"""Editor.edit(): prepare -> encode -> blend loop -> decode -> reconstruct background -> rank."""

from __future__ import annotations

import dataclasses
import functools
import gc
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image

from .config import EditConfig
from .errors import InputError, ModelLoadError, OutOfMemory
from .fewstep import recommended_for_lora, recommended_for_model
from .images import (DEFAULT_MAX_PIXELS, ImageLike, Region, composite, crop_to_work, load_image, load_mask,
                     load_mask_values, paste_back, plan_region, seam_weights)
from .masks import crop_strength, latent_strength, mask_schedule, strength_map
from .models import DEFAULT_MODEL, LoadedModel, load_model
from .sampler import blend_loop
from .schedulers import schedule, step_kwargs
from .unet_call import conditions, inpaint_conditioning, make_denoise

Preview = Callable[[int, int, list[Image.Image]], None]  # (done steps, total steps, preview images)
Progress = Callable[[str, int, int], None]  # (stage, done, total); stages: encoding, denoising, decoding, reconstructing, ranking


@dataclass
class Candidate:
    """One edited image at the source's full resolution."""

    image: Image.Image
    seed: int
    scores: dict[str, float] = field(default_factory=dict)  # ranking scores; "score" orders the gallery
    filtered: bool = False  # the checkpoint's safety checker flagged it (its edit is blanked grey)
    mask: str = ""  # which of several masks made it (`blended.multimask`); "" = the edit's one mask

    @property
    def score(self) -> Optional[float]:
        return self.scores.get("score")


@dataclass
class EditResult:
    """Candidates best first, with what produced them."""

    candidates: list[Candidate]
    prompt: str
    config: EditConfig
    model: str
    timings: dict[str, float]  # seconds per stage
    region: Region  # what was edited, at which size
    notes: list[str] = field(default_factory=list)  # things the user should know (prompt cut, ...)
    model_info: dict = field(default_factory=dict)  # LoadedModel.describe(): VAE, LoRAs with weights and digests

    @property
    def images(self) -> list[Image.Image]:
        return [c.image for c in self.candidates]

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "model": self.model,
            "vae": self.model_info.get("vae"),
            "loras": self.model_info.get("loras", []),
            "recommended": self.model_info.get("recommended", {}),  # the model's (and its LoRAs') own defaults
            "candidates": [{"rank": i + 1, "seed": c.seed, "scores": c.scores, "filtered": c.filtered,
                            **({"mask": c.mask} if c.mask else {})} for i, c in enumerate(self.candidates)],
            "settings": self.config.to_dict(),
            "region": {"box": list(self.region.box), "work_size": list(self.region.work_size)},
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "notes": self.notes,
        }


def _is_oom(e: BaseException) -> bool:
    """True for an out-of-memory error of any device (CUDA's own type; CPU and MPS raise RuntimeError)."""
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e) \
        or "out of memory" in str(e).lower()


def _release_memory() -> None:
    """Give back what a failed allocation left: Python's garbage, then CUDA's cached blocks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (1, 3, H, W) in [-1, 1]."""
    a = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return a.permute(2, 0, 1)[None]


def _to_pil(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images."""
    a = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(im) for im in a]


class Editor:
    """Edits images with one loaded model; safe to share between concurrent requests (no per-edit state)."""

    def __init__(self, model: LoadedModel, ranker: Any = None, *, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.model = model
        self.ranker = ranker  # object with .score(images, mask, prompt) -> list[dict]; None = no ranking
        self.max_pixels = max_pixels  # larger images and masks are refused before they are decoded

    @classmethod
    def load(cls, model: str = DEFAULT_MODEL, *, device: Optional[str] = None, dtype: Optional[str] = None,
             ranker: Any = "auto", local_files_only: Optional[bool] = None,
             max_pixels: int = DEFAULT_MAX_PIXELS, **load_options: Any) -> "Editor":
        """Load a model (see `blended.models.load_model`; `load_options`: vae, loras, prediction_type,
        model_config) and the ranker that fits it ("auto", None or a Ranker)."""
        loaded = load_model(model, device=device, dtype=dtype, local_files_only=local_files_only, **load_options)
        if ranker == "auto":
            from .ranking import ranker_for

            ranker = ranker_for(loaded.source, device=str(loaded.device))
        return cls(loaded, ranker, max_pixels=max_pixels)

    @functools.cached_property
    def recommended(self) -> dict[str, Any]:
        """The model's own settings: a few-step checkpoint's scheduler, steps and guidance (`blended.fewstep`),
        then its blended.json, then those of an LCM or TCD LoRA loaded with a non-zero weight. Read once per
        Editor (a LoRA's header is a file read; the model and its LoRAs do not change after loading)."""
        recommended = {**recommended_for_model(self.model.source, self.model.pipe), **self.model.recommended}
        for lora in getattr(self.model, "loras", ()):
            if lora.weight != 0:
                recommended.update(recommended_for_lora(lora.path))
        return recommended

    @property
    def defaults(self) -> EditConfig:
        """EditConfig defaults with `recommended` applied."""
        known = {f.name for f in dataclasses.fields(EditConfig)}
        return EditConfig().replace(**{k: v for k, v in self.recommended.items() if k in known})

    # -- stages ----------------------------------------------------------------------------------

    def _vae_encode(self, x: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) in [-1, 1] -> scaled latents; the distribution's mean, so encoding is deterministic."""
        vae = self.model.pipe.vae
        z = vae.encode(x.to(self.model.device, vae.dtype)).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((z - shift) * vae.config.scaling_factor).to(self.model.dtype)

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> (B, 3, H, W) images in [-1, 1]."""
        vae = self.model.pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample.float()

    def _prompt_notes(self, prompt: str) -> list[str]:
        tok = self.model.pipe.tokenizer
        n = len(tok(prompt, truncation=False).input_ids)
        if n > tok.model_max_length:
            return [f"the prompt is {n} tokens; the text encoder reads the first {tok.model_max_length}, "
                    "the rest was cut"]
        return []

    def _safety(self, images: torch.Tensor) -> list[bool]:
        """The checkpoint's safety checker on (B, 3, H, W) images in [-1, 1]; all False where it has none."""
        pipe = self.model.pipe
        if getattr(pipe, "safety_checker", None) is None:
            return [False] * images.shape[0]
        arr = ((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
        _, flagged = pipe.run_safety_checker(arr, self.model.device, self.model.dtype)
        return [bool(f) for f in flagged] if flagged is not None else [False] * images.shape[0]

    def _reconstruct(self, cfg: EditConfig, latents: torch.Tensor, decoded: torch.Tensor, x_source: torch.Tensor,
                     pixel_mask: torch.Tensor, exact: bool, report: Progress,
                     should_stop: Optional[Callable[[], bool]],
                     stats: Optional[dict[str, torch.Tensor]] = None) -> tuple[torch.Tensor, Optional[str]]:
        """Background reconstruction at work size (`blended.background.reconstruct`), leaving the final stitch
        to the full-resolution composite when `exact`. When `latent` or `decoder` runs out of memory the
        candidates go on as they are (the composite then is the default `stitch`) and a note says so."""
        from .background import reconstruct

        report("reconstructing", 0, 1)
        try:
            out = reconstruct(cfg.background, editor=self, latents=latents, decoded=decoded, source=x_source.float(),
                              mask=pixel_mask, config=cfg, composite=not exact, stats=stats,
                              progress=lambda done, total: report("reconstructing", done, total),
                              should_stop=should_stop)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if cfg.background not in ("latent", "decoder") or not _is_oom(e):
                raise
            _release_memory()
            fallback = "stitch" if exact else "none"
            return decoded, (f"background '{cfg.background}' ran out of memory at {tuple(decoded.shape[-2:])[::-1]} "
                             f"work pixels; the edit used '{fallback}' instead (a smaller mask or `resolution` "
                             "fits in less memory)")
        return out, None

    def rank(self, candidates: list[Candidate], mask: np.ndarray, prompt: str, notes: list[str]) -> None:
        """Score `candidates` with the ranker on `mask` ((H, W) bool, the asked region) and sort them best first,
        in place. A ranker that cannot load leaves the seed order and adds a note (an edit beats no edit)."""
        try:
            all_scores = self.ranker.score([c.image for c in candidates], mask, prompt)
        except ModelLoadError as e:
            notes.append(f"ranking skipped: {e}")
            return
        for cand, scores in zip(candidates, all_scores):
            cand.scores = scores
        candidates.sort(key=lambda c: -c.scores["score"])

    # -- the edit --------------------------------------------------------------------------------

    def edit(self, image: ImageLike, mask: ImageLike, prompt: str, config: Optional[EditConfig] = None, *,
             progress: Optional[Progress] = None, should_stop: Optional[Callable[[], bool]] = None,
             preview: Optional[Preview] = None, preview_every: int = 1, **overrides: Any) -> EditResult:
        """Edit `image` inside `mask` to show `prompt`; everything outside the mask is kept.

        Args:
            image: the source, any size and aspect ratio (path, bytes, PIL image or array).
            mask: same size as `image`; white or opaque pixels (above `config.mask_threshold`) are
                edited, black or transparent ones kept (`invert_mask` swaps them).
            prompt: what should appear inside the mask.
            config: the settings; default `self.defaults`. `overrides` replace single fields.
            progress: called with (stage, done, total) as the edit advances.
            should_stop: polled before every denoising step; returning True raises `EditCancelled`.
            preview: called every `preview_every` denoising steps with (done, total, images): small RGB
                previews of the current batch of candidates (the model's x0 estimate through a linear
                latent -> RGB map, the source outside the mask; `blended.preview`). None = no previews.

        Returns:
            An `EditResult` whose candidates are full-resolution images, best first when ranked.

        Raises:
            InputError: bad image, mask, prompt or setting (the message says which).
            EditCancelled: `should_stop` returned True.
            OutOfMemory: the device ran out of memory (the model stays usable).
        """
        try:
            cfg = (config or self.defaults).replace(**overrides)
            if cfg.mask_grow:  # grown or shrunk in the upload's pixels before anything else (blended/select)
                image, mask = self._grown(image, mask, cfg)
            return self._edit(image, mask, prompt, config, progress, should_stop, overrides,
                              preview=preview, preview_every=preview_every)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not _is_oom(e):
                raise
            _release_memory()
            raise OutOfMemory("out of memory during the edit: use fewer candidates, a smaller batch size "
                              "or a smaller image") from None

    def _grown(self, image: ImageLike, mask: ImageLike, cfg: EditConfig) -> tuple[Image.Image, Image.Image]:
        """(source, mask) with the mask's edit side grown by `cfg.mask_grow` pixels (an 'L' image, 255 = edit)."""
        from .select import grow_values

        try:
            cfg.validate()
        except ValueError as e:
            raise InputError(str(e)) from None
        source = load_image(image, max_pixels=self.max_pixels)
        values = load_mask_values(mask, source.size, max_pixels=self.max_pixels)
        edit = grow_values(1 - values if cfg.invert_mask else values, cfg.mask_grow)
        values = 1 - edit if cfg.invert_mask else edit
        return source, Image.fromarray(np.round(np.clip(values, 0, 1) * 255).astype(np.uint8), "L")

    @torch.no_grad()
    def _edit(self, image: ImageLike, mask: ImageLike, prompt: str, config: Optional[EditConfig],
              progress: Optional[Progress], should_stop: Optional[Callable[[], bool]],
              overrides: dict[str, Any], *, preview: Optional[Preview] = None,
              preview_every: int = 1) -> EditResult:
        cfg = (config or self.defaults).replace(**overrides) if overrides else (config or self.defaults)
        try:
            cfg.validate()
        except ValueError as e:
            raise InputError(str(e)) from None
        train_steps = int(getattr(self.model.pipe.scheduler.config, "num_train_timesteps", 1000))
        if cfg.num_inference_steps >= train_steps:
            raise InputError(f"num_inference_steps must be below the model's {train_steps} training timesteps")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("the prompt is empty: describe what should appear inside the mask")
        prompt = prompt.strip()
        report = progress or (lambda stage, done, total: None)
        m, pipe = self.model, self.model.pipe
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[stage] = timings.get(stage, 0.0) + now - clock
            clock = now

        # 1. inputs: full-resolution source and mask, the region to edit at work size
        report("encoding", 0, 1)
        source = load_image(image, max_pixels=self.max_pixels)
        # the mask asked for (`target`: ranking scores it, the loop's core forms content inside it) and, with
        # `mask_blur` or `soft_mask`, per-pixel strengths whose support is everything the edit may touch
        strength = None  # (H, W) strengths in [0, 1] at full resolution: the final composite's weights
        if cfg.soft_mask:
            values = load_mask_values(mask, source.size, max_pixels=self.max_pixels)
            strength = strength_map(1 - values if cfg.invert_mask else values, cfg.mask_blur)
            if not strength.any():
                raise InputError("the mask is empty: paint the region to edit (white or opaque = edit)")
            target = strength >= 0.5
            if not target.any():  # a faint mask: all of it is the target
                target = strength > 0
        else:
            target = load_mask(mask, source.size, threshold=cfg.mask_threshold, invert=cfg.invert_mask,
                               max_pixels=self.max_pixels)
            if cfg.mask_blur > 0:
                strength = strength_map(target, cfg.mask_blur)
        full_mask = target if strength is None else strength > 0
        region = plan_region(source.size, full_mask, native=m.native_size, multiple=m.size_multiple,
                             margin=max(cfg.crop_margin, cfg.feather + 1), resolution=cfg.resolution)
        work_image, work_mask = crop_to_work(source, full_mask, region)  # work_mask: the support
        work_target = work_mask if strength is None else crop_strength(target.astype(np.float32), region.box,
                                                                        region.work_size) > 0
        # the loop's strengths: per pixel with `soft_mask` (Differential Diffusion); else the target, hard
        # (`mask_blur` alone softens only the final composite: docs/benchmarks.md, "Soft masks")
        work_strength = crop_strength(strength, region.box, region.work_size) if cfg.soft_mask else work_target
        notes = self._prompt_notes(prompt)
        lap("prepare")

        # 2. encode: z_init and the text conditions
        x_source = _to_tensor(work_image).to(m.device)  # (1, 3, H, W)
        z_init = self._vae_encode(x_source)  # (1, C, H/f, W/f)
        cond = conditions(m, prompt, cfg.negative_prompt, cfg.guidance_scale, region.work_size)
        lap("encode")

        # 3. latent masks: edit strength per latent, then one mask per step (soft thresholds, shrinking, core)
        timesteps = schedule(pipe, cfg.scheduler, cfg.num_inference_steps, cfg.blend_start)[2]
        z_mask = latent_strength(work_strength, m.vae_scale_factor, cfg.latent_mask_mode)  # (1, 1, h, w)
        if not z_mask.any():  # "core" of a mask too thin to have one
            z_mask = latent_strength(work_strength, m.vae_scale_factor, "any")
        z_core = latent_strength(work_strength * work_target, m.vae_scale_factor, "core")  # latents wholly inside the target
        masks = mask_schedule(z_mask.to(m.device, m.dtype), len(timesteps), cfg.shrink_kernels, cfg.shrink,
                              z_core.to(m.device, m.dtype), cfg.core_steps)
        cond = inpaint_conditioning(m, cond, self._vae_encode, x_source, work_mask, z_mask, cfg)  # 9-channel UNets
        seeds = [cfg.seed + i for i in range(cfg.num_candidates)]
        chunks = [seeds[i:i + cfg.batch_size] for i in range(0, len(seeds), cfg.batch_size)]
        total_steps = len(timesteps) * len(chunks)

        # 4. the blending loop, chunk by chunk; each chunk has its own scheduler state
        latents_all, decoded_all = [], []
        # `latent`/`decoder` pin the decoder's GroupNorm statistics to the whole image's: recorded during this
        # decode instead of by one more decode of every candidate (background.DecodeStats)
        from .background import DecodeStats

        decode_stats = DecodeStats(pipe.vae) if cfg.background in ("latent", "decoder") else None
        previewer = None
        if preview is not None:  # x0 estimates -> RGB by a linear map fitted once per VAE (no decode)
            from .preview import Previewer, latent_rgb_map, predicted_x0

            previewer = Previewer(latent_rgb_map(pipe.vae, self._vae_encode, m.vae_scale_factor), work_image,
                                  work_mask)
            every = max(1, int(preview_every))
        for c, chunk in enumerate(chunks):
            sched, noiser, _ = schedule(pipe, cfg.scheduler, cfg.num_inference_steps, cfg.blend_start, m.device)
            generators = [torch.Generator("cpu").manual_seed(s) for s in chunk]

            def draw(generators=generators) -> torch.Tensor:  # (B, C, h, w), on the CPU: a seed gives the same noise on every device
                return torch.cat([torch.randn(z_init.shape[1:], generator=g)[None] for g in generators]).to(m.device, m.dtype)

            noise = draw()
            fresh_noise = (lambda i, draw=draw: draw()) if cfg.background_noise == "fresh" else None
            denoise = make_denoise(pipe.unet, sched, cond.repeat(len(chunk)), cfg.guidance_scale)

            x0 = [None]  # the last step's clean-latent estimate, kept only for the preview
            kw = step_kwargs(cfg.scheduler, generators, cfg.tcd_gamma)  # LCM, TCD, Euler-a draw noise in `step`: from the seeds

            def step(noise_pred, t, latents, sched=sched, x0=x0, kw=kw):
                if previewer is None:
                    return sched.step(noise_pred, t, latents, return_dict=False, **kw)[0]
                out = sched.step(noise_pred, t, latents, **kw)
                x0[0] = predicted_x0(out, sched, noise_pred, t, latents)
                return out.prev_sample

            def on_step(i, t, latents, c=c, x0=x0):
                report("denoising", c * len(timesteps) + i + 1, total_steps)
                if previewer is not None and (i + 1) % every == 0 and i + 1 < len(timesteps):
                    preview(c * len(timesteps) + i + 1, total_steps, previewer(x0[0]))

            latents = blend_loop(denoise, step, noiser.add_noise, z_init, noise, masks, timesteps,
                                 start=cfg.start_from, fresh_noise=fresh_noise,
                                 background_timestep=cfg.background_timestep,
                                 on_step=on_step, should_stop=should_stop)
            lap("denoise")
            report("decoding", c, len(chunks))
            latents_all.append(latents)
            if decode_stats is None:
                decoded_all.append(self.vae_decode(latents))
            else:
                with decode_stats:
                    decoded_all.append(self.vae_decode(latents))
            lap("decode")
        latents = torch.cat(latents_all)
        decoded = torch.cat(decoded_all)  # (N, 3, H, W) in [-1, 1]
        flagged = self._safety(decoded) if cfg.safety_checker else [False] * len(seeds)
        lap("safety")

        # 5. background reconstruction at work size (paper §4.2); the final stitch comes in 6, at full resolution
        pixel_mask = torch.from_numpy(work_mask.astype(np.float32))[None, None].to(m.device)  # (1, 1, H, W)
        exact = cfg.background != "none" and cfg.exact_outside
        if cfg.background != "none":
            stats = decode_stats.stats(latents.shape[0]) if decode_stats is not None else None
            decoded, note = self._reconstruct(cfg, latents, decoded, x_source, pixel_mask, exact, report,
                                              should_stop, stats)
            notes += [note] if note else []
            lap("background")
        blank = x_source.float() * (1 - pixel_mask)  # a filtered candidate keeps the source, its edit blanked grey
        decoded = torch.stack([blank[0] if f else d for d, f in zip(decoded, flagged)])

        # 6. back to full resolution: the edit inside the mask and its seam band of `feather` source pixels,
        #    the upload itself, bit for bit, beyond (`none`: the paper's decode over the whole region)
        if exact:
            l, t, r, b = region.box
            weights = seam_weights(full_mask[t:b, l:r], cfg.feather) if strength is None else \
                strength[t:b, l:r]  # (h, w), in the upload's own pixels; a soft mask's strengths are its own seam
            images = [composite(source, im, region, weights) for im in _to_pil(decoded)]
        else:
            images = [paste_back(source, im, region, cfg.feather) for im in _to_pil(decoded)]
        candidates = [Candidate(image=im, seed=s, filtered=f) for im, s, f in zip(images, seeds, flagged)]
        lap("paste")

        # 7. rank: best first by the ranker's combined score; filtered candidates last
        if cfg.rank and self.ranker is not None and len(candidates) > 1:
            report("ranking", 0, 1)
            self.rank(candidates, target, prompt, notes)
            lap("rank")
        candidates.sort(key=lambda c: c.filtered)  # stable: flagged candidates go last, the order stays
        timings["total"] = sum(timings.values())
        report("done", 1, 1)
        return EditResult(candidates=candidates, prompt=prompt, config=cfg, model=m.name, timings=timings,
                          region=region, notes=notes,
                          model_info={**m.describe(), "recommended": dict(self.recommended)})
