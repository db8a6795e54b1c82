"""Procedural, seeded generator of simple 64x64 scenes for the bundled demo model.

A scene is a muted background (plain, linear gradient, stripes, smooth noise texture or
two-tone "ground and sky") with one to three flat, axis-aligned objects: a circle, a square
or an upright triangle in one of six saturated colours. Backgrounds only use muted colours
(low saturation, mid value), so every object colour stands out from every background; this
keeps the captions unambiguous and makes the colour analyser in ``analyse.py`` reliable.

Seed ranges (documented in docs/demo_model.md):

* training scenes use seeds in ``[0, TRAIN_SEED_END)``;
* held-out evaluation uses seeds from ``HELDOUT_SEED_START`` upwards (never used in training).

Everything is deterministic given the seed (numpy ``default_rng`` + Pillow drawing).
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SUPERSAMPLE = 4

TRAIN_SEED_END = 100_000_000
HELDOUT_SEED_START = 1_000_000_000

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ("plain", "gradient", "stripes", "noise", "ground_sky")

MIN_OBJ = 14
MAX_OBJ = 36


@dataclass
class SceneObject:
    shape: str
    colour: str
    x0: int  # bounding box, pixels, inclusive-exclusive
    y0: int
    size: int

    @property
    def phrase(self) -> str:
        return f"a {self.colour} {self.shape}"

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.x0, self.y0, self.x0 + self.size, self.y0 + self.size)


@dataclass
class Scene:
    image: np.ndarray  # (64, 64, 3) uint8
    background: np.ndarray  # (64, 64, 3) uint8, the scene without objects
    objects: list[SceneObject]
    masks: list[np.ndarray]  # one (64, 64) bool mask per object
    caption: str
    background_kind: str


def caption_of(objects: list[SceneObject]) -> str:
    return " and ".join(o.phrase for o in objects)


# ----------------------------------------------------------------------------- backgrounds
def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    h = rng.random()
    s = rng.uniform(0.0, 0.35)
    v = rng.uniform(0.32, 0.75)
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32) * 255.0


def _near_muted(rng: np.random.Generator, c: np.ndarray) -> np.ndarray:
    """A second muted colour, related to ``c`` but distinguishable."""
    h, s, v = colorsys.rgb_to_hsv(*(c / 255.0))
    h = (h + rng.uniform(-0.15, 0.15)) % 1.0
    s = float(np.clip(s + rng.uniform(-0.15, 0.15), 0.0, 0.35))
    v = float(np.clip(v + rng.choice([-1, 1]) * rng.uniform(0.08, 0.25), 0.32, 0.75))
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32) * 255.0


def _coords() -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    return (xx + 0.5) / SIZE - 0.5, (yy + 0.5) / SIZE - 0.5


def make_background(rng: np.random.Generator, kind: str | None = None) -> tuple[np.ndarray, str]:
    if kind is None:
        kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    c1 = _muted_colour(rng)
    c2 = _near_muted(rng, c1)
    x, y = _coords()
    if kind == "plain":
        t = np.zeros((SIZE, SIZE), np.float32)
    elif kind == "gradient":
        a = rng.uniform(0, 2 * np.pi)
        t = np.clip((np.cos(a) * x + np.sin(a) * y) + 0.5, 0, 1)
    elif kind == "stripes":
        a = rng.uniform(0, np.pi)
        period = rng.uniform(6, 16) / SIZE
        phase = rng.uniform(0, 1)
        u = (np.cos(a) * x + np.sin(a) * y) / period + phase
        t = (np.sin(2 * np.pi * u) > 0).astype(np.float32)
        # soften the edges a little
        t = 0.15 + 0.7 * t
    elif kind == "noise":
        g = int(rng.integers(3, 8))
        low = rng.random((g, g)).astype(np.float32)
        t = np.asarray(
            Image.fromarray((low * 255).astype(np.uint8)).resize((SIZE, SIZE), Image.BICUBIC),
            dtype=np.float32,
        ) / 255.0
    elif kind == "ground_sky":
        horizon = rng.uniform(-0.2, 0.2)
        tilt = rng.uniform(-0.2, 0.2)
        t = (y > horizon + tilt * x).astype(np.float32)
    else:
        raise ValueError(kind)
    img = c1[None, None, :] * (1 - t[..., None]) + c2[None, None, :] * t[..., None]
    if kind in ("ground_sky", "plain"):
        # a faint vertical shading
        img = img * (1.0 + rng.uniform(-0.08, 0.08) * (y[..., None] * 2))
    grain = rng.uniform(0, 6)
    img = img + rng.normal(0, 1, img.shape).astype(np.float32) * grain
    return np.clip(img, 0, 255), kind


# ----------------------------------------------------------------------------- objects
def shape_alpha(shape: str, box: tuple[float, float, float, float]) -> np.ndarray:
    """Anti-aliased coverage (64, 64) float32 in [0, 1] of ``shape`` filling ``box``."""
    s = SUPERSAMPLE
    canvas = Image.new("L", (SIZE * s, SIZE * s), 0)
    d = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = (v * s for v in box)
    xy = (x0, y0, x1 - 1, y1 - 1)
    if shape == "circle":
        d.ellipse(xy, fill=255)
    elif shape == "square":
        d.rectangle(xy, fill=255)
    elif shape == "triangle":
        d.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=255)
    else:
        raise ValueError(shape)
    small = canvas.resize((SIZE, SIZE), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _overlaps(box, boxes, margin=2) -> bool:
    x0, y0, x1, y1 = box
    for b in boxes:
        if x0 < b[2] + margin and b[0] < x1 + margin and y0 < b[3] + margin and b[1] < y1 + margin:
            return True
    return False


def place_objects(
    rng: np.random.Generator, n: int, avoid: list[tuple[int, int, int, int]] | None = None
) -> list[SceneObject]:
    objs: list[SceneObject] = []
    boxes = list(avoid or [])
    for _ in range(n):
        for _try in range(50):
            # larger objects when alone, smaller when several share the frame
            hi = MAX_OBJ if n == 1 else (30 if n == 2 else 24)
            size = int(rng.integers(MIN_OBJ, hi + 1))
            x0 = int(rng.integers(0, SIZE - size + 1))
            y0 = int(rng.integers(0, SIZE - size + 1))
            box = (x0, y0, x0 + size, y0 + size)
            if not _overlaps(box, boxes):
                break
        else:
            continue
        boxes.append(box)
        objs.append(
            SceneObject(
                shape=SHAPES[int(rng.integers(len(SHAPES)))],
                colour=list(COLOURS)[int(rng.integers(len(COLOURS)))],
                x0=x0,
                y0=y0,
                size=size,
            )
        )
    return objs


def render(background: np.ndarray, objects: list[SceneObject], rng: np.random.Generator):
    img = background.astype(np.float32).copy()
    masks = []
    for o in objects:
        a = shape_alpha(o.shape, o.box)
        col = np.array(COLOURS[o.colour], np.float32) + rng.uniform(-12, 12, 3).astype(np.float32)
        img = img * (1 - a[..., None]) + col[None, None, :] * a[..., None]
        masks.append(a > 0.5)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), masks


def make_scene(seed: int, n_objects: int | None = None) -> Scene:
    rng = np.random.default_rng(seed)
    bg, kind = make_background(rng)
    if n_objects is None:
        n_objects = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    objects = place_objects(rng, n_objects)
    image, masks = render(bg, objects, rng)
    return Scene(
        image=image,
        background=np.clip(np.round(bg), 0, 255).astype(np.uint8),
        objects=objects,
        masks=masks,
        caption=caption_of(objects),
        background_kind=kind,
    )


def object_masks(seed: int, n_objects: int | None = None) -> list[tuple[str, str, np.ndarray]]:
    """(colour, shape, bool mask) for every object of scene ``seed``."""
    sc = make_scene(seed, n_objects)
    return [(o.colour, o.shape, m) for o, m in zip(sc.objects, sc.masks)]


def make_edit_case(seed: int):
    """A held-out edit: (image uint8 HxWx3, mask bool HxW, prompt, target colour, target shape).

    The scene has zero to two objects; the mask is a rectangle or an ellipse of a plausible
    object size at a free place, and the prompt asks for a new object there.
    Use seeds >= HELDOUT_SEED_START for evaluation.
    """
    rng = np.random.default_rng([seed, 7])
    bg, _ = make_background(rng)
    n = int(rng.integers(0, 3))
    objects = place_objects(rng, n)
    boxes = [o.box for o in objects]
    for _try in range(100):
        size = int(rng.integers(22, 37))
        x0 = int(rng.integers(0, SIZE - size + 1))
        y0 = int(rng.integers(0, SIZE - size + 1))
        box = (x0, y0, x0 + size, y0 + size)
        if not _overlaps(box, boxes, margin=3):
            break
    else:  # no free place: drop the objects in the way
        objects = [o for o in objects if not _overlaps(box, [o.box], margin=3)]
    image, _ = render(bg, objects, rng)
    if rng.random() < 0.5:
        mask = np.zeros((SIZE, SIZE), bool)
        mask[box[1] : box[3], box[0] : box[2]] = True
    else:
        mask = shape_alpha("circle", box) > 0.5
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    return image, mask, f"a {colour} {shape}", colour, shape


def dataset(seeds, n_objects: int | None = None):
    """Arrays for training: images (N, 64, 64, 3) uint8 and a list of Scene objects."""
    scenes = [make_scene(int(s), n_objects) for s in seeds]
    return np.stack([s.image for s in scenes]), scenes


if __name__ == "__main__":  # a contact sheet for a quick look: python -m blended_dev.scenes [out.png]
    import sys

    out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/scenes.png"
    sheet = Image.new("RGB", (SIZE * 8, SIZE * 8))
    for i in range(64):
        sc = make_scene(i)
        sheet.paste(Image.fromarray(sc.image), ((i % 8) * SIZE, (i // 8) * SIZE))
        print(i, sc.background_kind, "|", sc.caption)
    sheet.resize((SIZE * 16, SIZE * 16), Image.NEAREST).save(out)
