"""CLIP ranking of candidates with open_clip: the paper's masked-image score plus a crop and a whole-image view.

Blended Latent Diffusion generates several candidates per edit and ranks them with CLIP; the paper scores
each candidate with the background blanked out (`local`). We add two views: a square crop around the mask
with some context (`crop`, so a small mask is not a speck in CLIP's 224-pixel view) and the whole edited
image (`global`). `score` is their weighted sum (WEIGHTS); see docs/ranking.md for why.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .errors import ModelLoadError
from .models import ASSETS

DEFAULT_CLIP = ("ViT-B-16", "openai")  # the paper's ranking model
DEMO_MODEL = ASSETS / "demo"
DEMO_FAST = ASSETS / "demo-fast"  # the demo model distilled to few steps (tools/train_fast.py): the same world
DEMO_RANKER = ASSETS / "demo_ranker"  # open_clip_config.json + open_clip_model.safetensors (tools/train_demo.py)
RANKER_SUFFIX = "_ranker"  # a model folder `X` may bring its own ranker folder `X_ranker` next to it

WEIGHTS = {"local": 0.4, "crop": 0.4, "global": 0.2}  # parts of the combined `score` (cosines, so in [-1, 1])
CROP_CONTEXT = 0.25  # crop margin on each side, as a fraction of the mask box's longer side
CROP_MIN_SIDE = 32  # pixels; the crop is at least this wide (where the image is)
GREY = (128, 128, 128)  # `masked_view`'s default fill; a Ranker fills with its own normalisation mean
MAX_BATCH = 32  # views per image-encoder forward
TEXT_CACHE_SIZE = 64  # prompts whose text embedding is kept
RETRY_AFTER_S = 60.0  # a failed load is not retried (every call re-raises it) for this long


# -- views ----------------------------------------------------------------------------------------

def _bool_mask(mask: Any, size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool array from a bool/0-1 array or an 'L'/'1' PIL image (>= 128 = edited); checks the size."""
    if isinstance(mask, Image.Image):
        a = np.asarray(mask.convert("L")) >= 128
    else:
        a = np.asarray(mask)
        a = a if a.dtype == bool else a > (127 if a.dtype == np.uint8 else 0.5)
    if a.ndim != 2 or a.shape != (size[1], size[0]):
        raise ValueError(f"the mask is {a.shape[::-1]} but the image is {size}; they must be the same size")
    return a


def crop_box(mask: Any, context: float = CROP_CONTEXT, min_side: int = CROP_MIN_SIDE) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) box `crop_view` cuts, right/bottom exclusive.

    A square centred on the bounding box of the mask's True pixels, of side
    `max(box_w, box_h) + 2 * ceil(context * max(box_w, box_h))` (at least `min_side`), shifted to lie inside
    the image; a side longer than the image's is clamped to it (then the box is not square). The box always
    contains the whole bounding box. An empty mask gives the whole image.
    """
    a = np.asarray(mask, dtype=bool)
    h, w = a.shape
    rows, cols = np.flatnonzero(a.any(1)), np.flatnonzero(a.any(0))
    if rows.size == 0:
        return 0, 0, w, h
    l, t, r, b = int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
    longest = max(r - l, b - t)
    side = max(longest + 2 * math.ceil(context * longest), min_side)

    def place(lo: int, hi: int, extent: int) -> tuple[int, int]:
        s = min(side, extent)
        start = math.floor((lo + hi) / 2 - s / 2)
        start = min(max(start, hi - s, 0), lo, extent - s)  # contains [lo, hi) and stays inside [0, extent)
        return start, start + s

    x0, x1 = place(l, r, w)
    y0, y1 = place(t, b, h)
    return x0, y0, x1, y1


def masked_view(image: Image.Image, mask: Any, fill: Sequence[int] = GREY) -> Image.Image:
    """The paper's ranking view: `image` (same size, RGB) with every pixel outside the mask set to `fill`.

    Pixels where the mask is True are the image's own, unchanged; all others are exactly `fill`.
    """
    image = image.convert("RGB")
    keep = _bool_mask(mask, image.size)
    out = np.empty((image.height, image.width, 3), np.uint8)
    out[:] = np.asarray(fill, np.uint8)
    out[keep] = np.asarray(image)[keep]
    return Image.fromarray(out)


def crop_view(image: Image.Image, mask: Any, context: float = CROP_CONTEXT) -> Image.Image:
    """`image.crop(crop_box(mask, context))`: the edited region with its surroundings, pixels unchanged."""
    image = image.convert("RGB")
    return image.crop(crop_box(_bool_mask(mask, image.size), context))


def letterbox(image: Image.Image, fill: Sequence[int] = GREY) -> Image.Image:
    """Pad `image` to a square with `fill`, centred, so CLIP's centre crop keeps all of it."""
    w, h = image.size
    if w == h:
        return image
    s = max(w, h)
    out = Image.new("RGB", (s, s), tuple(int(c) for c in fill))
    out.paste(image, ((s - w) // 2, (s - h) // 2))
    return out


# -- the ranker -----------------------------------------------------------------------------------

def _short_reason(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    low = line.lower()
    if any(k in low for k in ("local cache", "offline", "cannot reach", "connection", "internet", "resolve host")):
        return "not cached and the hub cannot be reached"
    return line[:200]


class Ranker:
    """Scores edit candidates against their prompt with an open_clip model, loaded once on first use.

    One Ranker is shared by every request: loading happens under a lock on the first `score` call, the
    forward passes keep no per-request state.

    Args:
        model: an open_clip architecture name (`ViT-B-16`; see `open_clip.list_models()`), a folder holding
            `open_clip_config.json` and a weights file (what `tools/train_demo.py` writes), an
            `hf-hub:org/repo` id, or a custom config `.json` (open_clip's `{"model_cfg": ..., "preprocess_cfg": ...}`
            or a bare model config with `embed_dim`, `vision_cfg`, `text_cfg`).
        pretrained: with an architecture name, an open_clip tag (`openai`) or a checkpoint file; with a
            config `.json`, its weights file (required); ignored for folders and `hf-hub:` ids.
        device: `cuda`, `cpu`, ...; default: CUDA when available, else the CPU. fp16 on CUDA, else fp32.
        cache_dir: where hub downloads are cached (default: the hub's own cache).
    """

    def __init__(self, model: str = DEFAULT_CLIP[0], pretrained: Optional[str] = DEFAULT_CLIP[1], *,
                 device: Optional[str] = None, cache_dir: Optional[str] = None):
        self.model_name = str(model)
        self.pretrained = None if pretrained is None else str(pretrained)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cache_dir = cache_dir
        self._lock = threading.Lock()
        self._loaded: Optional[tuple[Any, Any, Any]] = None  # (model, preprocess, tokenizer)
        self._failure: Optional[tuple[ModelLoadError, float]] = None
        self._texts: OrderedDict[str, torch.Tensor] = OrderedDict()

    @property
    def name(self) -> str:
        """How messages name this ranker: `ViT-B-16/openai`, a folder, or `config.json + weights`."""
        p = Path(self.model_name)
        if p.suffix == ".json":
            return f"{self.model_name} + {self.pretrained}"
        if p.is_dir() or self.model_name.startswith(("hf-hub:", "local-dir:")) or not self.pretrained:
            return self.model_name
        return f"{self.model_name}/{self.pretrained}"

    def __repr__(self) -> str:
        state = "loaded" if self._loaded else "not loaded"
        return f"Ranker({self.name!r}, device={str(self.device)!r}, {state})"

    # loading

    def _create(self) -> tuple[Any, Any, Any]:
        import open_clip

        precision = "fp16" if self.device.type == "cuda" else "fp32"
        common = {"device": self.device, "precision": precision, "cache_dir": self.cache_dir}
        src = Path(self.model_name).expanduser()
        schema = self.model_name.startswith(("hf-hub:", "local-dir:"))
        if not schema and not src.exists() and ("/" in self.model_name or self.model_name.startswith((".", "~"))):
            raise ModelLoadError(f"CLIP ranker {self.name} could not be loaded: {self.model_name} does not exist")
        if schema or src.is_dir():
            ident = self.model_name if not src.is_dir() else f"local-dir:{src.resolve()}"
            if src.is_dir():
                if not (src / "open_clip_config.json").is_file():
                    raise ModelLoadError(f"CLIP ranker {self.name} could not be loaded: no open_clip_config.json "
                                         "in the folder")
                if not any(any(src.glob(pat)) for pat in ("*.safetensors", "*.bin", "*.pth")):
                    raise ModelLoadError(f"CLIP ranker {self.name} could not be loaded: no weights file "
                                         "(.safetensors, .bin, .pth) in the folder")
            model, preprocess = open_clip.create_model_from_pretrained(ident, **common)
            return model, preprocess, open_clip.get_tokenizer(ident, cache_dir=self.cache_dir)
        if src.suffix == ".json":
            if not src.is_file():
                raise ModelLoadError(f"CLIP ranker {self.name} could not be loaded: the config file does not exist")
            if not self.pretrained or not Path(self.pretrained).is_file():
                raise ModelLoadError(f"CLIP ranker {self.name} could not be loaded: a config .json needs its "
                                     "weights file as `pretrained`")
            raw = json.loads(src.read_text())
            model_cfg, pp = raw.get("model_cfg", raw), raw.get("preprocess_cfg", {})
            if not all(k in model_cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
                raise ModelLoadError(f"CLIP ranker {self.name} could not be loaded: the config has no "
                                     "embed_dim / vision_cfg / text_cfg")
            # open_clip builds custom architectures from its registry of named configs; register this one
            # under a name derived from its content (the same config always gets the same name)
            key = "blended-" + hashlib.sha1(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:12]
            open_clip.factory._MODEL_CONFIGS[key] = model_cfg
            model, preprocess = open_clip.create_model_from_pretrained(
                key, pretrained=self.pretrained, image_mean=pp.get("mean"), image_std=pp.get("std"),
                image_interpolation=pp.get("interpolation"), image_resize_mode=pp.get("resize_mode"), **common)
            return model, preprocess, open_clip.get_tokenizer(key)
        model, preprocess = open_clip.create_model_from_pretrained(self.model_name, pretrained=self.pretrained,
                                                                   **common)
        return model, preprocess, open_clip.get_tokenizer(self.model_name, cache_dir=self.cache_dir)

    def load(self) -> "Ranker":
        """Load the model now if it is not loaded yet (`score` does this itself); return self.

        Raises:
            ModelLoadError: one line naming the model and why; a failure is remembered for RETRY_AFTER_S
                seconds, during which calls re-raise it without trying again.
        """
        if self._loaded is not None:
            return self
        with self._lock:
            if self._loaded is not None:
                return self
            if self._failure is not None and time.monotonic() - self._failure[1] < RETRY_AFTER_S:
                raise self._failure[0]
            try:
                model, preprocess, tokenizer = self._create()
            except ModelLoadError as e:
                self._failure = (e, time.monotonic())
                raise
            except Exception as e:  # open_clip / hub / safetensors raise many kinds; the user needs one line
                err = ModelLoadError(f"CLIP ranker {self.name} could not be loaded: {_short_reason(e)}")
                self._failure = (err, time.monotonic())
                raise err from e
            model.eval().requires_grad_(False)
            self._loaded = (model, preprocess, tokenizer)
            self._failure = None
        return self

    @property
    def fill(self) -> tuple[int, int, int]:
        """The colour that blanks pixels: the model's normalisation mean, which preprocessing maps to 0."""
        model = self.load()._loaded[0]
        mean = model.visual.preprocess_cfg["mean"]
        return tuple(int(round(255 * m)) for m in mean)

    @property
    def image_size(self) -> int:
        """Side of the square CLIP input, in pixels (224 for ViT-B-16)."""
        size = self.load()._loaded[0].visual.preprocess_cfg["size"]
        return int(size if isinstance(size, int) else size[0])

    # embeddings

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Unit-norm image embeddings (N, D) on the CPU; each image is letterboxed, then open_clip-preprocessed."""
        model, preprocess, _ = self.load()._loaded
        fill = self.fill
        dtype = next(model.parameters()).dtype
        x = torch.stack([preprocess(letterbox(im.convert("RGB"), fill)) for im in images])  # (N, 3, S, S)
        out = [model.encode_image(x[i:i + MAX_BATCH].to(self.device, dtype), normalize=True).float().cpu()
               for i in range(0, len(x), MAX_BATCH)]
        return torch.cat(out) if out else torch.empty(0)

    @torch.inference_mode()
    def embed_text(self, prompt: str) -> torch.Tensor:
        """Unit-norm text embedding (D,) on the CPU, cached per prompt."""
        with self._lock:
            if prompt in self._texts:
                self._texts.move_to_end(prompt)
                return self._texts[prompt]
        model, _, tokenizer = self.load()._loaded
        emb = model.encode_text(tokenizer([prompt]).to(self.device), normalize=True)[0].float().cpu()
        with self._lock:
            self._texts[prompt] = emb
            while len(self._texts) > TEXT_CACHE_SIZE:
                self._texts.popitem(last=False)
        return emb

    # scoring

    def views(self, image: Image.Image, mask: Any) -> dict[str, Image.Image]:
        """The three images CLIP sees for one candidate, before letterboxing: `local`, `crop`, `global`."""
        image = image.convert("RGB")
        return {"local": masked_view(image, mask, self.fill), "crop": crop_view(image, mask), "global": image}

    def score(self, images: Sequence[Image.Image], mask: Any, prompt: str) -> list[dict[str, float]]:
        """Score candidates of one edit against `prompt`; higher is better.

        Args:
            images: the candidates, full-resolution RGB PIL images, all the size of `mask`.
            mask: (H, W) bool array, True = edited (a PIL 'L' image is read as >= 128 = edited).
            prompt: the edit's text prompt.

        Returns:
            One dict per image, in input order: `local` (cosine between the prompt and the image with
            everything outside the mask set to `self.fill`; the paper's score), `crop` (prompt vs the
            `crop_view` around the mask), `global` (prompt vs the whole image) and `score`, the WEIGHTS-weighted
            sum of the three.

        Raises:
            ModelLoadError: the CLIP model could not be loaded.
        """
        if not images:
            return []
        text = self.embed_text(prompt)  # (D,)
        views = [self.views(im, mask) for im in images]
        parts = ("local", "crop", "global")
        emb = self.embed_images([v[p] for p in parts for v in views])  # (3N, D), grouped by part
        cos = (emb @ text).view(len(parts), len(images))  # (3, N)
        results = []
        for i in range(len(images)):
            s = {p: float(cos[j, i]) for j, p in enumerate(parts)}
            s["score"] = sum(WEIGHTS[p] * s[p] for p in parts)
            results.append(s)
        return results


def ranker_for(model_source: str, device: Optional[str] = None) -> Optional[Ranker]:
    """The ranker that fits a loaded model (`LoadedModel.source`): not loaded until its first `score`.

    The bundled demo models (`assets/demo`, `assets/demo-fast`) get their own small ranker from `assets/demo_ranker`; any model
    folder `X` with a sibling folder `X_ranker` holding `open_clip_config.json` gets that one; everything
    else gets the paper's ViT-B-16/openai. (None would mean "no ranking"; no source gives that today.)
    """
    src = Path(model_source).expanduser()
    if src.resolve() in (DEMO_MODEL.resolve(), DEMO_FAST.resolve()):
        return Ranker(str(DEMO_RANKER), None, device=device)
    own = src.parent / (src.name + RANKER_SUFFIX)
    if src.is_dir() and (own / "open_clip_config.json").is_file():
        return Ranker(str(own), None, device=device)
    return Ranker(*DEFAULT_CLIP, device=device)
