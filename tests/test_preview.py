"""Live previews: the x0 estimate of every scheduler, the fitted latent -> RGB map, the `preview` hook of
Editor.edit (shapes, source outside the mask, results unchanged by previewing)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blended.schedulers import make_scheduler
from blended.preview import PREVIEW_SIDE, Previewer, colour_chart, latent_rgb_map, predicted_x0
from conftest import box_mask, scene

DEMO = Path(__file__).resolve().parent.parent / "assets" / "demo"


@pytest.mark.parametrize("name", ["ddim", "dpm++", "euler"])
def test_x0_estimate_inverts_the_forward_process(sd1_editor, name):
    """Given the true noise as the model's prediction, the estimate is the clean latents (every scheduler)."""
    sched = make_scheduler(sd1_editor.model.pipe, name)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = sched.timesteps[3]
    noised = sched.add_noise(x0, noise, t[None])
    out = sched.step(noise, t, noised)
    est = predicted_x0(out, sched, noise, t, noised)
    torch.testing.assert_close(est.float(), x0, atol=2e-3, rtol=2e-3)


def test_colour_chart_and_map_shapes(sd1_editor):
    chart = colour_chart(8)
    assert chart.shape == (64, 64, 3) and chart.dtype == np.uint8 and len(np.unique(chart.reshape(-1, 3), axis=0)) > 40
    m = sd1_editor.model
    with torch.no_grad():
        w = latent_rgb_map(m.pipe.vae, sd1_editor.model.encode, m.vae_scale_factor)
        assert latent_rgb_map(m.pipe.vae, sd1_editor.model.encode, m.vae_scale_factor) is w  # cached per VAE
    assert w.shape == (m.pipe.vae.config.latent_channels + 1, 3)


def test_previewer_keeps_the_source_outside_the_mask():
    source = scene(600, 300)
    mask = np.zeros((300, 600), bool)
    mask[50:150, 100:300] = True
    p = Previewer(torch.zeros(5, 3), source, mask)  # maps every latent to grey
    (im,) = p(torch.randn(1, 4, 8, 16))
    assert im.size == (PREVIEW_SIDE, PREVIEW_SIDE // 2)
    a = np.asarray(im, np.int16)
    small = np.asarray(source.resize(im.size, Image.BILINEAR), np.int16)
    assert np.abs(a[100:, 150:] - small[100:, 150:]).max() <= 1  # far outside the mask: the source
    assert np.abs(a[30:55, 60:110] - 128).max() <= 1  # inside the mask: the mapped latents (grey)


def test_edit_calls_preview_during_denoising_and_results_do_not_change(sd1_editor):
    image, mask = scene(32, 32), box_mask(32, 32, (8, 8, 24, 24))
    kw = dict(num_inference_steps=6, blend_start=0.0, num_candidates=2, batch_size=1, seed=3, rank=False)
    events, seen = [], []

    def progress(stage, done, total):
        events.append(stage)

    def preview(done, total, images):
        events.append("preview")
        seen.append((done, total, images))

    with_preview = sd1_editor.edit(image, mask, "a cat", progress=progress, preview=preview, preview_every=2, **kw)
    plain = sd1_editor.edit(image, mask, "a cat", **kw)
    assert [d for d, _, _ in seen] == [2, 4, 8, 10]  # every 2nd step, not at the end of a chunk (6 steps x 2)
    assert all(t == 12 and len(ims) == 1 and ims[0].size == (32, 32) for _, t, ims in seen)
    assert events.index("preview") < events.index("decoding")
    for a, b in zip(with_preview.images, plain.images):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.skipif(not (DEMO / "model_index.json").is_file(), reason="the demo model is not trained")
def test_demo_model_preview_resembles_the_result():
    """On the demo model, the last preview inside the mask is close to the decoded result (a linear map)."""
    from blended import Editor

    editor = Editor.load("demo", ranker=None)
    root = Path(__file__).resolve().parent.parent / "assets" / "examples"
    image = Image.open(root / "scene-red-circle.png").convert("RGB")
    mask = np.asarray(Image.open(root / "scene-red-circle-mask.png").getchannel("A")) > 32
    last = []
    result = editor.edit(image, Image.fromarray(mask), "a red circle", num_candidates=1, seed=0, rank=False,
                         preview=lambda d, t, ims: last.append(ims[0]))
    out = np.asarray(result.images[0].convert("RGB"), np.float32)[mask]
    prev = np.asarray(last[-1], np.float32)[mask]
    assert np.abs(out - prev).mean() < 25, np.abs(out - prev).mean()
