"""Segment Anything (Kirillov et al. 2023) through transformers' SamModel: one image embedding per picture,
cached, then only the prompt encoder and mask decoder per click."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any, Optional

import numpy as np
import torch

from ..errors import ModelLoadError
from .prompts import Selection

DEFAULT_SAM = "facebook/sam-vit-base"  # the smallest SAM checkpoint (94 M parameters); listed in the README's preload_from_hub
CACHE_SIZE = 8  # image embeddings kept (SAM ViT: 256 x 64 x 64 floats, 4 MB each); BLENDED_SEGMENTER_CACHE changes it


def image_key(image: np.ndarray) -> str:
    """A fingerprint of an (H, W, 3) image's pixels: the embedding cache's key."""
    a = np.ascontiguousarray(image)
    return hashlib.sha1(repr(a.shape).encode() + a.tobytes()).hexdigest()


class EmbeddingCache:
    """A bounded, thread-safe least-recently-used map from image fingerprints to embeddings."""

    def __init__(self, size: int = CACHE_SIZE):
        self.size = max(1, int(size))
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> Any:
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


class SamSegmenter:
    """SAM from a hub id or a folder with a SamModel and its SamProcessor.

    Args:
        model, processor: a loaded `SamModel` and `SamProcessor` (`SamSegmenter.load` makes them).
        cache_size: image embeddings kept; a click on a cached image costs only the mask decoder.
    """

    multimask = True  # one click gives three masks (whole, part, sub-part), ranked by predicted IoU

    def __init__(self, model: Any, processor: Any, *, name: str = "sam", cache_size: int = CACHE_SIZE):
        self.model = model.eval()
        self.processor = processor
        self.name = name
        self.cache = EmbeddingCache(cache_size)
        self.device = next(model.parameters()).device

    def __repr__(self) -> str:
        return f"Segment Anything ({self.name})"

    @classmethod
    def load(cls, source: str = DEFAULT_SAM, *, device: Optional[str] = None, cache_size: int = CACHE_SIZE,
             local_files_only: Optional[bool] = None) -> "SamSegmenter":
        """Load SamModel + SamProcessor from a hub id or a folder; ModelLoadError (one line) when it cannot."""
        from transformers import SamModel, SamProcessor

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        kw = {} if local_files_only is None else {"local_files_only": local_files_only}
        try:
            model = SamModel.from_pretrained(source, **kw).to(device)
            processor = SamProcessor.from_pretrained(source, **kw)
        except Exception as e:  # noqa: BLE001  (hub, file and config errors alike become one line)
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelLoadError(f"cannot load the segmenter {source!r}: {reason[:200]}") from None
        return cls(model, processor, name=str(source), cache_size=cache_size)

    @torch.no_grad()
    def embed(self, image: np.ndarray) -> dict[str, Any]:
        """The image's embedding and sizes, from the cache or from one vision-encoder call."""
        key = image_key(image)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        inputs = self.processor(images=image if image.flags.writeable else image.copy(), return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, next(self.model.parameters()).dtype)
        entry = {"embeddings": self.model.get_image_embeddings(pixels),
                 "original_size": inputs["original_sizes"][0].tolist(),  # (h, w)
                 "reshaped_size": inputs["reshaped_input_sizes"][0].tolist()}  # (h, w) inside the padded square
        self.cache.put(key, entry)
        return entry

    @torch.no_grad()
    def select(self, image: np.ndarray, selection: Selection, num_masks: int = 1) -> list[np.ndarray]:
        """Up to `num_masks` (H, W) bool masks for `selection` on the (H, W, 3) uint8 RGB `image`, best first
        (SAM's predicted IoU). Several masks come only from a single click without a box (SAM's multimask
        output); positive clicks are label 1, negative ones label 0."""
        h, w = image.shape[:2]
        selection.check((w, h))
        entry = self.embed(image)
        (oh, ow), (rh, rw) = entry["original_size"], entry["reshaped_size"]
        scale = torch.tensor([rw / ow, rh / oh], dtype=torch.float32)
        kw: dict[str, Any] = {}
        if selection.points:
            kw["input_points"] = (torch.tensor(selection.points, dtype=torch.float32) * scale)[None, None].to(
                self.device)  # (1 image, 1 object, N points, 2)
            kw["input_labels"] = torch.tensor(selection.labels, dtype=torch.long)[None, None].to(self.device)
        if selection.box is not None:
            kw["input_boxes"] = (torch.tensor(selection.box, dtype=torch.float32).view(2, 2) * scale).view(
                1, 1, 4).to(self.device)  # (1 image, 1 box, 4)
        multimask = len(selection.points) == 1 and selection.box is None
        out = self.model(image_embeddings=entry["embeddings"], multimask_output=multimask, **kw)
        masks = self.processor.post_process_masks(out.pred_masks.cpu(), [[oh, ow]], [[rh, rw]])[0][0]  # (M, H, W)
        order = out.iou_scores[0, 0].float().cpu().argsort(descending=True).tolist()
        return [masks[i].numpy().astype(bool) for i in order[:max(1, num_masks)]]
