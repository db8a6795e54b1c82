"""Image and mask in: EXIF, modes, sizes, crop around the mask and paste back (white mask = edit)."""

from __future__ import annotations

import io
import os
import weakref
from dataclasses import dataclass
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

ImageLike = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]

DEFAULT_MAX_PIXELS = 50_000_000  # larger images are refused before decoding (decompression bombs)
_LOADED: "weakref.WeakValueDictionary[int, Image.Image]" = weakref.WeakValueDictionary()  # what load_image made
MIN_SIDE = 8  # smaller images cannot be edited meaningfully
MAX_ASPECT = 8.0  # longest side over shortest side of the region that is edited


def _open(src: ImageLike, what: str, max_pixels: int) -> Image.Image:
    """Open `src` lazily and check its pixel count before any decoding."""
    if isinstance(src, Image.Image):
        img = src
    elif isinstance(src, np.ndarray):
        try:
            img = Image.fromarray(src)
        except TypeError as e:
            raise InputError(f"the {what} array has an unsupported shape or dtype {src.shape} {src.dtype}") from e
    else:
        try:
            img = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
        except FileNotFoundError:
            raise InputError(f"the {what} file does not exist: {src}") from None
        except IsADirectoryError:
            raise InputError(f"the {what} path is a folder, not an image: {src}") from None
        except (UnidentifiedImageError, OSError, ValueError):
            raise InputError(f"the {what} is not a readable image (PNG, JPEG, WebP, ...)") from None
        except Image.DecompressionBombError:
            raise InputError(f"the {what} has too many pixels (limit {max_pixels:,})") from None
    w, h = img.size
    if w * h > max_pixels:
        raise InputError(f"the {what} is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}")
    if min(w, h) < 1:
        raise InputError(f"the {what} is empty ({w}x{h})")
    try:
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)  # animated: the first frame
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise InputError(f"the {what} file is truncated or corrupt") from None
    return img


def _to_8bit(img: Image.Image) -> Image.Image:
    """Scale 16-bit and float single-channel images to 8-bit 'L'."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        if img.mode == "F" and a.max(initial=0) <= 1.0:
            top = 1.0
        return Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return img


def _alpha(img: Image.Image) -> np.ndarray | None:
    """The alpha channel as float in [0, 1], or None when the image has no transparency."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return np.asarray(img.getchannel("A"), dtype=np.float32) / 255.0
    return None


def load_image(src: ImageLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read an image as 8-bit RGB: EXIF orientation applied, transparency composited on white.

    Accepts a path, bytes, a PIL image or a uint8 array of any mode (RGBA, LA, P, L, CMYK, 16-bit, ...).
    An image this function returned is returned as it is (after the size limit): a source is read once per
    edit however many stages (CLI, multi-mask, editor) take it.
    """
    if isinstance(src, Image.Image) and _LOADED.get(id(src)) is src:
        w, h = src.size
        if w * h > max_pixels:
            raise InputError(f"the image is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}")
        return src
    img = _open(src, "image", max_pixels)
    img = ImageOps.exif_transpose(img)
    img = _to_8bit(img)
    alpha = _alpha(img)
    rgb = img.convert("RGB")
    if alpha is not None:
        a = alpha[..., None]
        rgb = Image.fromarray((np.asarray(rgb, np.float32) * a + 255.0 * (1 - a) + 0.5).astype(np.uint8))
    w, h = rgb.size
    if min(w, h) < MIN_SIDE:
        raise InputError(f"the image is {w}x{h}; both sides must be at least {MIN_SIDE} pixels")
    _LOADED[id(rgb)] = rgb
    return rgb


def load_mask_values(src: ImageLike, size: tuple[int, int], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read a mask's values as float32 (H, W) in [0, 1], 1 = edit: its alpha when it has transparency
    (painted strokes), otherwise its brightness. `size` = the image's (width, height)."""
    img = _open(src, "mask", max_pixels)
    img = ImageOps.exif_transpose(img)
    if img.size != tuple(size):
        raise InputError(f"the mask is {img.size[0]}x{img.size[1]} but the image is {size[0]}x{size[1]}; "
                         "they must be the same size")
    img = _to_8bit(img)
    alpha = _alpha(img)
    if alpha is not None and alpha.min() < 1.0:
        return alpha
    return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


def load_mask(src: ImageLike, size: tuple[int, int], *, threshold: float = 0.5, invert: bool = False,
              max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read a mask as a boolean (H, W) array, True = edit.

    A mask with transparency uses its alpha (painted strokes); otherwise its brightness. Pixels above
    `threshold` (fraction of full scale) are edited; `invert` swaps the two sides.

    Args:
        src: the mask, same size as the image (`size` = (width, height)).
    """
    mask = load_mask_values(src, size, max_pixels=max_pixels) > threshold
    if invert:
        mask = ~mask
    if not mask.any():
        raise InputError("the mask is empty: paint the region to edit (white or opaque = edit)")
    return mask


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box (left, top, right, bottom) of the True pixels, right/bottom exclusive."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@dataclass(frozen=True)
class Region:
    """The part of the source that is edited and the size it is edited at."""

    box: tuple[int, int, int, int]  # (left, top, right, bottom) in source pixels
    work_size: tuple[int, int]  # (width, height) given to the VAE, multiples of the UNet's factor
    whole: bool  # True when the region is the whole image

    @property
    def size(self) -> tuple[int, int]:
        return self.box[2] - self.box[0], self.box[3] - self.box[1]


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


MAX_RESOLUTION = 4096  # the largest `resolution` (shorter side of the edited region, pixels) a setting may ask


def plan_region(image_size: tuple[int, int], mask: np.ndarray, *, native: int, multiple: int,
                margin: int, resolution: int = 0) -> Region:
    """Choose what to edit: the whole image, or, when it is larger than the model's native size,
    a crop around the mask's box (plus `margin`, grown to at least native x native).

    The region is then resized, keeping its aspect ratio, in multiples of `multiple`, so that its
    shorter side is `resolution` (0 = `native`): a crop is never edited below the model's native size.
    A region larger than that is scaled down to it; one between the two keeps its own pixels (no
    upscaling past the source's detail); one smaller than native (a small whole image) is scaled up to
    native, the least the model works at.
    """
    w, h = image_size
    if w * h <= 1.5 * native * native:
        box, whole = (0, 0, w, h), True
    else:
        l, t, r, b = mask_box(mask)
        l, t, r, b = l - margin, t - margin, r + margin, b + margin
        # grow to at least native on each side (or the image's side), centred on the mask
        for lo, hi, full, axis in ((l, r, w, 0), (t, b, h, 1)):
            need = min(full, max(native, hi - lo))
            c = (lo + hi) / 2
            lo = int(round(c - need / 2))
            lo = min(max(lo, 0), full - need)
            hi = lo + need
            if axis == 0:
                l, r = lo, hi
            else:
                t, b = lo, hi
        box = (l, t, r, b)
        whole = box == (0, 0, w, h)
    rw, rh = box[2] - box[0], box[3] - box[1]
    if max(rw, rh) / min(rw, rh) > MAX_ASPECT:
        raise InputError(f"the region to edit is {rw}x{rh}; its aspect ratio must be at most {MAX_ASPECT:g}:1")
    short = min(rw, rh)
    target = max(native, resolution)
    scale = min(target / short, max(1.0, native / short))  # down to `target`; up only to reach native
    work = (_round_to(rw * scale, multiple), _round_to(rh * scale, multiple))
    return Region(box=box, work_size=work, whole=whole)


def crop_image(image: Image.Image, region: Region) -> Image.Image:
    """The region of the image at work size (Lanczos); its mask: `crop_mask`."""
    crop = image.crop(region.box)
    if crop.size != region.work_size:
        crop = crop.resize(region.work_size, Image.Resampling.LANCZOS)
    return crop


def crop_mask(mask: np.ndarray, region: Region) -> np.ndarray:
    """(H, W) bool mask -> the region at work size, (h, w) bool: a work pixel is masked if any pixel under it is."""
    m = Image.fromarray(mask.astype(np.uint8) * 255).crop(region.box)
    if m.size != region.work_size:
        m = m.resize(region.work_size, Image.Resampling.BOX)
    return np.asarray(m) > 0


def _edge_ramp(size: tuple[int, int], box: tuple[int, int, int, int], image_size: tuple[int, int],
               width: int) -> np.ndarray:
    """Weights (h, w): 1 inside the box, falling linearly to 0 over `width` pixels at box sides that are
    not image borders."""
    rw, rh = size
    l, t, r, b = box
    W, H = image_size
    ys = np.arange(rh, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(rw, dtype=np.float32)[None, :] + 0.5
    d = np.full((rh, rw), np.inf, dtype=np.float32)
    for distance, open_side in ((xs, l > 0), (rw - xs, r < W), (ys, t > 0), (rh - ys, b < H)):
        if open_side:
            d = np.minimum(d, distance)
    return np.clip(d / max(width, 1), 0.0, 1.0)


def paste_back(source: Image.Image, edited: Image.Image, region: Region, feather: int) -> Image.Image:
    """The paper's raw output (`background="none"`): the whole edited region, scaled back to its size in the
    source and pasted in; outside the region the source is kept exactly, at its inner edge a ramp of
    `feather` pixels hides the seam. Everything inside the region is the decode (see `composite`)."""
    patch = edited if edited.size == region.size else edited.resize(region.size, Image.Resampling.LANCZOS)
    if region.whole:
        return patch
    ramp = _edge_ramp(region.size, region.box, source.size, feather)[..., None]
    under = np.asarray(source.crop(region.box), np.float32)
    mixed = np.asarray(patch, np.float32) * ramp + under * (1 - ramp)
    out = source.copy()
    out.paste(Image.fromarray(np.clip(mixed + 0.5, 0, 255).astype(np.uint8)), region.box[:2])
    return out


def seam_weights(mask: np.ndarray, feather: int) -> np.ndarray:
    """(H, W) float32 weights of the edit at full resolution: 1 inside the (H, W) bool `mask`, falling
    linearly to 0 over a seam band of `feather` pixels outside it (Euclidean distance), exactly 0 beyond."""
    import cv2

    outside = (~np.asarray(mask, dtype=bool)).astype(np.uint8)
    dist = cv2.distanceTransform(outside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)  # 0 inside, >= 1 outside
    w = np.clip(1.0 - dist / (feather + 1.0), 0.0, 1.0)
    return np.where(dist > feather, 0.0, w).astype(np.float32)  # no pixel farther than `feather` takes part


def composite(source: Image.Image, edited: Image.Image, region: Region, weights: np.ndarray) -> Image.Image:
    """The final image at the source's own resolution: the edited region (work size, scaled back to the
    region's size) where `weights` is 1, the source where it is 0, mixed in between.

    Args:
        source: the full-resolution upload (RGB).
        edited: the edited region at `region.work_size`.
        region: where `edited` comes from in `source`.
        weights: (h, w) float weights of the edit over `region.box` (`seam_weights` of the mask's crop);
            they must be 0 at the box's sides that are not image borders, so the box leaves no trace.

    Returns:
        A new image; every pixel whose weight is 0 is the source's, bit for bit.
    """
    l, t, r, b = region.box
    if weights.shape != (b - t, r - l):
        raise ValueError(f"weights {weights.shape} do not cover the region {region.size[::-1]}")
    patch = edited if edited.size == region.size else edited.resize(region.size, Image.Resampling.LANCZOS)
    under = np.asarray(source.crop(region.box))
    w = weights[..., None]
    mixed = np.asarray(patch, np.float32) * w + under.astype(np.float32) * (1 - w)
    out_patch = np.where(w > 0, np.clip(mixed + 0.5, 0, 255).astype(np.uint8), under)  # 0: the source, exactly
    out = source.copy()
    out.paste(Image.fromarray(out_patch), region.box[:2])
    return out
