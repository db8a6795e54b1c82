"""Selection (issue 22): tiny-SAM wiring and its embedding cache, GrabCut on synthetic shapes, mask tools,
bad input, `mask_grow`, the multi-mask ranking and the CLI's --select."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from blended import EditConfig, InputError
from blended.select import (GrabCutSegmenter, SamSegmenter, Selection, drop_specks, fill_holes, grow, invert,
                            load_segmenter, parse_box, parse_points, select_mask, snap)
from blended_dev.tiny_sam import build_sam


def iou(a, b) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def disk(h, w, cx, cy, r) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return (x - cx) ** 2 + (y - cy) ** 2 <= r * r


def shapes(h=96, w=128, seed=0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A muted noisy background with a red disk and a blue square: (image, disk mask, square mask)."""
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal(120, 12, (h, w, 3)), 0, 255)
    circle = disk(h, w, 40, 48, 22)
    square = np.zeros((h, w), bool)
    square[30:70, 80:118] = True
    img[circle] = (210, 40, 40)
    img[square] = (40, 70, 210)
    return img.astype(np.uint8), circle, square


@pytest.fixture(scope="module")
def sam(tmp_path_factory):
    segmenter, note = load_segmenter(str(build_sam(tmp_path_factory.mktemp("sam"))))
    assert isinstance(segmenter, SamSegmenter) and "Segment Anything" in note
    return segmenter


# -- Segment Anything (tiny, random weights) ------------------------------------------------------

def test_sam_click_gives_masks_of_the_image_size(sam):
    image, _, _ = shapes()
    one = sam.select(image, Selection().add(40, 48), num_masks=3)
    assert len(one) == 3 and all(m.shape == (96, 128) and m.dtype == bool for m in one)  # multimask for one click
    two = sam.select(image, Selection().add(40, 48).add(100, 50), num_masks=3)
    assert len(two) == 1  # several clicks: SAM's single mask
    assert len(sam.select(image, Selection(box=(10, 20, 70, 80)))) == 1


def test_sam_prompts_reach_the_model_scaled_and_labelled(sam, monkeypatch):
    seen = {}
    forward = sam.model.forward

    def spy(*args, **kw):
        seen.update(kw)
        return forward(*args, **kw)

    monkeypatch.setattr(sam.model, "forward", spy)
    image, _, _ = shapes()  # 128 x 96: the processor resizes the longer side to 64
    sam.select(image, Selection().add(40, 48).add(100, 50, positive=False).with_box((10, 20, 70, 80)))
    assert seen["input_labels"].tolist() == [[[1, 0]]]  # a negative click is label 0, not -1 ("no point")
    np.testing.assert_allclose(seen["input_points"][0, 0].numpy(), [[20, 24], [50, 25]], atol=1e-4)
    np.testing.assert_allclose(seen["input_boxes"][0, 0].numpy(), [5, 10, 35, 40], atol=1e-4)
    assert seen["multimask_output"] is False and "pixel_values" not in seen


def test_sam_embeds_each_image_once_and_the_cache_is_bounded(tmp_path):
    sam = SamSegmenter.load(str(build_sam(tmp_path / "sam")), cache_size=2)
    calls = []
    embed = sam.model.get_image_embeddings
    sam.model.get_image_embeddings = lambda *a, **k: calls.append(1) or embed(*a, **k)
    images = [shapes(seed=s)[0] for s in range(3)]
    for x in (10, 40, 90):  # three clicks on one image: one encoder call
        sam.select(images[0], Selection().add(x, 40))
    assert len(calls) == 1
    sam.select(images[1], Selection().add(40, 40))
    sam.select(images[2], Selection().add(40, 40))
    assert len(calls) == 3 and len(sam.cache) == 2  # bounded: the oldest image went
    sam.select(images[2], Selection().add(20, 20))
    assert len(calls) == 3
    sam.select(images[0], Selection().add(20, 20))
    assert len(calls) == 4  # evicted, so embedded again


def test_a_segmenter_that_cannot_load_falls_back_to_grabcut(tmp_path):
    segmenter, note = load_segmenter(str(tmp_path / "no-such-sam"))
    assert isinstance(segmenter, GrabCutSegmenter)
    assert note.startswith("selection: GrabCut") and "cannot load the segmenter" in note and "\n" not in note
    assert load_segmenter("none")[0] is None


# -- GrabCut ------------------------------------------------------------------------------------------

def test_grabcut_selects_a_shape_from_one_click_or_a_box():
    image, circle, square = shapes()
    seg = GrabCutSegmenter()
    (mask,) = seg.select(image, Selection().add(40, 48))
    assert iou(mask, circle) > 0.9
    (mask,) = seg.select(image, Selection().add(98, 50))
    assert iou(mask, square) > 0.9
    (mask,) = seg.select(image, Selection(box=(14, 22, 67, 75)))
    assert iou(mask, circle) > 0.9


def test_grabcut_negative_click_removes_a_part():
    image, circle, square = shapes()
    seg = GrabCutSegmenter()
    box = (10, 18, 125, 78)  # both objects
    (both,) = seg.select(image, Selection(box=box))
    assert iou(both, circle | square) > 0.85
    (mask,) = seg.select(image, Selection(box=box).add(40, 48).add(98, 50, positive=False))
    assert iou(mask, circle) > 0.85 and (mask & square).sum() < 0.1 * square.sum()


def test_grabcut_works_on_a_downscaled_copy_of_a_large_image():
    image, circle, _ = shapes()
    big = np.asarray(Image.fromarray(image).resize((1280, 960), Image.Resampling.NEAREST))
    (mask,) = GrabCutSegmenter(work_side=256).select(big, Selection().add(400, 480))
    truth = np.asarray(Image.fromarray(circle).resize((1280, 960), Image.Resampling.NEAREST))
    assert mask.shape == (960, 1280) and iou(mask, truth) > 0.9


# -- mask tools --------------------------------------------------------------------------------------

def test_grow_and_shrink_are_euclidean():
    dot = np.zeros((41, 41), bool)
    dot[20, 20] = True
    grown = grow(dot, 5)
    assert (grown == disk(41, 41, 20, 20, 5)).all()
    assert (grow(grown, -5) == dot).all() and not grow(grown, -6).any()
    with pytest.raises(ValueError):
        grow(dot, 1000)


def test_invert_fill_holes_drop_specks():
    ring = disk(40, 40, 20, 20, 12) & ~disk(40, 40, 20, 20, 5)
    assert (fill_holes(ring) == disk(40, 40, 20, 20, 12)).all()
    assert (invert(ring) == ~ring).all()
    specks = ring.copy()
    specks[1, 1] = specks[38, 2] = True
    assert (drop_specks(specks) == ring).all()
    edge = np.zeros((40, 40), bool)
    edge[:, :3] = True  # a region touching the border is no hole
    assert (fill_holes(~edge & ~disk(40, 40, 20, 20, 3)) == ~edge).all()


def test_snap_brings_a_rough_stroke_to_the_object():
    image, circle, _ = shapes()
    rough = grow(circle, 5) & ~disk(96, 128, 40, 30, 6)  # painted over the edge, a bite missing
    assert iou(rough, circle) < 0.8
    snapped = snap(image, rough)
    assert iou(snapped, circle) > 0.93


# -- bad input -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("selection, message", [
    (Selection().add(128, 10), "outside the 128x96 image"),
    (Selection().add(-1, 10), "outside the 128x96 image"),
    (Selection(box=(10, 10, 10, 40)), "has no area"),
    (Selection(box=(10, 10, 200, 40)), "reaches outside"),
    (Selection().add(10, 10, positive=False), "negative clicks alone select nothing"),
])
def test_bad_selections_get_one_line(selection, message):
    image, _, _ = shapes()
    with pytest.raises(InputError, match=message):
        select_mask(GrabCutSegmenter(), image, selection)


def test_no_segmenter_huge_image_and_bad_flags():
    image, _, _ = shapes()
    with pytest.raises(InputError, match="no segmenter is available"):
        select_mask(None, image, Selection().add(10, 10))
    with pytest.raises(InputError, match="over the limit"):
        select_mask(GrabCutSegmenter(), image, Selection().add(10, 10), max_pixels=100 * 90)
    with pytest.raises(InputError, match="pairs"):
        parse_points("10,20,30")
    with pytest.raises(InputError, match="comma-separated numbers"):
        parse_points("ten,20")
    with pytest.raises(InputError, match="four"):
        parse_box("1,2,3")
    assert parse_points("10, 20,30,40") == [(10, 20), (30, 40)] and parse_box("1,2,3,4") == (1, 2, 3, 4)


# -- the edit: mask_grow and several masks -------------------------------------------------------------

def edit_case(editor):
    from conftest import box_mask, scene

    n = editor.model.native_size
    return scene(2 * n, 2 * n, seed=5), box_mask(2 * n, 2 * n, (n // 2, n // 2, n, n))


def test_mask_grow_equals_editing_with_the_grown_mask(sd1_editor):
    image, mask = edit_case(sd1_editor)
    cfg = sd1_editor.defaults.replace(num_candidates=1, num_inference_steps=3, feather=0)
    grown = Image.fromarray(grow(np.asarray(mask) > 0, 6).astype(np.uint8) * 255)
    a = sd1_editor.edit(image, mask, "a red hat", cfg.replace(mask_grow=6)).images[0]
    b = sd1_editor.edit(image, grown, "a red hat", cfg).images[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    ring = grow(np.asarray(mask) > 0, 5) & ~(np.asarray(mask) > 0)
    plain = sd1_editor.edit(image, mask, "a red hat", cfg).images[0]
    assert np.array_equal(np.asarray(plain)[ring], np.asarray(image)[ring])  # without grow the ring is kept
    assert not np.array_equal(np.asarray(a)[ring], np.asarray(image)[ring])  # grown, it is edited
    inverted = sd1_editor.edit(image, mask, "a red hat", cfg.replace(mask_grow=6, invert_mask=True)).images[0]
    keep = grow(np.asarray(mask) > 0, -6)  # inverted, the edit grows into the mask: the kept part shrinks
    assert np.array_equal(np.asarray(inverted)[keep], np.asarray(image)[keep])
    lost = (np.asarray(mask) > 0) & ~grow(keep, 1)
    assert not np.array_equal(np.asarray(inverted)[lost], np.asarray(image)[lost])
    with pytest.raises(InputError, match="mask_grow"):
        sd1_editor.edit(image, mask, "a red hat", cfg.replace(mask_grow=999))


class RedRanker:
    """Scores a candidate by its mean red inside the mask (a stand-in for CLIP with a known order)."""

    def __init__(self):
        self.masks = []

    def score(self, images, mask, prompt):
        self.masks.append(np.asarray(mask, bool))
        return [{"score": float(np.asarray(im, np.float32)[..., 0][mask].mean())} for im in images]


def test_multi_mask_splits_the_candidates_and_ranks_them_together(sd1_editor):
    from blended import Editor
    from blended.multimask import edit_masks, mask_variants

    image, mask = edit_case(sd1_editor)
    cfg = sd1_editor.defaults.replace(num_candidates=4, num_inference_steps=2, seed=10)
    ranker = RedRanker()
    editor = Editor(sd1_editor.model, ranker)
    variants = mask_variants(np.asarray(mask) > 0, (0, 4, 8))
    result = edit_masks(editor, image, variants, "a red hat", cfg)
    assert [c.mask for c in sorted(result.candidates, key=lambda c: c.seed)] == \
        ["grow +0 px", "grow +0 px", "grow +4 px", "grow +8 px"]  # 4 candidates split 2 / 1 / 1, seeds 10..13
    assert [c.seed for c in sorted(result.candidates, key=lambda c: c.seed)] == [10, 11, 12, 13]
    scores = [c.score for c in result.candidates]
    assert scores == sorted(scores, reverse=True)
    assert (ranker.masks[-1] == variants[-1][1]).all()  # judged on the union: the largest mask here
    third = next(c for c in result.candidates if c.seed == 12)  # the same image as a plain edit with its mask
    alone = sd1_editor.edit(image, Image.fromarray(variants[1][1]), "a red hat", cfg.replace(num_candidates=1, seed=12))
    assert np.array_equal(np.asarray(third.image), np.asarray(alone.images[0]))
    assert {c["mask"] for c in result.to_json()["candidates"]} == {"grow +0 px", "grow +4 px", "grow +8 px"}


# -- the command line ---------------------------------------------------------------------------------

def test_cli_select_writes_the_mask_and_edits_inside_it(tiny_dirs, tmp_path):
    from blended.__main__ import main

    img = np.clip(np.random.default_rng(1).normal(120, 12, (64, 96, 3)), 0, 255).astype(np.uint8)
    circle = disk(64, 96, 40, 32, 20)
    img[circle] = (210, 40, 40)
    Image.fromarray(img).save(tmp_path / "photo.png")
    code = main(["edit", "--image", str(tmp_path / "photo.png"), "--select", "40,32", "--prompt", "a hat",
                 "--model", str(tiny_dirs["sd1"]), "--segmenter", "grabcut", "--candidates", "1", "--steps", "2",
                 "--mask-grow", "2", "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0
    mask = np.asarray(Image.open(tmp_path / "out" / "mask.png")) > 0
    assert iou(mask, circle) > 0.9
    info = json.loads((tmp_path / "out" / "result.json").read_text())
    assert info["settings"]["mask_grow"] == 2
    out = np.asarray(Image.open(tmp_path / "out" / "01.png"))
    far = ~grow(mask, 2 + EditConfig().feather + 1)
    assert np.array_equal(out[far], img[far])


@pytest.mark.parametrize("argv, message", [
    (["--select", "500,5"], "outside the 96x64 image"),
    (["--select-box", "5,5,5,20"], "has no area"),
    (["--select", "5,5", "--mask", "m.png"], "not both"),
    ([], "give the region to edit"),
    (["--select", "5,5", "--segmenter", "none"], "no segmenter is available"),
])
def test_cli_bad_selection_exits_2_with_one_line(tmp_path, capsys, argv, message):
    from blended.__main__ import main

    Image.fromarray(shapes(64, 96)[0]).save(tmp_path / "photo.png")
    code = main(["edit", "--image", str(tmp_path / "photo.png"), "--prompt", "x", "--out", str(tmp_path / "o"),
                 *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and err[-1].startswith("error: ")


# -- the app's panel logic (ui/mask_panel.py) -------------------------------------------------------

def test_panel_click_puts_the_mask_into_the_editor_as_a_layer(sam):
    from ui import Limits
    from ui.editing import mask_from_layers
    from ui.mask_panel import PanelState, click, display_scale, edit_masks_for, editor_update, regrow, tool

    image, circle, square = shapes()
    picture, limits, seg = Image.fromarray(image), Limits(), GrabCutSegmenter()
    k = display_scale(picture.size)  # the clickable picture is served enlarged: clicks come in its pixels
    st = click(PanelState(), picture, seg, (40 * k, 48 * k), True, False, 0, limits)
    assert iou(st.shown, circle) > 0.9 and st.selection.labels == (1,)
    value = editor_update(picture, st.shown)
    (layer,) = value["layers"]
    assert value["composite"] is None and layer.mode == "RGBA" and layer.size == picture.size
    assert (np.asarray(mask_from_layers([layer], picture.size)) > 0).tolist() == st.shown.tolist()

    grown = regrow(st, st.shown, 4)  # the slider: the selection grown by 4 px
    assert (grown.shown == grow(st.base, 4)).all()
    assert (regrow(grown, grown.shown, 0).shown == st.base).all()  # back to 0: the selection again
    painted = grown.shown.copy()
    painted[:5, :5] = True  # painted on since: the slider grows the painted mask from there
    assert (regrow(grown, painted, 6).shown == grow(painted, 2)).all()

    corner = click(st, picture, seg, (14 * k, 22 * k), True, True, 0, limits)  # box: the first corner waits
    assert corner.corner == (14, 22) and corner.shown is st.shown
    boxed = click(corner, picture, seg, (66 * k, 74 * k), True, True, 0, limits)
    assert boxed.selection.box == (14, 22, 67, 75) and iou(boxed.shown, circle) > 0.9

    assert (tool(st, "invert", st.shown, picture, 0).shown == ~st.shown).all()
    assert tool(st, "clear", st.shown, picture, 0).shown is None
    with pytest.raises(InputError, match="the mask is empty"):
        tool(st, "snap", np.zeros_like(circle), picture, 0)
    with pytest.raises(InputError, match="over the limit"):
        click(st, picture, seg, (40 * k, 48 * k), True, False, 0, Limits(max_pixels=100))
    with pytest.raises(InputError, match="no segmenter"):
        click(PanelState(), picture, None, (40 * k, 48 * k), True, False, 0, limits)

    labels = [label for label, _ in edit_masks_for(st, st.shown, picture, seg, limits)]
    assert labels[0] == "grow +0 px" and len(labels) == 3  # GrabCut: grown variants
    one = click(PanelState(), picture, sam, (40 * k, 48 * k), True, False, 0, limits)
    variants = edit_masks_for(one, one.shown, picture, sam, limits)  # SAM, one click: its three masks
    assert [label for label, _ in variants] == ["SAM mask 1", "SAM mask 2", "SAM mask 3"]
    assert (variants[0][1] == one.shown).all()
