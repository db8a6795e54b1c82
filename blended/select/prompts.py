"""What the user gives a segmenter: clicks (positive or negative) and a box, checked against the image."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from ..errors import InputError

MAX_CLICKS = 64  # clicks one selection may hold
MAX_TEXT = 200  # characters of words naming the object (CLIP reads at most 77 tokens)


@dataclass(frozen=True)
class Selection:
    """Clicks and an optional box in image pixels (x right, y down, from the top-left corner).

    `labels[i]` is 1 for a positive click (part of the object) and 0 for a negative one (not part of it),
    SAM's convention. `box` is (left, top, right, bottom), right and bottom exclusive. `text` names the object in
    words ("the red circle"): only a text segmenter (`blended.select.text`) reads it; clicks and a box then refine
    or restrict what the words select."""

    points: tuple[tuple[int, int], ...] = ()
    labels: tuple[int, ...] = ()
    box: Optional[tuple[int, int, int, int]] = None
    text: str = ""

    def add(self, x: int, y: int, positive: bool = True) -> "Selection":
        return replace(self, points=self.points + ((int(x), int(y)),), labels=self.labels + (1 if positive else 0,))

    def with_box(self, box: Optional[tuple[int, int, int, int]]) -> "Selection":
        return replace(self, box=box)

    def with_text(self, text: str) -> "Selection":
        return replace(self, text=str(text or "").strip())

    @property
    def positive(self) -> list[tuple[int, int]]:
        return [p for p, label in zip(self.points, self.labels) if label == 1]

    @property
    def negative(self) -> list[tuple[int, int]]:
        return [p for p, label in zip(self.points, self.labels) if label == 0]

    @property
    def empty(self) -> bool:
        return not self.points and self.box is None and not self.text

    def check(self, size: tuple[int, int], words: bool = False) -> "Selection":
        """Raise InputError when a click lies outside the (w, h) image, the box is outside or has no area,
        nothing positive is given (words count as positive), or words are given to a segmenter that does not
        read them (`words` False); return self."""
        w, h = size
        if self.text and not words:
            raise InputError("this segmenter selects from clicks or a box, not from words: words need a text "
                             "segmenter (blended.select.load_text_segmenter)")
        if len(self.text) > MAX_TEXT:
            raise InputError(f"the words naming the object are {len(self.text)} characters long; at most {MAX_TEXT}")
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
        if self.box is None and not self.positive and not self.text:
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


__all__ = ["Selection", "parse_points", "parse_box", "box_from_corners", "MAX_CLICKS", "MAX_TEXT"]
