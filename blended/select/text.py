"""Masks from words (issue 29): CLIPSeg (Lüddecke & Ecker, "Image Segmentation Using Text and Image Prompts",
CVPR 2022) through transformers' `CLIPSegForImageSegmentation` gives a heatmap of what "the red circle" names; its
threshold is the text mask, which the click/box segmenter (SAM where loaded, GrabCut offline) then refines from the
heatmap's box and peak points."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..errors import InputError, ModelLoadError
from .prompts import Selection
from .tools import touching

DEFAULT_CLIPSEG = "CIDAS/clipseg-rd64-refined"  # CLIPSeg ViT-B/16, reduce dim 64, complex transposed convolution
# its main branch holds only a pickle (pytorch_model.bin), which is never loaded; the hub's safetensors conversion
# is the pull request refs/pr/5 ("Adding `safetensors` variant of this model"), pinned here at its commit
REVISIONS = {DEFAULT_CLIPSEG: "325a839908143a34b409ae6f2910fa015ea390e6"}
DEMO_TEXT_SEGMENTER = Path(__file__).resolve().parents[2] / "assets" / "demo_textseg"  # tools/train_textseg.py
PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
THRESHOLD = 0.5  # heatmap values (sigmoid of CLIPSeg's logits) at or above this are the text mask
MIN_PART = 0.1  # parts of the text mask smaller than this fraction of its largest part are dropped
MAX_PEAKS = 3  # the refinement's positive clicks: at most one per part of the text mask, largest parts first
BOX_PAD = 0.1  # the refinement's box: the text mask's bounding box padded by this fraction of its longer side (>= 2 px)
AGREE = 0.5  # the refined mask replaces the text mask when their IoU is at least this (else the refiner lost the object)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def check_safetensors(source: str) -> None:
    """ModelLoadError (one line) for a file, or a folder without .safetensors weights: a pickle is never loaded."""
    path = Path(source)
    if path.is_file():
        raise ModelLoadError(f"the text segmenter {source!r} is a file: give a folder (config.json, model.safetensors "
                             "and the processor's files) or a hub id")
    if path.is_dir() and not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for pattern in PICKLES for p in path.glob(pattern))
        why = (f"holds only pickle weights ({', '.join(pickles)}), which are never loaded (a pickle can run code): "
               "convert them to model.safetensors") if pickles else "has no model.safetensors"
        raise ModelLoadError(f"the text segmenter folder {source} {why}")


class TextSegmenter:
    """Selection by words: a CLIPSeg model, its processor, and the click/box segmenter that refines its mask.

    Args:
        model, processor: a loaded `CLIPSegForImageSegmentation` and `CLIPSegProcessor` (`TextSegmenter.load`).
        refiner: a segmenter of clicks and boxes (`SamSegmenter`, `GrabCutSegmenter`) or None (the text mask as is).
        threshold: heatmap values at or above it are the text mask.
    """

    multimask = False  # one mask per selection (the multi-mask ranking grows it instead)

    def __init__(self, model: Any, processor: Any, *, name: str = "clipseg", refiner: Any = None,
                 threshold: float = THRESHOLD):
        self.model = model.eval()
        self.processor = processor
        self.name = name
        self.refiner = refiner
        self.threshold = threshold
        self.device = next(model.parameters()).device

    def __repr__(self) -> str:
        refined = f", refined by {self.refiner!r}" if self.refiner is not None else ""
        return f"CLIPSeg ({self.name}){refined}"

    @classmethod
    def load(cls, source: str = DEFAULT_CLIPSEG, *, refiner: Any = None, device: Optional[str] = None,
             revision: Optional[str] = None, local_files_only: Optional[bool] = None,
             name: Optional[str] = None) -> "TextSegmenter":
        """CLIPSegForImageSegmentation + CLIPSegProcessor from a folder or a hub id (`ID@REVISION` picks a revision;
        DEFAULT_CLIPSEG its safetensors one), safetensors weights only; ModelLoadError (one line) when it cannot."""
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

        from ..models.loaded import first_line, quiet_loading

        if not Path(source).exists() and "@" in source and revision is None:
            source, _, revision = source.partition("@")
        check_safetensors(source)
        kw: dict[str, Any] = {"revision": revision or REVISIONS.get(source)}
        if local_files_only is not None:
            kw["local_files_only"] = local_files_only
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            with quiet_loading():
                model = CLIPSegForImageSegmentation.from_pretrained(source, use_safetensors=True, **kw).to(device)
                processor = CLIPSegProcessor.from_pretrained(source, **kw)
        except Exception as e:  # noqa: BLE001  (hub, file and config errors alike become one line)
            raise ModelLoadError(f"cannot load the text segmenter {source!r}: {first_line(e)}") from None
        return cls(model, processor, name=name or str(source), refiner=refiner)

    @torch.no_grad()
    def heatmap(self, image: np.ndarray, text: str) -> np.ndarray:
        """(H, W) float32 in [0, 1]: how much each pixel of the (H, W, 3) uint8 RGB `image` is what `text` names
        (CLIPSeg's logits at its input size, through a sigmoid, resized bilinearly to the image)."""
        inputs = self.processor(text=[text], images=[image if image.flags.writeable else image.copy()],
                                padding="max_length", truncation=True, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(next(self.model.parameters()).dtype)
        logits = self.model(**inputs).logits.float()  # (1, h, w); (h, w) where a version squeezes one image
        heat = torch.sigmoid(logits.reshape(-1, *logits.shape[-2:])[:1])[None]  # (1, 1, h, w)
        heat = torch.nn.functional.interpolate(heat, size=image.shape[:2], mode="bilinear", align_corners=False)
        return heat[0, 0].cpu().numpy()

    def text_mask(self, heat: np.ndarray, selection: Selection) -> np.ndarray:
        """The heatmap at the threshold, inside the selection's box (if any), without parts under MIN_PART of the
        largest and without the parts that hold a negative click (unless that would leave none: then the click
        is for the refiner, to cut part of the object away); (H, W) bool."""
        import cv2

        mask = heat >= self.threshold
        if selection.box is not None:
            l, t, r, b = selection.box
            inside = np.zeros_like(mask)
            inside[t:b, l:r] = True
            mask &= inside
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        if n > 2:
            areas = stats[1:, cv2.CC_STAT_AREA]
            keep = np.concatenate([[False], areas >= MIN_PART * areas.max()])
            mask = keep[labels]
        if selection.negative:
            kept = mask & ~touching(mask, list(selection.negative))
            mask = kept if kept.any() else mask
        return mask

    def refinement(self, heat: np.ndarray, mask: np.ndarray, selection: Selection) -> Selection:
        """The refiner's selection: the text mask's padded bounding box, a positive click in each of its largest
        parts (at the highest heat times depth inside the part), and the user's own clicks."""
        import cv2

        h, w = mask.shape
        ys, xs = np.nonzero(mask)
        pad = max(2, round(BOX_PAD * max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)))
        box = (max(0, xs.min() - pad), max(0, ys.min() - pad), min(w, xs.max() + 1 + pad), min(h, ys.max() + 1 + pad))
        depth = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 3)[1:-1, 1:-1]
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        parts = 1 + np.argsort(-stats[1:, cv2.CC_STAT_AREA])[:MAX_PEAKS]
        out = Selection(box=tuple(int(v) for v in box))
        for part in parts:
            score = np.where(labels == part, heat * depth, -1.0)
            y, x = np.unravel_index(int(score.argmax()), score.shape)
            out = out.add(int(x), int(y))
        for (x, y), label in zip(selection.points, selection.labels):
            out = out.add(x, y, positive=label == 1)
        return out

    def select(self, image: np.ndarray, selection: Selection, num_masks: int = 1) -> list[np.ndarray]:
        """One (H, W) bool mask of what `selection.text` names on the (H, W, 3) uint8 RGB `image`: the text mask,
        refined by the refiner where it agrees with it (IoU >= AGREE; else the text mask as is). The selection's
        box restricts where the words are looked for; its clicks go to the refiner (negative clicks also remove
        the text mask's parts under them). InputError when nothing reaches the threshold."""
        h, w = image.shape[:2]
        selection.check((w, h), words=True)
        if not selection.text:
            raise InputError("give the words that name the object, e.g. 'the red circle'")
        heat = self.heatmap(image, selection.text)
        mask = self.text_mask(heat, selection)
        if not mask.any():
            raise InputError(f"nothing in the picture matches {selection.text!r} (the text segmenter's heatmap "
                             f"reaches {float(heat.max()):.2f}, below its threshold {self.threshold:.2f}): try other "
                             "words, or click the object")
        return [self.refine(image, heat, mask, selection)]

    def refine(self, image: np.ndarray, heat: np.ndarray, mask: np.ndarray, selection: Selection) -> np.ndarray:
        """The refiner's mask for `refinement(...)` when it agrees with the text mask, else the text mask."""
        if self.refiner is None:
            return mask
        try:
            refined = np.asarray(self.refiner.select(image, self.refinement(heat, mask, selection))[0], bool)
        except InputError:
            return mask
        return refined if iou(refined, mask) >= AGREE else mask
