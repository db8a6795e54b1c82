"""What the user gives a segmenter: clicks (positive or negative) and a box, checked against the image."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import InputError

MAX_CLICKS = 64  # clicks one selection may hold


@dataclass(frozen=True)
class Selection:
    """Clicks and an optional box in image pixels (x right, y down, from the top-left corner).

    `labels[i]` is 1 for a positive click (part of the object) and 0 for a negative one (not part of it),
    SAM's convention. `box` is (left, top, right, bottom), right and bottom exclusive."""

    points: tuple[tuple[int, int], ...] = ()
    labels: tuple[int, ...] = ()
    box: Optional[tuple[int, int, int, int]] = None

    def add(self, x: int, y: int, positive: bool = True) -> "Selection":
        return Selection(self.points + ((int(x), int(y)),), self.labels + (1 if positive else 0,), self.box)

    def with_box(self, box: Optional[tuple[int, int, int, int]]) -> "Selection":
        return Selection(self.points, self.labels, box)

    @property
    def positive(self) -> list[tuple[int, int]]:
        return [p for p, label in zip(self.points, self.labels) if label == 1]

    @property
    def negative(self) -> list[tuple[int, int]]:
        return [p for p, label in zip(self.points, self.labels) if label == 0]

    @property
    def empty(self) -> bool:
        return not self.points and self.box is None

    def check(self, size: tuple[int, int]) -> "Selection":
        """Raise InputError when a click lies outside the (w, h) image, the box is outside or has no area,
        or nothing positive is given; return self."""
        w, h = size
        if len(self.points) != len(self.labels) or any(label not in (0, 1) for label in self.labels):
            raise InputError("every click needs a label: 1 = part of the object, 0 = not part of it")
        if len(self.points) > MAX_CLICKS:
            raise InputError(f"{len(self.points)} clicks; a selection takes at most {MAX_CLICKS}")
        for x, y in self.points:
            if not (0 <= x < w and 0 <= y < h):
                raise InputError(f"the click ({x}, {y}) is outside the {w}x{h} image (x from 0 to {w - 1}, "
                                 f"y from 0 to {h - 1})")
        if self.box is not None:
            l, t, r, b = self.box
            if r <= l or b <= t:
                raise InputError(f"the box ({l}, {t}, {r}, {b}) has no area: right must be more than left "
                                 "and bottom more than top")
            if l < 0 or t < 0 or r > w or b > h:
                raise InputError(f"the box ({l}, {t}, {r}, {b}) reaches outside the {w}x{h} image")
        if self.box is None and not self.positive:
            raise InputError("click on the object (a positive click) or draw a box: negative clicks alone "
                             "select nothing")
        return self


def _numbers(text: str, what: str) -> list[int]:
    try:
        values = [int(round(float(v))) for v in str(text).replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise InputError(f"{what} must be comma-separated numbers, got {text!r}") from None
    return values


def parse_points(text: str, what: str = "--select") -> list[tuple[int, int]]:
    """'X,Y[,X,Y...]' -> [(x, y), ...]."""
    v = _numbers(text, what)
    if not v or len(v) % 2:
        raise InputError(f"{what} takes pairs of pixel coordinates X,Y[,X,Y...], got {text!r}")
    return [(v[i], v[i + 1]) for i in range(0, len(v), 2)]


def parse_box(text: str, what: str = "--select-box") -> tuple[int, int, int, int]:
    """'L,T,R,B' -> (left, top, right, bottom)."""
    v = _numbers(text, what)
    if len(v) != 4:
        raise InputError(f"{what} takes four pixel coordinates L,T,R,B (left, top, right, bottom), got {text!r}")
    return v[0], v[1], v[2], v[3]


def box_from_corners(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int, int, int]:
    """The box spanned by two clicked corners, both corner pixels inside it."""
    return min(a[0], b[0]), min(a[1], b[1]), max(a[0], b[0]) + 1, max(a[1], b[1]) + 1


__all__ = ["Selection", "parse_points", "parse_box", "box_from_corners", "MAX_CLICKS"]
