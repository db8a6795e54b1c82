"""Editor.edit(): check_inputs, then numbered stages: 1. inputs at work size, 2. encode, 3. latent masks,
4. the blending loop, 5. decode, 6. background reconstruction, 7. the full-resolution composite, 8. rank.

Each stage is a short method over one `_Run` (the per-call state: settings, progress, timings, notes), so one
loaded Editor serves many edits at once and nothing about an edit lives on `self`."""

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

from .codec import Decoding, composite_crop, decode_box, decoding_for
from .config import EditConfig
from .errors import InputError, ModelLoadError, OutOfMemory
from .fewstep import recommended_for_lora, recommended_for_model
from .images import DEFAULT_MAX_PIXELS, ImageLike, Region, composite, crop_image, load_image, paste_back, plan_region
from .masks import EditMasks, WorkMasks, latent_strength, mask_schedule
from .models import DEFAULT_MODEL, LoadedModel, load_model
from .remove import loop_start, prefill_only, prefilled, removal_ranker
from .result import Candidate, EditResult
from .sampler import blend_loop
from .schedulers import schedule, step_kwargs
from .unet_call import TOKENIZER_LOCK, Conditioning, conditions, inpaint_conditioning, make_denoise

__all__ = ["Candidate", "EditResult", "Editor", "Preview", "Progress", "is_out_of_memory"]

Preview = Callable[[int, int, list[Image.Image]], None]  # (done steps, total steps, preview images)
Progress = Callable[[str, int, int], None]  # (stage, done, total); stages: encoding, denoising, decoding, reconstructing, ranking
ShouldStop = Optional[Callable[[], bool]]


def is_out_of_memory(e: BaseException) -> bool:
    """True for an out-of-memory error of any device (CUDA's own type; CPU and MPS raise RuntimeError). The one
    test of it: callers of the engine catch `blended.errors.OutOfMemory`, which `Editor.edit` raises."""
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and (
        "can't allocate memory" in str(e) or "out of memory" in str(e).lower()))


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


@dataclass
class _Run:
    """The state of one edit call: what it was asked, its progress and timings (never on the Editor)."""

    cfg: EditConfig
    prompt: str
    source: Image.Image  # the upload, full resolution
    masks: EditMasks
    report: Progress
    should_stop: ShouldStop
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    clock: float = field(default_factory=time.perf_counter)
    # set by the stages
    region: Optional[Region] = None
    image: Optional[Image.Image] = None  # the region at work size
    work: Optional[WorkMasks] = None
    x_source: Optional[torch.Tensor] = None  # (1, 3, h, w) in [-1, 1]
    x_fill: Optional[torch.Tensor] = None  # `remove`: the pre-filled region (1, 3, h, w) in [-1, 1]
    flagged: list[bool] = field(default_factory=list)  # per candidate: the safety checker flagged it
    decoding: Optional[Decoding] = None  # what decodes the candidates (EditConfig.decode)
    crop: Optional[tuple[int, int, int, int]] = None  # the latent box the composite reads, where a crop decodes less
    encode_hits: int = 0  # encodes served by the model's encode cache

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self.clock
        self.clock = now

    @property
    def seeds(self) -> list[int]:
        return [self.cfg.seed + i for i in range(self.cfg.num_candidates)]


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

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> (B, 3, H, W) images in [-1, 1] (`LoadedModel.decode`)."""
        return self.model.decode(latents)

    def read_masks(self, mask: ImageLike | EditMasks, size: tuple[int, int], config: EditConfig) -> EditMasks:
        """`mask` read once and prepared for an edit of an image of `size` with `config` (`EditMasks.read`)."""
        return EditMasks.read(mask, size, config, max_pixels=self.max_pixels)

    def check_inputs(self, image: ImageLike, mask: ImageLike | EditMasks, prompt: str,
                     cfg: EditConfig) -> tuple[Image.Image, EditMasks, str]:
        """Settings, prompt, image and mask checked and read, each once: (source, masks, prompt); InputError
        naming the first thing wrong."""
        cfg.checked()
        train_steps = int(getattr(self.model.pipe.scheduler.config, "num_train_timesteps", 1000))
        if cfg.num_inference_steps >= train_steps:
            raise InputError(f"num_inference_steps must be below the model's {train_steps} training timesteps")
        if not isinstance(prompt, str) or not (prompt.strip() or cfg.remove):  # a removal needs no prompt
            raise InputError("the prompt is empty: describe what should appear inside the mask")
        source = load_image(image, max_pixels=self.max_pixels)
        return source, self.read_masks(mask, source.size, cfg), prompt.strip()

    # -- the edit --------------------------------------------------------------------------------

    def edit(self, image: ImageLike, mask: ImageLike | EditMasks, prompt: str, config: Optional[EditConfig] = None,
             *, progress: Optional[Progress] = None, should_stop: ShouldStop = None,
             preview: Optional[Preview] = None, preview_every: int = 1, **overrides: Any) -> EditResult:
        """Edit `image` inside `mask` to show `prompt`; everything outside the mask is kept.

        Args:
            image: the source, any size and aspect ratio (path, bytes, PIL image or array).
            mask: same size as `image`; white or opaque pixels (above `config.mask_threshold`) are
                edited, black or transparent ones kept (`invert_mask` swaps them). Or an `EditMasks` read
                for this image with the edit's mask settings (`Editor.read_masks`).
            prompt: what should appear inside the mask; with `config.remove`, what the region should look like
                once the object is gone (may be empty; `blended.remove`).
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
        cfg = (config or self.defaults).replace(**overrides)
        source, masks, prompt = self.check_inputs(image, mask, prompt, cfg)
        run = _Run(cfg, prompt, source, masks, progress or (lambda stage, done, total: None), should_stop)
        try:
            return self._edit(run, preview, max(1, int(preview_every)))
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not is_out_of_memory(e):
                raise
            _release_memory()
            raise OutOfMemory("out of memory during the edit: use fewer candidates, a smaller batch size "
                              "or a smaller image") from None

    @torch.no_grad()
    def _edit(self, run: _Run, preview: Optional[Preview], preview_every: int) -> EditResult:
        self._inputs(run)  # 1.
        z_init, cond = self._encode(run)  # 2.
        timesteps, masks, cond = self._latent_masks(run, cond)  # 3.
        if run.cfg.remove:  # the loop starts from (and blends with) the hole pre-filled from its surroundings
            z_init, run.x_fill = prefilled(self.model, run.image, run.work.support, z_init, masks[-1], run.cfg)
        latents, decoded, stats = self._denoise(run, z_init, cond, masks, timesteps, preview, preview_every)  # 4-5.
        decoded = self._background(run, latents, decoded, stats)  # 6.
        candidates = self._composite(run, decoded)  # 7.
        if run.cfg.rank and self.ranker is not None and len(candidates) > 1:  # 8.
            run.report("ranking", 0, 1)
            ranker = removal_ranker(self.ranker, run.source, run.cfg)  # a removal: how little object is left
            self.rank(candidates, run.masks.target, run.prompt, run.notes, ranker)
            run.lap("rank")
        candidates.sort(key=lambda c: c.filtered)  # stable: flagged candidates go last, the order stays
        run.timings["total"] = sum(run.timings.values())
        run.timings["encode_cached"] = float(run.encode_hits)  # encodes the model's cache served (not seconds)
        run.report("done", 1, 1)
        return EditResult(candidates=candidates, prompt=run.prompt, config=run.cfg, model=self.model.name,
                          timings=run.timings, region=run.region, notes=run.notes,
                          model_info={**self.model.describe(), "recommended": dict(self.recommended)})

    # -- stages ----------------------------------------------------------------------------------

    def _inputs(self, run: _Run) -> None:
        """1. The region to edit at work size: the source and the masks cropped and resized to it."""
        m, cfg = self.model, run.cfg
        run.report("encoding", 0, 1)
        support = run.masks.support
        run.region = plan_region(run.source.size, support, native=m.native_size, multiple=m.size_multiple,
                                 margin=max(cfg.crop_margin, cfg.feather + 1), resolution=cfg.resolution)
        run.image = crop_image(run.source, run.region)
        run.work = run.masks.at_work(run.region)
        run.notes += self._prompt_notes(run.prompt)
        run.lap("prepare")
        self._decoding(run)

    def _decoding(self, run: _Run) -> None:
        """What decodes the candidates (`decode`, `blended.codec.decoding_for`) and the latent box a crop decode
        covers, where the decoder is conv-only and the composite reads only the mask's box and seam band."""
        run.decoding = decoding_for(self.model, run.cfg, run.notes)
        if run.decoding.name != "full":
            run.lap("load decoder")
        run.crop = composite_crop(run.decoding, run.cfg, run.masks, run.region, self.model.vae_scale_factor)

    def _encode(self, run: _Run) -> tuple[torch.Tensor, Conditioning]:
        """2. z_init, the source's latents (1, C, h/f, w/f), from the model's encode cache where the same pixels
        were encoded before, and the text conditions."""
        m, cfg = self.model, run.cfg
        run.x_source = _to_tensor(run.image).to(m.device)  # (1, 3, H, W)
        z_init = self._encode_cached(run, run.x_source)
        cond = conditions(m, run.prompt, cfg.negative_prompt, cfg.guidance_scale, run.region.work_size)
        run.lap("encode")
        return z_init, cond

    def _encode_cached(self, run: _Run, x: torch.Tensor) -> torch.Tensor:
        """`x` (work-size pixels of `run.region`) encoded, or its latents from the model's encode cache."""
        z, hit = self.model.encode_cached(x, (run.region.box, run.region.work_size))
        run.encode_hits += hit
        return z

    def _latent_masks(self, run: _Run, cond: Conditioning) -> tuple[Any, list[torch.Tensor], Conditioning]:
        """3. The timesteps after `blend_start` and one latent mask per step (soft thresholds, shrinking, the
        core); a 9-channel UNet's conditioning gets the mask and the masked source (cached like the source)."""
        m, cfg, work = self.model, run.cfg, run.work
        timesteps = schedule(m.pipe, cfg.scheduler, cfg.num_inference_steps, loop_start(cfg))[2]
        z_mask = latent_strength(work.strength, m.vae_scale_factor, cfg.latent_mask_mode)  # (1, 1, h, w)
        if not z_mask.any():  # "core" of a mask too thin to have one
            z_mask = latent_strength(work.strength, m.vae_scale_factor, "any")
        z_core = latent_strength(work.strength * work.target, m.vae_scale_factor, "core")  # wholly inside the target
        masks = mask_schedule(z_mask.to(m.device, m.dtype), len(timesteps), cfg.shrink_kernels, cfg.shrink,
                              z_core.to(m.device, m.dtype), cfg.core_steps)
        cond = inpaint_conditioning(m, cond, lambda x: self._encode_cached(run, x), run.x_source, work.support,
                                    z_mask, cfg)
        run.lap("encode")
        return timesteps, masks, cond

    def _denoise(self, run: _Run, z_init: torch.Tensor, cond: Conditioning, masks: list[torch.Tensor], timesteps: Any,
                 preview: Optional[Preview], every: int) -> tuple[torch.Tensor, torch.Tensor, Optional[dict]]:
        """4-5. The blending loop, `batch_size` candidates at a time, each chunk decoded as it ends; the decoder's
        GroupNorm statistics recorded during that decode when the background method needs them."""
        from .background import DecodeStats, get_method

        m, cfg = self.model, run.cfg
        seeds = run.seeds
        if prefill_only(cfg):  # `remove_strength` 0: the pre-fill is every candidate, no loop, no decode
            return None, run.x_fill.expand(len(seeds), -1, -1, -1), None
        chunks = [seeds[i:i + cfg.batch_size] for i in range(0, len(seeds), cfg.batch_size)]
        stats = DecodeStats(m.pipe.vae) if get_method(cfg.background).needs_stats else None
        previewer = None
        if preview is not None:  # x0 estimates -> RGB by a linear map fitted once per VAE (no decode)
            from .preview import Previewer, latent_rgb_map

            previewer = Previewer(latent_rgb_map(m.pipe.vae, m.encode, m.vae_scale_factor), run.image,
                                  run.work.support, decode=run.decoding.decode if run.decoding.name == "tiny" else None)
        latents_all, decoded_all = [], []
        for c, chunk in enumerate(chunks):
            done = c * len(timesteps)
            show = None if previewer is None else \
                (lambda i, x0, done=done: preview(done + i, len(timesteps) * len(chunks), previewer(x0)))
            latents = self._loop(run, chunk, z_init, cond, masks, timesteps, done, len(chunks), show, every)
            run.lap("denoise")
            run.report("decoding", c, len(chunks))
            latents_all.append(latents)
            if stats is None:
                decoded_all.append(self._decode(run, latents))
            else:
                with stats:
                    decoded_all.append(m.decode(latents))
            run.lap("decode")
        latents = torch.cat(latents_all)
        return latents, torch.cat(decoded_all), None if stats is None else stats.stats(latents.shape[0])

    def _decode(self, run: _Run, latents: torch.Tensor) -> torch.Tensor:
        """5. Candidates' latents -> (B, 3, H, W) in [-1, 1] with the run's decoder: only the composite's box
        (the source around it) where `run.crop` is set, else the whole frame."""
        if run.crop is None:
            return run.decoding.decode(latents)
        return decode_box(run.decoding, latents, run.crop, run.x_source.float(), self.model.vae_scale_factor)

    def _loop(self, run: _Run, seeds: list[int], z_init: torch.Tensor, cond: Conditioning,
              masks: list[torch.Tensor], timesteps: Any, done: int, num_chunks: int,
              show: Optional[Callable[[int, torch.Tensor], None]], every: int) -> torch.Tensor:
        """4. One chunk of candidates through `blend_loop` (paper Alg. 1) with its own scheduler state and noise
        drawn from each candidate's seed on the CPU, so a seed gives the same images on every device."""
        from .preview import predicted_x0

        m, cfg = self.model, run.cfg
        sched, noiser, _ = schedule(m.pipe, cfg.scheduler, cfg.num_inference_steps, loop_start(cfg), m.device)
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]

        def draw() -> torch.Tensor:  # (B, C, h, w)
            return torch.cat([torch.randn(z_init.shape[1:], generator=g)[None] for g in generators]).to(m.device, m.dtype)

        noise = draw()
        denoise = make_denoise(m.pipe.unet, sched, cond.repeat(len(seeds)), cfg.guidance_scale)
        kw = step_kwargs(cfg.scheduler, generators, cfg.tcd_gamma)  # LCM, TCD, Euler-a draw noise in `step`
        x0 = [None]  # the last step's clean-latent estimate, kept only for the preview

        def step(noise_pred, t, latents):
            if show is None:
                return sched.step(noise_pred, t, latents, return_dict=False, **kw)[0]
            out = sched.step(noise_pred, t, latents, **kw)
            x0[0] = predicted_x0(out, sched, noise_pred, t, latents)
            return out.prev_sample

        def on_step(i, t, latents):
            run.report("denoising", done + i + 1, len(timesteps) * num_chunks)
            if show is not None and (i + 1) % every == 0 and i + 1 < len(timesteps):
                show(i + 1, x0[0])

        return blend_loop(denoise, step, noiser.add_noise, z_init, noise, masks, timesteps, start=cfg.start_from,
                          fresh_noise=(lambda i: draw()) if cfg.background_noise == "fresh" else None,
                          background_timestep=cfg.background_timestep, on_step=on_step, should_stop=run.should_stop)

    def _background(self, run: _Run, latents: torch.Tensor, decoded: torch.Tensor,
                    stats: Optional[dict]) -> torch.Tensor:
        """6. The safety checker, then background reconstruction at work size (paper §4.2), leaving the final
        stitch to the full-resolution composite (7.). A method that runs out of memory and declares a fallback
        leaves the candidates as they are (the composite then is `stitch`) and a note says so."""
        from .background import get_method, reconstruct

        cfg, method = run.cfg, get_method(run.cfg.background)
        run.flagged = self._safety(decoded) if cfg.safety_checker else [False] * len(run.seeds)
        run.lap("safety")
        pixel_mask = torch.from_numpy(run.work.support.astype(np.float32))[None, None].to(self.model.device)
        if method.keeps_outside and latents is not None:  # None: the pre-fill alone, the source outside already
            run.report("reconstructing", 0, 1)
            try:
                decoded = reconstruct(cfg.background, vae=self.model.pipe.vae, latents=latents, decoded=decoded,
                                      source=run.x_source.float(), mask=pixel_mask, config=cfg,
                                      composite=not cfg.exact_outside, stats=stats,
                                      progress=lambda done, total: run.report("reconstructing", done, total),
                                      should_stop=run.should_stop)
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not (method.memory_fallback and is_out_of_memory(e)):
                    raise
                _release_memory()
                run.notes.append(f"background '{cfg.background}' ran out of memory at "
                                 f"{tuple(decoded.shape[-2:])[::-1]} work pixels; the edit used "
                                 f"'{'stitch' if cfg.exact_outside else 'none'}' instead (a smaller mask or "
                                 "`resolution` fits in less memory)")
            run.lap("background")
        blank = run.x_source.float() * (1 - pixel_mask)  # a filtered candidate keeps the source, its edit blanked
        return torch.stack([blank[0] if f else d for d, f in zip(decoded, run.flagged)])

    def _composite(self, run: _Run, decoded: torch.Tensor) -> list[Candidate]:
        """7. Back to full resolution: the edit inside the mask and its seam band (`feather` source pixels, or a
        soft mask's strengths), the upload itself, bit for bit, beyond (`none`: the decode over the region)."""
        from .background import get_method

        cfg, region = run.cfg, run.region
        if get_method(cfg.background).keeps_outside and cfg.exact_outside:
            weights = run.masks.composite_weights(region, cfg.feather)  # (h, w), in the upload's own pixels
            images = [composite(run.source, im, region, weights) for im in _to_pil(decoded)]
        else:
            images = [paste_back(run.source, im, region, cfg.feather) for im in _to_pil(decoded)]
        run.lap("paste")
        return [Candidate(image=im, seed=s, filtered=f) for im, s, f in zip(images, run.seeds, run.flagged)]

    # -- helpers ---------------------------------------------------------------------------------

    def _prompt_notes(self, prompt: str) -> list[str]:
        tok = self.model.pipe.tokenizer
        with TOKENIZER_LOCK:  # not while another edit's encode_prompt has set the shared tokenizer's padding
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

    def rank(self, candidates: list[Candidate], mask: np.ndarray, prompt: str, notes: list[str],
             ranker: Any = None) -> None:
        """Score `candidates` with `ranker` (default the Editor's) on `mask` ((H, W) bool, the asked region) and sort
        them best first, in place. A ranker that cannot load leaves the seed order and adds a note (an edit beats
        no edit)."""
        try:
            all_scores = (ranker or self.ranker).score([c.image for c in candidates], mask, prompt)
        except ModelLoadError as e:
            notes.append(f"ranking skipped: {e}")
            return
        for cand, scores in zip(candidates, all_scores):
            cand.scores = scores
        candidates.sort(key=lambda c: -c.scores["score"])
