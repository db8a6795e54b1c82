"""The selection and mask-tools panel: click the object (or two box corners) on a picture that shows the clicks
and the current mask, and the mask lands in the image editor as an ordinary layer; grow / shrink, invert, fill
holes, drop specks, snap to edges, clear (issue 22); or name the object in words ("the red circle", issue 29).
`build_mask_panel` makes the components and handlers; the functions above it hold the logic on plain images and
arrays."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import gradio as gr
import numpy as np
from PIL import Image, ImageDraw

from blended import InputError, ModelLoadError
from blended.multimask import mask_variants
from blended.select import (Selection, box_from_corners, drop_specks, fill_holes, grow, invert, select_mask,
                            shared_text_segmenter, snap)
from blended.select.sam import image_key

from .editing import checked_image, mask_from_layers, mask_layer
from .limits import Limits

DISPLAY_SIDE = (512, 768)  # the clickable picture is served with its longer side in this range (small ones enlarged)
GROW_RANGE = 32  # the grow / shrink slider's reach, pixels of the upload, each way
TINT = (255, 0, 255)  # the mask over the clickable picture: the editor's magenta ...
TINT_ALPHA = 0.45  # ... at this opacity
POSITIVE, NEGATIVE, CORNER = (40, 200, 80), (230, 40, 40), (255, 210, 0)
MODES = ("Add: part of the object", "Remove: not part of it")
SELECTION_TTL_S = 30 * 60  # a selection idle this long is dropped (gr.State's time_to_live): its masks are two
# bytes a pixel, up to 32 MB for the largest picture a server takes; the next click starts a new selection


# -- state and logic (no gradio) ----------------------------------------------------------------

@dataclass
class PanelState:
    """One session's selection: its clicks and box, the mask it gave (`base`), the slider value that mask was
    taken at (`offset`), the mask last put into the editor (`shown`) and the slider value then (`px`)."""

    selection: Selection = field(default_factory=Selection)
    corner: Optional[tuple[int, int]] = None  # the first corner of a box being drawn
    base: Optional[np.ndarray] = None
    offset: int = 0
    shown: Optional[np.ndarray] = None
    px: int = 0
    from_click: bool = False  # `shown` is a segmenter's mask of one selection (so SAM's variants may replace it)
    key: str = ""  # the picture's fingerprint: the selection belongs to it


def background_of(value: Optional[dict], limits: Limits) -> Image.Image:
    """The editor's picture as RGB; InputError when there is none."""
    background = (value or {}).get("background")
    if background is None:
        raise InputError("upload an image first")
    return checked_image(background, limits)


def current_mask(value: Optional[dict], size: tuple[int, int]) -> np.ndarray:
    """What is painted in the editor now, (H, W) bool."""
    return np.asarray(mask_from_layers((value or {}).get("layers") or [], size)) > 0


def display_scale(size: tuple[int, int]) -> float:
    """Displayed pixels per image pixel of the clickable picture (`DISPLAY_SIDE`)."""
    lo, hi = DISPLAY_SIDE
    return min(hi, max(lo, max(size))) / max(size)


def overlay(image: Image.Image, mask: Optional[np.ndarray], state: PanelState) -> Image.Image:
    """The clickable picture at `display_scale`: the mask tinted with its outline, clicks as dots (green =
    part of the object, red = not), a box in yellow, a box's first corner as a yellow dot."""
    import cv2

    s = display_scale(image.size)
    w, h = max(1, round(image.size[0] * s)), max(1, round(image.size[1] * s))
    resample = Image.Resampling.NEAREST if s > 1 else Image.Resampling.BILINEAR  # enlarged: crisp pixels
    a = np.asarray(image.convert("RGB").resize((w, h), resample), np.float32)
    if mask is not None and mask.any():
        m = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
        a[m] = a[m] * (1 - TINT_ALPHA) + np.array(TINT, np.float32) * TINT_ALPHA
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        a = np.ascontiguousarray(a.astype(np.uint8))
        cv2.drawContours(a, contours, -1, TINT, max(1, round(min(w, h) / 200)))
    out = Image.fromarray(a.astype(np.uint8))
    draw = ImageDraw.Draw(out)
    r = max(3, round(min(w, h) / 60))
    if state.selection.box is not None:
        l, t, rt, b = (v * s for v in state.selection.box)
        draw.rectangle((l, t, rt - 1, b - 1), outline=CORNER, width=max(1, r // 2))
    dots = [(p, POSITIVE if label == 1 else NEGATIVE) for p, label in zip(state.selection.points, state.selection.labels)]
    dots += [(state.corner, CORNER)] if state.corner is not None else []
    for (x, y), colour in dots:
        cx, cy = (x + 0.5) * s, (y + 0.5) * s
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour, outline=(255, 255, 255), width=max(1, r // 3))
    return out


def click(state: PanelState, image: Image.Image, segmenter: Any, xy: tuple[float, float], positive: bool,
          box_mode: bool, px: int, limits: Limits, text_segmenter: Any = None) -> PanelState:
    """The state after a click at display pixel `xy`: a new click (or a box corner) and the mask it selects,
    grown by the slider's `px`; after words, the click refines what they selected (`text_segmenter`). InputError
    (the state unchanged) when the selection is refused."""
    s = display_scale(image.size)
    x = min(image.size[0] - 1, max(0, int(xy[0] / s)))
    y = min(image.size[1] - 1, max(0, int(xy[1] / s)))
    if box_mode and state.corner is None:
        return replace(state, selection=state.selection.with_box(None), corner=(x, y))
    if box_mode:
        selection = Selection(box=box_from_corners(state.corner, (x, y)))
    else:
        selection = state.selection.add(x, y, positive)
    if selection.text and text_segmenter is None:  # words without their segmenter: the clicks alone
        selection = selection.with_text("")
    base = select_mask(text_segmenter if selection.text else segmenter, image, selection,
                       max_pixels=limits.max_pixels)[0]
    return replace(state, selection=selection, corner=None, base=base, offset=0, shown=grow(base, px), px=px,
                   from_click=True)


def words(state: PanelState, image: Image.Image, text_segmenter: Any, text: str, px: int,
          limits: Limits) -> PanelState:
    """The state after words naming the object: the mask the text segmenter selects (refined by the click
    segmenter), grown by the slider's `px`; clicks after it refine it. InputError (the state unchanged) when
    words are off, empty, or match nothing."""
    if text_segmenter is None:
        raise InputError("selection by words is off here: click the object instead")
    selection = Selection().with_text(text)
    if not selection.text:
        raise InputError("type the words that name the object, e.g. \"the red circle\"")
    base = select_mask(text_segmenter, image, selection, max_pixels=limits.max_pixels)[0]
    return replace(state, selection=selection, corner=None, base=base, offset=0, shown=grow(base, px), px=px,
                   from_click=True)


def regrow(state: PanelState, painted: np.ndarray, px: int) -> PanelState:
    """The state after the slider moved to `px`: the selection's mask grown (or shrunk) by `px`; when the
    layer was painted on since it was shown, the painted mask is grown by the slider's change instead."""
    base, offset = state.base, state.offset
    if base is None or state.shown is None or not np.array_equal(painted, state.shown):
        base, offset = painted, state.px
    return replace(state, base=base, offset=offset, shown=grow(base, px - offset), px=px,
                   from_click=state.from_click and base is state.base)


def tool(state: PanelState, name: str, painted: np.ndarray, image: Image.Image, px: int) -> PanelState:
    """The state after a mask tool ("invert", "fill", "specks", "snap", "clear") on the painted mask."""
    if name == "clear":
        return PanelState(px=px, key=state.key)
    if not painted.any() and name != "invert":
        raise InputError("the mask is empty: click the object or paint over it first")
    do: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "invert": invert, "fill": fill_holes, "specks": drop_specks,
        "snap": lambda m: snap(np.asarray(image), m)}
    mask = do[name](painted)
    return replace(state, corner=None, base=mask, offset=px, shown=mask, px=px, from_click=False)


def editor_update(image: Image.Image, mask: Optional[np.ndarray]) -> dict:
    """An ImageEditor value: the picture with the mask as its one layer (gradio draws layers when `composite`
    is None; the layer is exactly the picture's size)."""
    m = mask if mask is not None else np.zeros(image.size[::-1], bool)
    return {"background": image, "layers": [mask_layer(m)], "composite": None}


def edit_masks_for(state: PanelState, painted: np.ndarray, image: Image.Image, segmenter: Any,
                   limits: Limits) -> list[tuple[str, np.ndarray]]:
    """The masks a multi-mask Generate tries: SAM's three for an unchanged one-click selection, else the
    painted mask grown by 0, 10 and 20 % of its size (`blended.multimask.variant_grows`)."""
    sel = state.selection
    unchanged = state.from_click and state.shown is not None and np.array_equal(painted, state.shown)
    if unchanged and getattr(segmenter, "multimask", False) and len(sel.points) == 1 and sel.box is None \
            and not sel.text:
        found = select_mask(segmenter, image, sel, num_masks=3, max_pixels=limits.max_pixels)
        if len(found) > 1:
            return [(f"SAM mask {i + 1}", grow(m, state.px)) for i, m in enumerate(found)]
    return mask_variants(painted)


# -- the panel ----------------------------------------------------------------------------------

@dataclass
class MaskPanel:
    """The panel's components; `follow(event)` refreshes the clickable picture after `event` changed the
    editor's picture; `masks(value, state, multi)` gives what Generate edits with."""

    picture: Any
    mode: Any
    box: Any
    grow: Any
    multi: Any
    state: Any
    follow: Callable[[Any], Any]
    masks: Callable[[Optional[dict], PanelState, bool], Any]
    words: Any = None  # the text box (`#select-text`)


def build_mask_panel(image_editor: Any, segmenter: Any, limits: Limits, note: str = "",
                     text_segmenter: Any = "auto") -> MaskPanel:
    """The selection and mask tools under `image_editor` (call inside the Blocks' column): components and their
    handlers. `segmenter` (None: clicks are refused with a message) selects; `note` says which one is in use.
    `text_segmenter` selects from words: "auto" = `blended.select.shared_text_segmenter` refined by `segmenter`,
    loaded at the first words ($BLENDED_TEXT_SEGMENTER, else CLIPSeg, else the demo one); None = words off."""
    def fail(e: Exception, title: str = "Cannot select") -> gr.Error:
        return gr.Error(str(e), title=title)

    def text_seg() -> Any:
        if isinstance(text_segmenter, str) and text_segmenter == "auto":
            return shared_text_segmenter(None, None, segmenter)[0]  # one per server, shared by the sessions
        return text_segmenter

    with gr.Accordion("Select: click the object in the picture below, two corners of a box, or name it (then "
                      "adjust; the brush and eraser still refine it)",
                      open=True, elem_id="select-panel"):
        picture = gr.Image(label="Click the object to select it", show_label=False,  # a label would cover a corner
                           type="pil", format="png", interactive=False, buttons=[], height=420, elem_id="select-click",
                           placeholder="The picture in the editor shows here once uploaded: click on it.")
        with gr.Row():
            mode = gr.Radio(list(MODES), value=MODES[0], label="A click means", elem_id="select-mode")
            box = gr.Checkbox(label="Box: the next two clicks are its corners", value=False, elem_id="select-box")
        with gr.Row():
            words_box = gr.Textbox(label="Or name it (Enter): the object these words describe is selected",
                                   placeholder="the red circle", max_lines=1, scale=4, elem_id="select-text")
            words_go = gr.Button("Select", size="sm", scale=1, elem_id="select-text-go")
        grow_slider = gr.Slider(-GROW_RANGE, GROW_RANGE, step=1, value=0, label="Grow (+) / shrink (-) the mask, px",
                                elem_id="mask-grow")
        with gr.Row():
            buttons = {name: gr.Button(label, size="sm", elem_id=f"mask-{name}") for name, label in (
                ("invert", "Invert"), ("fill", "Fill holes"), ("specks", "Drop specks"), ("snap", "Snap to edges"),
                ("clear", "Clear"))}
        multi = gr.Checkbox(label="Try three mask sizes, ranked together (candidates are split over them)",
                            value=False, elem_id="multi-mask")
        gr.Markdown(note or "", elem_id="segmenter-note")
    state = gr.State(PanelState(), time_to_live=SELECTION_TTL_S)

    def refresh(value: Optional[dict], st: PanelState) -> Any:
        """A new picture in the editor: show it with its mask and forget the old selection. gradio may send the
        events that call this again for the same picture, concurrently with clicks: then it changes nothing, so
        a stale state cannot overwrite a click's."""
        try:
            image = background_of(value, limits)
        except InputError:
            return None, PanelState()
        key = image_key(np.asarray(image))
        if st is not None and st.key == key:  # the same picture: leave picture and state to the panel's own events
            return gr.skip(), gr.skip()
        st = PanelState(key=key)
        return overlay(image, current_mask(value, image.size), st), st

    def on_click(value: Optional[dict], st: PanelState, how: str, box_on: bool, px: float,
                 evt: gr.SelectData) -> Any:
        try:
            image = background_of(value, limits)
            new = click(st, image, segmenter, tuple(evt.index), how == MODES[0], bool(box_on), int(px), limits,
                        text_seg() if st is not None and st.selection.text else None)
        except (InputError, ModelLoadError) as e:
            raise fail(e) from None
        editor = gr.skip() if new.corner is not None else editor_update(image, new.shown)
        return editor, overlay(image, new.shown, new), new

    picture.select(on_click, inputs=[image_editor, state, mode, box, grow_slider],
                   outputs=[image_editor, picture, state], api_visibility="private", show_progress="minimal")

    def on_words(value: Optional[dict], st: PanelState, text: str, px: float) -> Any:
        try:
            image = background_of(value, limits)
            new = words(st or PanelState(), image, text_seg(), text, int(px), limits)
        except (InputError, ModelLoadError) as e:
            raise fail(e) from None
        return editor_update(image, new.shown), overlay(image, new.shown, new), new

    for trigger in (words_box.submit, words_go.click):
        trigger(on_words, inputs=[image_editor, state, words_box, grow_slider], outputs=[image_editor, picture, state],
                api_visibility="private", show_progress="minimal")

    def on_grow(value: Optional[dict], st: PanelState, px: float) -> Any:
        try:
            image = background_of(value, limits)
        except InputError as e:
            raise fail(e, "Cannot grow") from None
        new = regrow(st, current_mask(value, image.size), int(px))
        return editor_update(image, new.shown), overlay(image, new.shown, new), new

    grow_slider.release(on_grow, inputs=[image_editor, state, grow_slider], outputs=[image_editor, picture, state],
                        api_visibility="private", show_progress="minimal")

    for name, button in buttons.items():
        def on_tool(value: Optional[dict], st: PanelState, px: float, name: str = name) -> Any:
            try:
                image = background_of(value, limits)
                new = tool(st, name, current_mask(value, image.size), image, int(px))
            except InputError as e:
                raise fail(e, "Cannot change the mask") from None
            return editor_update(image, new.shown), overlay(image, new.shown, new), new

        button.click(on_tool, inputs=[image_editor, state, grow_slider], outputs=[image_editor, picture, state],
                     api_visibility="private", show_progress="minimal")

    def follow(event: Any) -> Any:
        return event.then(refresh, inputs=[image_editor, state], outputs=[picture, state], queue=False,
                          show_progress="hidden",  # its overlay would swallow the next click
                          api_visibility="private")

    def masks(value: Optional[dict], st: PanelState, on: bool) -> Any:
        """None (edit with the painted mask) or [(label, mask)] for a multi-mask edit."""
        if not on:
            return None
        image = background_of(value, limits)
        return edit_masks_for(st or PanelState(), current_mask(value, image.size), image, segmenter, limits)

    return MaskPanel(picture=picture, mode=mode, box=box, grow=grow_slider, multi=multi, state=state, follow=follow,
                     masks=masks, words=words_box)
