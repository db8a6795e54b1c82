"""One click, several masks, ranked together: each mask gets some of the edit's candidates and the CLIP
ranking orders the whole set, so the best edit is chosen over mask sizes as well as seeds (issue 22)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np

from .config import EditConfig
from .editor import EditResult, Editor, Progress
from .errors import InputError
from .images import DEFAULT_MAX_PIXELS, ImageLike, load_image
from .remove import removal_ranker
from .select import grow

VARIANT_GROWS = (0.0, 0.1, 0.2)  # the variants of one mask grow by these fractions of its size (sqrt of its area)


def variant_grows(mask: np.ndarray, fractions: Sequence[float] = VARIANT_GROWS) -> list[int]:
    """Pixels to grow a mask by for its variants: `fractions` of the square root of its area, distinct."""
    side = float(np.sqrt(np.asarray(mask, bool).sum()))
    out: list[int] = []
    for f in fractions:
        g = int(round(f * side))
        out.append(max(g, out[-1] + 1) if out else g)
    return out


def mask_variants(mask: np.ndarray, grows: Optional[Sequence[int]] = None) -> list[tuple[str, np.ndarray]]:
    """Labelled grown copies of one (H, W) bool mask: [("grow +0 px", mask), ("grow +3 px", ...), ...];
    `grows` in pixels, default `variant_grows(mask)`."""
    return [(f"grow {g:+d} px", grow(mask, g)) for g in (variant_grows(mask) if grows is None else grows)]


def selection_variants(segmenter: Any, image: ImageLike, selection: Any, mask: Optional[np.ndarray] = None, *,
                       max_pixels: int = DEFAULT_MAX_PIXELS) -> list[tuple[str, np.ndarray]]:
    """The masks a one-click multi-mask edit tries: a multimask segmenter's (SAM's) outputs for a single click,
    best first, else `mask_variants` of `mask` (default: the segmenter's one mask)."""
    from .select import select_mask

    if segmenter is not None and getattr(segmenter, "multimask", False) and len(selection.points) == 1 \
            and selection.box is None:
        found = select_mask(segmenter, image, selection, num_masks=3, max_pixels=max_pixels)
        if len(found) > 1:
            return [(f"SAM mask {i + 1}", m) for i, m in enumerate(found)]
    if mask is None:
        mask = select_mask(segmenter, image, selection, max_pixels=max_pixels)[0]
    return mask_variants(mask)


def split(total: int, parts: int) -> list[int]:
    """`total` candidates over `parts` masks as evenly as possible, the first masks getting one more."""
    return [total // parts + (1 if k < total % parts else 0) for k in range(parts)]


def edit_masks(editor: Editor, image: ImageLike, masks: Sequence[tuple[str, Any]], prompt: str,
               config: Optional[EditConfig] = None, *, progress: Optional[Progress] = None,
               should_stop: Optional[Callable[[], bool]] = None, **overrides: Any) -> EditResult:
    """Edit `image` with each of several masks and rank all the candidates together.

    Args:
        editor: the loaded Editor; each mask is one `Editor.edit` call.
        image: the source (any ImageLike).
        masks: (label, mask) pairs; a mask is anything `Editor.edit` takes (white or opaque = edit), or an
            `EditMasks` read with the edit's settings.
        prompt: what should appear inside the mask.
        config: the settings (default `editor.defaults`, `overrides` applied); `num_candidates` is the total,
            split over the masks (`split`: the same cost as one edit), candidate i keeping seed `seed + i`.

    Returns:
        One EditResult, candidates best first by the ranker's score on the union of the masks' targets (the
        region each edit ranks on, one view for all, so a bigger mask is not judged on more pixels); each
        candidate's `mask` names its mask. The result's region, timings and settings are those of the first
        mask's edit, timings summed.
    """
    cfg = (config or editor.defaults).replace(**overrides).checked()
    if not masks:
        raise InputError("give at least one mask")
    counts = split(cfg.num_candidates, len(masks))
    source = load_image(image, max_pixels=editor.max_pixels)
    results, offset = [], 0
    for (label, mask), n in zip(masks, counts):
        if n == 0:
            continue
        part_cfg = cfg.replace(num_candidates=n, seed=cfg.seed + offset, rank=False)
        prepared = editor.read_masks(mask, source.size, part_cfg)  # read once: the edit and the ranking use it
        part = editor.edit(source, prepared, prompt, part_cfg, progress=progress, should_stop=should_stop)
        for cand in part.candidates:
            cand.mask = label
        results.append((part, prepared))
        offset += n
    first = results[0][0]
    candidates = [c for part, _ in results for c in part.candidates]
    notes = list(dict.fromkeys(n for part, _ in results for n in part.notes))
    timings = {k: sum(part.timings.get(k, 0.0) for part, _ in results) for k in first.timings}
    if cfg.rank and editor.ranker is not None and len(candidates) > 1:
        union = np.zeros(source.size[::-1], bool)
        for _, prepared in results:
            union |= prepared.target
        editor.rank(candidates, union, prompt, notes, removal_ranker(editor.ranker, source, cfg))
    candidates.sort(key=lambda c: c.filtered)
    return EditResult(candidates=candidates, prompt=first.prompt, config=cfg, model=first.model, timings=timings,
                      region=first.region, notes=notes, model_info=first.model_info)
