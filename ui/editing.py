"""What the UI needs between gradio's values and `Editor.edit`, without gradio: masks from painted
layers, settings to an `EditConfig` within the deployment's limits, captions, output files, Stop."""

from __future__ import annotations

import dataclasses
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
from PIL import Image

from blended import Candidate, EditConfig, InputError
from blended.background import METHODS, PRESERVE_METHOD, get_method
from blended.config import DECODES, coerce
from blended.images import load_image

from .limits import Limits

PAINT_ALPHA = 32  # a layer pixel with at least this alpha (of 255) is painted: part of the mask
EXTRA_SETTINGS = ("randomize_seed", "preserve_background", "fast_decode")  # settings of the UI that are not EditConfig fields
CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(EditConfig)}
NEW_SEED_RANGE = 2**31  # randomized seeds are drawn from [0, NEW_SEED_RANGE)


# -- image and mask -----------------------------------------------------------------------------

def mask_from_layers(layers: Iterable[Image.Image], size: tuple[int, int]) -> Image.Image:
    """The painted area of an image editor: the union of the layers' alpha, as an 'L' image (255 = edit).

    The colour of the strokes does not matter, only where they are; `size` is the background's (w, h).
    """
    mask = np.zeros((size[1], size[0]), bool)
    for layer in layers:
        if layer.size != tuple(size):
            raise InputError(f"a painted layer is {layer.size[0]}x{layer.size[1]} but the image is "
                             f"{size[0]}x{size[1]}; paint on the uploaded image without resizing it")
        if "A" not in layer.getbands():
            raise InputError("a painted layer has no transparency; the mask is read from its alpha channel")
        mask |= np.asarray(layer.getchannel("A")) >= PAINT_ALPHA
    return Image.fromarray(mask.astype(np.uint8) * 255, "L")


def editor_inputs(value: Optional[dict], limits: Limits) -> tuple[Image.Image, Image.Image]:
    """(source RGB, mask L) from a `gr.ImageEditor` value of PIL images (background + painted layers)."""
    background = (value or {}).get("background")
    if background is None:
        raise InputError("upload an image first")
    source = checked_image(background, limits)
    mask = mask_from_layers(value.get("layers") or [], source.size)
    if not np.asarray(mask).any():
        raise InputError("the mask is empty: paint over the region to edit with the brush")
    return source, mask


def checked_image(src: Any, limits: Limits) -> Image.Image:
    """The source as RGB (EXIF applied, transparency on white), refused above `limits.max_pixels`."""
    return load_image(src, max_pixels=limits.max_pixels)


# -- settings -----------------------------------------------------------------------------------

def server_defaults(defaults: EditConfig, limits: Limits) -> EditConfig:
    """The model's defaults brought within this server's limits (what an edit gets when it names nothing): the
    candidates, the denoising steps and each background method's optimisation steps (`steps_setting`)."""
    steps = {m.steps_setting for m in METHODS.values() if m.steps_setting} | {"num_inference_steps"}
    return defaults.replace(num_candidates=min(defaults.num_candidates, limits.max_candidates),
                            decode=limits.decode or defaults.decode,
                            **{name: min(getattr(defaults, name), limits.max_steps) for name in sorted(steps)})


def settings_to_config(defaults: EditConfig, settings: Optional[dict], limits: Limits,
                       rng: Optional[random.Random] = None) -> EditConfig:
    """An EditConfig from `defaults` and the UI's / API's `settings` (EditConfig field names, plus
    `randomize_seed` and `preserve_background`), coerced and checked by `EditConfig.from_json`, then against
    this server's `limits`.

    `randomize_seed` true draws a new seed (the returned config holds it); `preserve_background`
    true means background reconstruction by decoder fine-tuning.
    """
    if settings is not None and not isinstance(settings, dict):
        raise InputError("settings must be a JSON object of setting names and values")
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(CONFIG_FIELDS) - set(EXTRA_SETTINGS))
    if unknown:
        raise InputError(f"unknown setting(s) {', '.join(unknown)}; known: "
                         f"{', '.join(list(CONFIG_FIELDS) + list(EXTRA_SETTINGS))}")
    extras = {name: settings.pop(name, None) for name in EXTRA_SETTINGS}
    extras = {name: coerce(name, value, False) for name, value in extras.items() if value is not None}
    cfg = EditConfig.from_json(settings, base=defaults)
    if extras.get("randomize_seed"):
        cfg = cfg.replace(seed=(rng or random.SystemRandom()).randrange(NEW_SEED_RANGE))
    if extras.get("preserve_background"):
        cfg = cfg.replace(background=PRESERVE_METHOD)
    if "fast_decode" in extras:  # the app's "Fast decode" checkbox: the tiny decoder, or the full one
        cfg = cfg.replace(decode="tiny" if extras["fast_decode"] else "full")
    return within_limits(cfg, limits)


def within_limits(cfg: EditConfig, limits: Limits) -> EditConfig:
    """`cfg` when this server runs it (candidates, steps, resolution, a background method's own steps); else
    InputError saying what the server allows."""
    if cfg.num_candidates > limits.max_candidates:
        raise InputError(f"{cfg.num_candidates} candidates asked; this server makes at most "
                         f"{limits.max_candidates} per edit")
    if cfg.decode not in DECODES:
        raise InputError(f"decode '{cfg.decode[:80]}' asked; this server decodes with full or tiny (a path would "
                         "name a file on the server)")
    if cfg.num_inference_steps > limits.max_steps:
        raise InputError(f"{cfg.num_inference_steps} steps asked; this server runs at most {limits.max_steps}")
    if cfg.resolution > limits.max_resolution:
        raise InputError(f"resolution {cfg.resolution} asked; this server works regions at most "
                         f"{limits.max_resolution} px on their shorter side")
    name = get_method(cfg.background).steps_setting  # e.g. decoder_steps: the method's optimisation steps
    if name is not None and getattr(cfg, name) > limits.max_steps:
        raise InputError(f"{name} {getattr(cfg, name)} asked; this server runs at most {limits.max_steps} steps")
    return cfg


def edit_config(editor: Any, settings: Optional[dict], limits: Limits,
                rng: Optional[random.Random] = None) -> EditConfig:
    """The settings of one edit on `editor`: the model in use's defaults, brought within `limits`, plus what the
    user changed (`settings`). Read when the edit starts: a model loaded since brings its own defaults."""
    return settings_to_config(server_defaults(editor.defaults, limits), settings, limits, rng)


# -- results ------------------------------------------------------------------------------------

def caption(rank: int, candidate: Candidate) -> str:
    """'#1 · score 0.312 · seed 42' (no score when the candidates were not ranked; the mask's label when the
    edit tried several)."""
    parts = [f"#{rank}"]
    score = candidate.scores.get("score")
    if score is not None:
        parts.append(f"score {score:.3f}")
    parts.append(f"seed {candidate.seed}")
    if candidate.mask:
        parts.append(candidate.mask)
    if candidate.filtered:
        parts.append("filtered by the safety checker")
    return " · ".join(parts)


def progress_label(stage: str, done: int, total: int) -> str:
    """The name shown beside the progress bar: 'denoising 3/20', 'decoding', ..."""
    return f"{stage} {done}/{total}" if stage == "denoising" else stage


class OutputDir:
    """A temporary folder with one sub-folder of full-resolution PNGs per edit; old ones are pruned."""

    def __init__(self, keep_seconds: float = 3600.0, root: Optional[Path] = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="blended-ui-"))
        self.keep_seconds = keep_seconds

    def save(self, source: Image.Image, candidates: list[Candidate],
             pnginfo: Optional[list] = None) -> tuple[str, list[str]]:
        """Write source.png and rank<i>-seed<s>.png (each with its `pnginfo`, e.g. `blended.pnginfo.png_info`: the
        parameters that made it); return their paths."""
        self.prune()
        folder = Path(tempfile.mkdtemp(dir=self.root))
        source_path = folder / "source.png"
        source.save(source_path, format="PNG")
        paths = []
        for i, cand in enumerate(candidates):
            path = folder / f"rank{i + 1}-seed{cand.seed}.png"
            cand.image.save(path, format="PNG", pnginfo=pnginfo[i] if pnginfo else None)
            paths.append(str(path))
        return str(source_path), paths

    def prune(self) -> None:
        """Delete the edits older than `keep_seconds`."""
        limit = time.time() - self.keep_seconds
        for folder in self.root.glob("*"):
            if folder.is_dir() and folder.stat().st_mtime < limit:
                shutil.rmtree(folder, ignore_errors=True)


class StopSwitch:
    """Per-request stop flags: each running edit registers an Event under its session; Stop sets them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, set[threading.Event]] = {}

    def start(self, session: str) -> threading.Event:
        event = threading.Event()
        with self._lock:
            self._running.setdefault(session, set()).add(event)
        return event

    def finish(self, session: str, event: threading.Event) -> None:
        with self._lock:
            events = self._running.get(session, set())
            events.discard(event)
            if not events:
                self._running.pop(session, None)

    def stop(self, session: str) -> int:
        """Ask every edit of `session` to stop; return how many were running."""
        with self._lock:
            events = list(self._running.get(session, ()))
        for event in events:
            event.set()
        return len(events)


# -- the workspace: brush size, mask layers, extending the canvas, edit history --------------------

BRUSH_FRACTION = 20  # the brush's radius on a new image: its shorter side / BRUSH_FRACTION ...
BRUSH_RANGE = (2, 96)  # ... clamped to these radii, in image pixels
MASK_RGBA = (255, 0, 255, 140)  # how a mask is drawn as an editor layer: translucent magenta, like the brush
SIDES = ("left", "right", "top", "bottom")


def brush_radius(size: tuple[int, int]) -> int:
    """The default brush radius for an image of `size` (w, h): about 1/20 of its shorter side, clamped."""
    lo, hi = BRUSH_RANGE
    return int(min(hi, max(lo, round(min(size) / BRUSH_FRACTION))))


def mask_layer(mask: np.ndarray) -> Image.Image:
    """An (H, W) bool mask as an RGBA editor layer: translucent magenta where True, transparent elsewhere."""
    layer = np.zeros(mask.shape + (4,), np.uint8)
    layer[mask] = MASK_RGBA
    return Image.fromarray(layer, "RGBA")


def extension(size: tuple[int, int], percent: float, sides: Iterable[str]) -> dict[str, int]:
    """Pixels to add on each side: `percent` of the image's width (left/right) or height (top/bottom)."""
    sides = list(sides or [])
    unknown = [s for s in sides if s not in SIDES]
    if unknown or not sides:
        raise InputError(f"choose the sides to extend among {', '.join(SIDES)}")
    if not 0 < percent <= 200:
        raise InputError(f"extend by more than 0% and at most 200% of the image, not {percent}%")
    w, h = size
    return {s: (max(1, round(w * percent / 100)) if s in ("left", "right") else max(1, round(h * percent / 100)))
            if s in sides else 0 for s in SIDES}


def extend_canvas(image: Image.Image, layers: Iterable[Image.Image], pad: dict[str, int],
                  max_pixels: Optional[int] = None) -> tuple[Image.Image, Image.Image]:
    """Grow `image` by `pad` pixels per side for outpainting: (new RGB image, mask layer).

    The new area is filled with the image's edge colours, smeared outwards and blurred (a neutral start the
    model paints over), and becomes the mask; what was painted before moves with the image and stays masked.
    """
    from PIL import ImageFilter

    source = image.convert("RGB")
    w, h = source.size
    l, r, t, b = (pad.get(s, 0) for s in SIDES)
    nw, nh = w + l + r, h + t + b
    if max_pixels is not None and nw * nh > max_pixels:
        raise InputError(f"the extended image would be {nw}x{nh} pixels; this server edits at most "
                         f"{max_pixels} pixels: extend by less")
    a = np.asarray(source)
    filled = np.pad(a, ((t, b), (l, r), (0, 0)), mode="edge")
    radius = max(2, max(l, r, t, b) // 3)
    blurred = Image.fromarray(filled).filter(ImageFilter.GaussianBlur(radius))
    out = np.array(blurred)
    out[t:t + h, l:l + w] = a  # the picture itself stays exactly as it was
    old = mask_from_layers(list(layers or []), (w, h)) if layers else Image.new("L", (w, h), 0)
    mask = np.ones((nh, nw), bool)
    mask[t:t + h, l:l + w] = np.asarray(old) > 0
    return Image.fromarray(out), mask_layer(mask)


def image_digest(path: str) -> str:
    """A short fingerprint of an image's pixels (the same picture saved twice has the same digest)."""
    import hashlib

    with Image.open(path) as im:
        rgb = im.convert("RGB")
        return hashlib.sha1(repr(rgb.size).encode() + rgb.tobytes()).hexdigest()[:16]


def continue_history(history: Optional[list], source_path: str, candidate_path: str, prompt: str) -> list:
    """A session's edit history after continuing from a candidate: the edit's source is added first when it is
    not a version already there (a new upload), then the candidate. Entries: path, label, digest."""
    history = list(history or [])
    digest = image_digest(source_path)
    if all(v["digest"] != digest for v in history):
        history.append({"path": source_path, "label": "original" if not history else f"{len(history) + 1}: upload",
                        "digest": digest})
    history.append({"path": candidate_path, "label": f"{len(history) + 1}: {prompt.strip() or 'edit'}",
                    "digest": image_digest(candidate_path)})
    return history
