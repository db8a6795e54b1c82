"""Soft masks: strength maps, per-step thresholds (Differential Diffusion) and how they compose with
shrinking and core_steps; a hard mask keeps today's schedule and results exactly."""

import numpy as np
import pytest
import torch
from PIL import Image

from blended import InputError
from blended.images import load_mask, load_mask_values
from blended.masks import crop_strength, latent_strength, mask_schedule, step_threshold, strength_map
from conftest import box_mask, scene


def test_strength_map_of_a_hard_mask_without_blur_is_the_mask():
    m = np.zeros((16, 16), bool)
    m[4:9, 3:12] = True
    s = strength_map(m)
    assert s.dtype == np.float32 and np.array_equal(s, m.astype(np.float32))


def test_blur_softens_the_edge_outwards_and_is_zero_far_away():
    m = np.zeros((64, 64), bool)
    m[:, 32:] = True
    s = strength_map(m, 4.0)
    row = s[10]
    assert np.all(row[32:] == 1)  # the mask's own pixels keep full strength
    assert 0.4 < row[31] <= 0.5 and np.all(np.diff(row) >= 0) and row[0] == 0  # about 0.5 at the edge, falling outwards
    assert row[32 - 12] == 0 and row[32 - 10] > 0  # kernel of 2 * 10 + 1: 2.5 sigma
    assert np.allclose(s * 255, np.round(s * 255), atol=1e-4)  # 8-bit levels
    grey = np.where(m, 0.4, 0.0).astype(np.float32)
    assert np.all(strength_map(grey, 4.0)[:, 32:] == np.float32(round(0.4 * 255) / 255))  # grey strengths kept


def test_latent_strength_modes():
    s = np.zeros((8, 8), np.float32)
    s[0:4, 0:4] = 1.0
    s[0, 4] = 0.5  # one pixel of the next latent
    assert latent_strength(s, 4)[0, 0].tolist() == [[1, 0.5], [0, 0]]  # any: the strongest pixel
    assert latent_strength(s, 4, "core")[0, 0].tolist() == [[1, 0], [0, 0]]  # core: the weakest
    assert latent_strength(s, 4, "nearest")[0, 0].tolist() == [[1, 0], [0, 0]]  # the pixel at the centre
    with pytest.raises(ValueError):
        latent_strength(s, 4, "mean")


def test_a_latent_of_strength_s_is_free_in_the_last_s_n_steps():
    n = 20
    strength = torch.tensor([0.0, 0.05, 0.25, 0.5, 0.999, 1.0]).view(1, 1, 1, 6)
    free = torch.stack([step_threshold(strength, i, n) for i in range(n)])[:, 0, 0, 0]  # (steps, 6)
    assert free.sum(0).tolist() == [0, 1, 5, 10, 20, 20]
    assert all(torch.all(a <= b) for a, b in zip(free, free[1:])), "once free, free to the end"
    assert torch.equal(step_threshold(torch.tensor([0.0, 1.0]), 0, n), torch.tensor([0.0, 1.0]))


def test_schedule_of_a_hard_map_is_the_hard_schedule_and_soft_ends_on_the_support():
    pixels = np.zeros((32, 32), bool)
    pixels[6:23, 5:19] = True
    hard = latent_strength(pixels.astype(np.float32), 4)
    soft = latent_strength(strength_map(pixels, 4.0), 4)
    assert torch.all(soft <= 1) and bool(((soft > 0) & (soft < 1)).any())
    sched = mask_schedule(soft, 12, (7, 5, 3, 1), shrink=False)
    assert torch.equal(sched[-1], (soft > 0).float())  # the last step: every latent with any strength
    assert torch.equal(sched[0], (soft > 1 - 1 / 12).float())  # the first: only the (nearly) full-strength ones
    assert all(torch.all(a <= b) for a, b in zip(sched, sched[1:])), "without shrinking the soft mask only grows"
    shrunk = mask_schedule(soft, 12, (7, 5, 3, 1))
    assert all(torch.all(a >= b) for a, b in zip(shrunk, sched)), "shrinking dilates each step's mask"
    assert torch.equal(shrunk[-1], sched[-1])
    core = latent_strength(strength_map(pixels, 4.0), 4, "core")
    with_core = mask_schedule(soft, 12, (7, 5, 3, 1), core=core, core_steps=0.5)
    assert all(torch.equal(a, step_threshold(core, i, 12)) for i, a in enumerate(with_core[:6]))
    assert all(torch.equal(a, b) for a, b in zip(with_core[6:], shrunk[6:]))


def test_load_mask_values_keeps_grey_levels_and_load_mask_thresholds_them():
    grey = np.full((8, 8), 100, np.uint8)
    grey[0, 0] = 255
    v = load_mask_values(Image.fromarray(grey), (8, 8))
    assert v.dtype == np.float32 and v[0, 0] == 1 and abs(v[1, 1] - 100 / 255) < 1e-6
    assert load_mask(Image.fromarray(grey), (8, 8)).sum() == 1
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 3] = 64
    assert abs(load_mask_values(Image.fromarray(rgba, "RGBA"), (8, 8))[0, 0] - 64 / 255) < 1e-6  # alpha


def test_crop_strength_area_averages():
    s = np.zeros((8, 8), np.float32)
    s[:, 4:] = 1.0
    assert crop_strength(s, (2, 0, 6, 8), (2, 4)).tolist() == [[0, 1]] * 4
    assert np.allclose(crop_strength(s, (0, 0, 8, 8), (1, 1)), 0.5)


def test_hard_mask_blur_0_gives_todays_results_and_soft_settings_change_them(sd1_editor):
    image, mask = scene(32, 32), box_mask(32, 32, (5, 6, 21, 23))
    kw = dict(num_candidates=2, num_inference_steps=6, rank=False, background="none", core_steps=0.5)
    base = sd1_editor.edit(image, mask, "a cat", **kw).images
    same = [sd1_editor.edit(image, mask, "a cat", mask_blur=0.0, **kw).images,
            sd1_editor.edit(image, mask, "a cat", soft_mask=True, **kw).images]  # a binary mask read as strengths
    for run in same:
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(base, run))
    blurred = sd1_editor.edit(image, mask, "a cat", mask_blur=3.0, soft_mask=True, **kw).images  # blur in the loop
    assert not np.array_equal(np.asarray(blurred[0]), np.asarray(base[0]))
    grey = Image.fromarray((np.asarray(mask) // 2).astype(np.uint8))  # all strength 0.5: thresholded it is empty
    with pytest.raises(InputError):
        sd1_editor.edit(image, grey, "a cat", **kw)
    half = sd1_editor.edit(image, grey, "a cat", soft_mask=True, **kw).images
    assert not np.array_equal(np.asarray(half[0]), np.asarray(base[0]))
    with pytest.raises(InputError):
        sd1_editor.edit(image, Image.new("L", (32, 32), 0), "a cat", soft_mask=True, **kw)


def test_soft_composite_keeps_the_source_where_strength_is_0(sd1_editor):
    image, mask = scene(32, 32), box_mask(32, 32, (10, 9, 22, 21))
    kw = dict(num_candidates=1, num_inference_steps=4, rank=False)  # the default background: exact outside
    hard = sd1_editor.edit(image, mask, "a cat", **kw).images[0]
    assert np.array_equal(np.asarray(hard), np.asarray(sd1_editor.edit(image, mask, "a cat", mask_blur=0.0, **kw).images[0]))
    soft = sd1_editor.edit(image, mask, "a cat", mask_blur=2.0, **kw).images[0]
    strength = strength_map(np.asarray(mask) > 127, 2.0)
    src, out = np.asarray(image), np.asarray(soft)
    assert np.array_equal(out[strength == 0], src[strength == 0])  # beyond the blur: the upload, bit for bit
    ring = (strength > 0) & (strength < 1)
    assert ring.any() and not np.array_equal(out[ring], src[ring])  # the blurred ring outside the mask changes


def test_mask_blur_alone_softens_the_composite_and_soft_mask_takes_it_into_the_loop(sd1_editor):
    """`mask_blur` without `soft_mask` keeps the loop's hard mask (the candidates inside the mask are the
    hard edit's, pixel for pixel) and fades the seam over the blur; with `soft_mask` the blurred strengths
    steer the loop too (Differential Diffusion), so the edit inside the mask changes."""
    image, mask = scene(32, 32), box_mask(32, 32, (8, 8, 24, 24))
    kw = dict(num_candidates=2, num_inference_steps=6, rank=False)
    inside = np.asarray(mask) > 127
    hard = sd1_editor.edit(image, mask, "a cat", **kw).images
    blur = sd1_editor.edit(image, mask, "a cat", mask_blur=3.0, **kw).images
    loop = sd1_editor.edit(image, mask, "a cat", mask_blur=3.0, soft_mask=True, **kw).images
    for h, b in zip(hard, blur):
        assert np.array_equal(np.asarray(h)[inside], np.asarray(b)[inside])
    ring = (strength_map(inside, 3.0) > 0) & ~inside
    assert not np.array_equal(np.asarray(hard[0])[ring], np.asarray(blur[0])[ring])  # the seam is faded another way
    assert not all(np.array_equal(np.asarray(h)[inside], np.asarray(s)[inside]) for h, s in zip(hard, loop))


def test_cli_flags_reach_the_settings():
    from blended.__main__ import _overrides, build_parser

    args = build_parser().parse_args(["edit", "--image", "a.png", "--mask", "m.png", "--prompt", "x",
                                      "--mask-blur", "4", "--soft-mask"])
    assert _overrides(args) == {"mask_blur": 4.0, "soft_mask": True}
    assert "soft_mask" not in _overrides(build_parser().parse_args(["edit", "--image", "a", "--mask", "m", "--prompt", "x"]))


def test_app_slider_and_edit_endpoint_setting():
    from blended import EditConfig
    from ui import Limits
    from ui.demo import settings_widgets
    from ui.editing import settings_to_config

    limits = Limits(max_candidates=4, max_steps=50)
    assert settings_to_config(EditConfig(), {"mask_blur": 8}, limits).mask_blur == 8.0  # the /edit API's settings
    with pytest.raises(InputError):
        settings_to_config(EditConfig(), {"mask_blur": -1}, limits)
    import gradio as gr

    with gr.Blocks():
        w = settings_widgets(EditConfig(), limits)
    assert w["mask_blur"].elem_id == "mask-blur" and w["mask_blur"].value == 0
