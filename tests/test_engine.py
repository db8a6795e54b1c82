"""Invariants of the blending loop and the Editor on tiny SD-shaped models."""

import numpy as np
import pytest
import torch
from PIL import Image

from blended import EditCancelled, Editor, InputError, ModelLoadError, load_model
from blended.schedulers import make_scheduler, schedule
from blended.masks import core_mask, latent_mask, mask_schedule
from blended.sampler import blend_loop
from conftest import box_mask, scene


def _loop_parts(editor, scheduler_name, steps, blend_start, seed=0, batch=2):
    """Real scheduler pieces and a z_init from the tiny VAE, with a random-but-fixed 'denoiser'."""
    sched, noiser, timesteps = schedule(editor.model.pipe, scheduler_name, steps, blend_start)
    from tests_helpers import encode

    source = encode(editor, scene(32, 32))
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((batch,) + source.shape[1:], generator=g)
    weight = torch.randn(source.shape[1:], generator=g) * 0.1
    denoise = lambda x, t: torch.tanh(x) * 0.5 + weight  # noqa: E731  (any function of the latents will do)
    step = lambda eps, t, x: sched.step(eps, t, x, return_dict=False)[0]  # noqa: E731
    return denoise, step, noiser, source, noise, timesteps


@pytest.mark.parametrize("scheduler_name", ["ddim", "dpm++"])
def test_outside_mask_latents_equal_noised_source_at_every_step(sd1_editor, scheduler_name):
    denoise, step, noiser, source, noise, timesteps = _loop_parts(sd1_editor, scheduler_name, 12, 0.25)
    m = torch.zeros(1, 1, 8, 8)
    m[..., 2:5, 3:7] = 1
    masks = mask_schedule(m, len(timesteps), (5, 3, 1))
    seen = []
    out = blend_loop(denoise, step, noiser.add_noise, source, noise, masks, timesteps,
                     on_step=lambda i, t, z: seen.append(z.clone()))
    assert len(seen) == len(timesteps) == 9
    for i, z in enumerate(seen):
        expected = source.expand_as(noise) if i == len(timesteps) - 1 else \
            noiser.add_noise(source.expand_as(noise), noise, timesteps[i + 1:i + 2])
        outside = (1 - masks[i]).bool().expand_as(z)
        assert torch.equal(z[outside], expected[outside]), f"step {i}"
        assert not torch.allclose(z[~outside], expected[~outside]), "inside the mask the model must act"
    assert torch.equal(out[(1 - m).bool().expand_as(out)], source.expand_as(out)[(1 - m).bool().expand_as(out)])


def test_empty_mask_returns_source_latents_exactly(sd1_editor):
    denoise, step, noiser, source, noise, timesteps = _loop_parts(sd1_editor, "ddim", 10, 0.25)
    masks = [torch.zeros(1, 1, 8, 8)] * len(timesteps)
    out = blend_loop(denoise, step, noiser.add_noise, source, noise, masks, timesteps)
    assert torch.equal(out, source.expand_as(out))


def test_mask_schedule_dilates_early_and_ends_on_true_mask():
    mask = np.zeros((32, 32), bool)
    mask[15:17, 4:28] = True  # a 2-pixel line: one latent row at x4 downsampling
    m = latent_mask(mask, 4)
    assert m.shape == (1, 1, 8, 8) and m.sum() == 6 * 2  # rows 3 and 4, columns 1..6 (any-coverage)
    sched = mask_schedule(m, 8, (7, 5, 3, 1))
    sums = [float(s.sum()) for s in sched]
    assert sums[0] == sums[1] > sums[2] == sums[3] > sums[4] == sums[5] > sums[6] == sums[7] == float(m.sum())
    assert all(torch.all(a >= b) for a, b in zip(sched, sched[1:])), "masks only shrink"
    assert all(torch.equal(s, m) for s in mask_schedule(m, 8, shrink=False))


def test_core_steps_start_inside_the_mask_and_end_on_the_true_mask():
    mask = np.zeros((32, 32), bool)
    mask[6:23, 5:19] = True  # not on the x4 grid: the latent mask covers more than the pixel mask
    m, core = latent_mask(mask, 4), core_mask(mask, 4)
    assert m.sum() == 5 * 4 and core.sum() == 3 * 2  # rows 1..5 x cols 1..4; wholly inside: rows 2..4 x cols 2..3
    assert torch.all(m >= core)
    sched = mask_schedule(m, 8, (7, 5, 3, 1), core=core, core_steps=0.5)
    assert all(torch.equal(s, core) for s in sched[:4])
    assert [torch.equal(a, b) for a, b in zip(sched[4:], mask_schedule(m, 8, (7, 5, 3, 1))[4:])] == [True] * 4
    assert torch.equal(sched[-1], m)
    assert torch.equal(mask_schedule(m, 4, core=core, core_steps=0.99)[-1], m)  # the last step: the true mask
    thin = np.zeros((32, 32), bool)
    thin[5:8, 4:28] = True  # 3 px: no latent wholly inside
    tm = latent_mask(thin, 4)
    assert core_mask(thin, 4).sum() == 0
    assert [torch.equal(a, b) for a, b in zip(mask_schedule(tm, 8, core=core_mask(thin, 4), core_steps=0.5),
                                              mask_schedule(tm, 8))] == [True] * 8  # thin: the paper's schedule


def test_full_mask_equals_diffusers_img2img(sd1_editor):
    """With the whole image masked, blending is a no-op: the result is SDEdit from the noised source,
    exactly what diffusers' img2img pipeline computes at strength = 1 - blend_start."""
    from diffusers import StableDiffusionImg2ImgPipeline
    from tests_helpers import encode

    pipe = sd1_editor.model.pipe
    image = scene(32, 32, seed=3)
    full = Image.new("L", (32, 32), 255)
    steps, blend_start, seed, guidance = 10, 0.3, 7, 4.0
    ours = sd1_editor.edit(image, full, "a red circle", num_inference_steps=steps, blend_start=blend_start,
                           seed=seed, num_candidates=1, guidance_scale=guidance, rank=False)
    i2i = StableDiffusionImg2ImgPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                         unet=pipe.unet, scheduler=make_scheduler(pipe, "ddim"), safety_checker=None,
                                         feature_extractor=None, requires_safety_checker=False)
    i2i.set_progress_bar_config(disable=True)
    theirs = i2i("a red circle", image=encode(sd1_editor, image), strength=1 - blend_start,
                 num_inference_steps=steps, guidance_scale=guidance,
                 generator=torch.Generator().manual_seed(seed)).images[0]
    a, b = np.asarray(ours.images[0], np.int16), np.asarray(theirs, np.int16)
    assert a.shape == b.shape == (32, 32, 3)
    assert np.abs(a - b).max() <= 1
    # and the source is really re-generated, not passed through
    assert np.abs(a - np.asarray(image, np.int16)).mean() > 2


def test_same_seed_same_images_and_batching_does_not_matter(sd1_editor):
    image, mask = scene(40, 32), box_mask(40, 32, (8, 8, 28, 24))
    kw = dict(num_inference_steps=6, num_candidates=3, rank=False)
    a = sd1_editor.edit(image, mask, "a blue square", seed=11, batch_size=3, **kw)
    b = sd1_editor.edit(image, mask, "a blue square", seed=11, batch_size=1, **kw)
    c = sd1_editor.edit(image, mask, "a blue square", seed=12, **kw)
    assert [x.seed for x in a.candidates] == [11, 12, 13]
    for x, y in zip(a.images, b.images):
        assert np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max() <= 1
    # candidate i uses seed + i: seed 12's first candidate is seed 11's second
    assert np.abs(np.asarray(c.images[0], np.int16) - np.asarray(a.images[1], np.int16)).max() <= 1
    assert np.abs(np.asarray(a.images[0], np.int16) - np.asarray(a.images[1], np.int16)).mean() > 0.5


def test_non_square_keeps_size(sd1_editor):
    image, mask = scene(48, 32), box_mask(48, 32, (20, 8, 40, 24))
    r = sd1_editor.edit(image, mask, "a cat", num_inference_steps=4, num_candidates=2, rank=False)
    assert r.region.whole and r.region.work_size == (48, 32)  # shorter side at the native 32 px: its own pixels
    assert all(im.size == (48, 32) for im in r.images)
    assert r.to_json()["candidates"][1]["seed"] == 1


def test_oversized_image_is_edited_in_a_crop_and_far_pixels_are_kept(sd1_editor):
    image = scene(200, 120, seed=5)
    mask = box_mask(200, 120, (150, 50, 162, 62))
    r = sd1_editor.edit(image, mask, "a red circle", num_inference_steps=4, num_candidates=2, crop_margin=6,
                        rank=False)
    l, t, rr, b = r.region.box
    assert not r.region.whole and (rr - l, b - t) == (32, 32)  # grown to the native 32 px, around the mask
    assert l <= 150 - 6 and rr >= 162 + 6 and t <= 50 - 6 and b >= 62 + 6
    src = np.asarray(image)
    for im in r.images:
        out = np.asarray(im)
        assert im.size == (200, 120)
        keep = np.ones(src.shape[:2], bool)
        keep[t:b, l:rr] = False
        assert np.array_equal(out[keep], src[keep]), "outside the crop nothing changes"
        assert np.abs(out[52:60, 152:160].astype(int) - src[52:60, 152:160]).mean() > 3, "the mask is edited"


@pytest.mark.parametrize("kind", ["sd2", "sdxl"])
def test_other_families_load_and_edit(tiny_dirs, kind):
    editor = Editor.load(str(tiny_dirs[kind]), ranker=None)
    assert editor.model.is_sdxl == (kind == "sdxl")
    assert (editor.model.native_size, editor.model.size_multiple, editor.model.latent_channels) == (32, 8, 4)
    image, mask = scene(40, 32), box_mask(40, 32, (8, 8, 24, 24))
    r = editor.edit(image, mask, "a green triangle", num_inference_steps=4, num_candidates=2, seed=3, rank=False)
    r2 = editor.edit(image, mask, "a green triangle", num_inference_steps=4, num_candidates=2, seed=3, rank=False)
    assert [im.size for im in r.images] == [(40, 32)] * 2
    assert np.array_equal(np.asarray(r.images[0]), np.asarray(r2.images[0]))


def test_dpm_solver_edit_runs_and_differs_from_ddim(sd1_editor):
    image, mask = scene(32, 32), box_mask(32, 32, (8, 8, 24, 24))
    a = sd1_editor.edit(image, mask, "a dog", num_inference_steps=6, num_candidates=1, scheduler="dpm++", rank=False)
    b = sd1_editor.edit(image, mask, "a dog", num_inference_steps=6, num_candidates=1, scheduler="ddim", rank=False)
    assert a.config.scheduler == "dpm++"
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def test_progress_and_cancel(sd1_editor):
    image, mask = scene(32, 32), box_mask(32, 32, (8, 8, 24, 24))
    events = []
    r = sd1_editor.edit(image, mask, "a dog", num_inference_steps=8, num_candidates=3, batch_size=2, rank=False,
                        progress=lambda s, d, t: events.append((s, d, t)))
    denoise = [e for e in events if e[0] == "denoising"]
    assert denoise[-1] == ("denoising", 12, 12) and len(denoise) == 12  # 6 steps x 2 chunks
    assert events[0][0] == "encoding" and events[-1][0] == "done"
    assert set(r.timings) >= {"prepare", "encode", "denoise", "decode", "total"}
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(EditCancelled):
        sd1_editor.edit(image, mask, "a dog", num_inference_steps=8, num_candidates=1, should_stop=stop)
    assert len(calls) == 3, "stopped within one step"


def test_long_prompt_is_cut_with_a_note(sd1_editor):
    image, mask = scene(32, 32), box_mask(32, 32, (8, 8, 24, 24))
    r = sd1_editor.edit(image, mask, "red " * 100, num_inference_steps=2, num_candidates=1, rank=False)
    assert any("cut" in n for n in r.notes)


@pytest.mark.parametrize("overrides, message", [
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"blend_start": 1.0}, "blend_start"),
    ({"guidance_scale": -1.0}, "guidance_scale"),
    ({"num_candidates": 0}, "num_candidates"),
    ({"background": "magic"}, "background"),
    ({"scheduler": "nope"}, "scheduler"),
    ({"shrink_kernels": (4,)}, "shrink_kernels"),
])
def test_bad_settings_are_input_errors(sd1_editor, overrides, message):
    with pytest.raises(InputError, match=message):
        sd1_editor.edit(scene(32, 32), box_mask(32, 32, (8, 8, 24, 24)), "x", **overrides)


def test_bad_inputs_are_input_errors(sd1_editor):
    image = scene(32, 32)
    with pytest.raises(InputError, match="empty"):
        sd1_editor.edit(image, Image.new("L", (32, 32), 0), "a dog")
    with pytest.raises(InputError, match="same size"):
        sd1_editor.edit(image, Image.new("L", (30, 32), 255), "a dog")
    with pytest.raises(InputError, match="prompt is empty"):
        sd1_editor.edit(image, box_mask(32, 32, (8, 8, 24, 24)), "   ")


def test_load_errors_are_one_line(tmp_path, tiny_dirs):
    with pytest.raises(ModelLoadError, match="neither a preset"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError) as e:
        load_model("some-org/some-model", local_files_only=True)
    assert "\n" not in str(e.value) and "some-org/some-model" in str(e.value)
    with pytest.raises(ModelLoadError) as e:
        load_model(str(tmp_path))  # an empty folder
    assert "\n" not in str(e.value)


def test_recommended_defaults_come_from_the_model_folder(tiny_dirs, tmp_path):
    import json
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_dirs["sd1"], folder)
    (folder / "blended.json").write_text(json.dumps({"num_inference_steps": 9, "guidance_scale": 3.0}))
    editor = Editor.load(str(folder), ranker=None)
    assert editor.defaults.num_inference_steps == 9 and editor.defaults.guidance_scale == 3.0
    assert editor.defaults.blend_start == 0.25
