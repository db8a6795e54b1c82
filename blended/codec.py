"""The VAE's two ends as an edit uses them (issue 31, docs/hosting.md): the encode cache, and the decoder an edit
decodes its candidates with ("full" or a tiny decoder, `EditConfig.decode`), over the whole frame or only the box
the composite uses.

* `EncodeCache`: a second edit of the same pixels (another prompt, other seeds, more candidates) reuses the
  source's latents and a 9-channel model's masked-image latents. Keyed by a digest of the pixels encoded, their
  region in the upload, the work size and the VAE; a few entries per loaded model (dropped with it); a lock
  around the table, so concurrent edits share it safely. A hit returns the same tensor values as a miss.
* `Decoding`: how an edit decodes. A conv-only decoder (TAESD has no GroupNorm and no attention) has a finite
  receptive field, so decoding the composite's box plus that field gives the same pixels inside the box as a
  whole-frame decode (tested within 1/255). The full VAE decoder normalises over the whole frame (GroupNorm, a
  mid-block attention): a crop would change its pixels, so it always decodes the whole frame."""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from .errors import ModelLoadError

ENCODE_CACHE_ENTRIES = 8  # per loaded model: a few photos' latents (and their masked versions), 64 KB each at SD's 512 px
_GLOBAL_LAYERS = (nn.GroupNorm, nn.BatchNorm2d, nn.LayerNorm, nn.MultiheadAttention)


class EncodeCache:
    """Latents of recently encoded pixels, least recently used dropped first; thread-safe."""

    def __init__(self, entries: int = ENCODE_CACHE_ENTRIES):
        self.entries = entries
        self._table: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(x: torch.Tensor, vae: Any, where: tuple = ()) -> tuple:
        """A key for encoding `x` with `vae`: a digest of its values and shape, `where` it comes from (the
        region's box and work size) and the VAE (its identity and dtype)."""
        data = x.detach().to("cpu", torch.float32).contiguous().numpy()
        digest = hashlib.blake2b(data.tobytes(), digest_size=20).hexdigest()
        return digest, tuple(x.shape), tuple(where), id(vae), str(getattr(vae, "dtype", ""))

    def encode(self, encode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, vae: Any,
               where: tuple = ()) -> tuple[torch.Tensor, bool]:
        """(`encode(x)`, hit): from the table when the same pixels were encoded before, else encoded and kept.
        The caller gets its own copy, so nothing it does changes the table."""
        key = self.key(x, vae, where)
        with self._lock:
            z = self._table.get(key)
            if z is not None:
                self._table.move_to_end(key)
                return z.clone(), True
        z = encode(x)  # outside the lock: concurrent misses of other images do not wait for each other
        with self._lock:
            self._table[key] = z.detach().clone()
            self._table.move_to_end(key)
            while len(self._table) > self.entries:
                self._table.popitem(last=False)
        return z, False

    def __len__(self) -> int:
        return len(self._table)

    def clear(self) -> None:
        with self._lock:
            self._table.clear()


def receptive_field(decoder: nn.Module) -> Optional[int]:
    """Latents on each side that a conv-only decoder reads around an output pixel (an upper bound: every
    convolution counted as if in series, at the scale it runs at); None when a layer mixes the whole frame
    (normalisation statistics or attention), as the full VAE decoder's do."""
    scale, reach = 1.0, 0.0
    for module in decoder.modules():
        if isinstance(module, _GLOBAL_LAYERS) or "Attention" in type(module).__name__:
            return None
        if isinstance(module, nn.Conv2d):
            k = max(module.kernel_size)
            reach += (k // 2) * max(module.dilation) / scale
        elif isinstance(module, nn.Upsample):
            scale *= float(module.scale_factor)
    return math.ceil(reach) + 1


@dataclass(frozen=True)
class Decoding:
    """How one edit decodes its candidates: `name` "full" or "tiny", `decode` (scaled latents -> (B, 3, H, W) in
    [-1, 1]) and the decoder's receptive field in latents (None: global, no crop decode)."""

    name: str
    decode: Callable[[torch.Tensor], torch.Tensor]
    field: Optional[int] = None


def tiny_decoding(tiny: Any) -> Decoding:
    """A Decoding over an `AutoencoderTiny` (which reads the UNet's latents as they are)."""
    dtype = next(tiny.parameters()).dtype

    def decode(latents: torch.Tensor) -> torch.Tensor:
        return tiny.decode(latents.to(dtype)).sample.float()

    return Decoding("tiny", decode, receptive_field(tiny.decoder))


def crop_box(weights_box: tuple[int, int, int, int], work_size: tuple[int, int], region_size: tuple[int, int],
             factor: int, latent_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The latent box (left, top, right, bottom) whose decode covers every work pixel the composite reads: the
    box of non-zero composite weights (in the region's own pixels), plus what the resize to the region's size
    reads around it (Lanczos: 3 source pixels), in latents and clipped to the frame."""
    (w, h), (rw, rh), (lw, lh) = work_size, region_size, latent_size
    sx, sy = w / rw, h / rh
    l, t, r, b = weights_box
    pad_x, pad_y = 3 * max(1.0, sx) + 1, 3 * max(1.0, sy) + 1
    box = (math.floor((l * sx - pad_x) / factor), math.floor((t * sy - pad_y) / factor),
           math.ceil((r * sx + pad_x) / factor), math.ceil((b * sy + pad_y) / factor))
    return max(0, box[0]), max(0, box[1]), min(lw, box[2]), min(lh, box[3])


def nonzero_box(weights: np.ndarray) -> Optional[tuple[int, int, int, int]]:
    """(left, top, right, bottom) of the non-zero entries of an (h, w) array; None when all are zero."""
    rows, cols = np.flatnonzero(weights.any(1)), np.flatnonzero(weights.any(0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def decode_box(decoding: Decoding, latents: torch.Tensor, box: tuple[int, int, int, int],
               fill: torch.Tensor, factor: int) -> torch.Tensor:
    """`latents` decoded only inside the latent `box` (plus the decoder's receptive field, then cut back to the
    box), the rest `fill` ((1, 3, H, W), the source at work size): (B, 3, H, W)."""
    lh, lw = latents.shape[-2:]
    l, t, r, b = box
    reach = decoding.field or 0
    cl, ct, cr, cb = max(0, l - reach), max(0, t - reach), min(lw, r + reach), min(lh, b + reach)
    patch = decoding.decode(latents[..., ct:cb, cl:cr])  # (B, 3, (cb-ct) f, (cr-cl) f)
    inner = patch[..., (t - ct) * factor:(b - ct) * factor, (l - cl) * factor:(r - cl) * factor]
    out = fill.to(inner.device, inner.dtype).expand(latents.shape[0], -1, -1, -1).clone()
    out[..., t * factor:b * factor, l * factor:r * factor] = inner
    return out


def decoding_for(model: Any, config: Any, notes: list[str]) -> Decoding:
    """What decodes an edit's candidates: the full decoder for "full", and for background methods that work through
    it (`decoder`, `latent`: a note says so); else the tiny decoder `config.decode` names. "tiny" that cannot be
    had (no bundled one, the hub unreachable) decodes with the full decoder and says so: an edit beats no edit. A
    path that is not a fitting tiny decoder is refused (`ModelLoadError`, one line)."""
    from .background import get_method

    full = Decoding("full", model.decode)
    if config.decode == "full":
        return full
    if get_method(config.background).needs_stats:
        notes.append(f"decode '{config.decode}' not used: background '{config.background}' works through the full "
                     "VAE decoder, which decoded the candidates")
        return full
    try:
        return tiny_decoding(model.tiny_decoder(config.decode))
    except ModelLoadError as e:
        if config.decode != "tiny":
            raise
        notes.append(f"decoded with the full decoder: {e}")
        return full


def composite_crop(decoding: Decoding, config: Any, masks: Any, region: Any,
                   factor: int) -> Optional[tuple[int, int, int, int]]:
    """The latent box a crop decode covers, or None for a whole-frame decode: only a conv-only decoder crops, and
    only where the composite reads the mask's box and seam band alone (`stitch` with `exact_outside`) and the box
    is smaller than the frame."""
    if decoding.field is None or config.background != "stitch" or not config.exact_outside:
        return None
    box = nonzero_box(masks.composite_weights(region, config.feather))
    lw, lh = (s // factor for s in region.work_size)
    if box is None:
        return None
    crop = crop_box(box, region.work_size, region.size, factor, (lw, lh))
    return crop if (crop[2] - crop[0]) * (crop[3] - crop[1]) < lw * lh else None
