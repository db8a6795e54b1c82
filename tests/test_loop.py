"""The loop's background variants (fresh noise, the step's own timestep, a pure-noise start) are right for
every scheduler, the default loop is the previous one exactly, and the engine set up like the paper's
script computes what the script's port in blended_dev/official.py computes."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from blended.config import SCHEDULERS
from blended.schedulers import schedule, step_kwargs
from blended.masks import dilate, latent_mask, mask_schedule
from blended.sampler import blend_loop, pure_noise
from conftest import box_mask, scene


def _pipe():
    from diffusers import DDIMScheduler

    return SimpleNamespace(scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                   clip_sample=False, set_alpha_to_one=False, steps_offset=1))


def _closed_form(sched, name, clean, noise, t):
    """q(z_t | z_0) from alphas_cumprod alone, in the scheduler's own space (Euler's latents are z_t / sqrt(a))."""
    a = sched.alphas_cumprod[int(t)].double()
    vp = a.sqrt() * clean.double() + (1 - a).sqrt() * noise.double()
    return (vp / a.sqrt() if name in ("euler", "euler-a") else vp).float()


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("fresh", [False, True])
@pytest.mark.parametrize("own", [False, True])
def test_background_is_the_source_noised_to_the_right_timestep(name, fresh, own):
    """An empty mask makes the latents the background after every step: compare with the closed form."""
    sched, noiser, timesteps = schedule(_pipe(), name, 10, 0.3)
    g = torch.Generator().manual_seed(0)
    source, noise = torch.randn(1, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)
    draws = [torch.randn(2, 4, 6, 6, generator=g) for _ in timesteps]
    seen = []
    kw = step_kwargs(name, torch.Generator().manual_seed(3))  # LCM, TCD, Euler-a draw noise inside `step`
    step = lambda eps, t, x: sched.step(eps, t, x, return_dict=False, **kw)[0]  # noqa: E731  (advances the step index)
    blend_loop(lambda x, t: torch.tanh(x), step, noiser.add_noise, source, noise, [torch.zeros(1, 1, 6, 6)] * len(timesteps),
               timesteps, fresh_noise=(lambda i: draws[i]) if fresh else None,
               background_timestep="own" if own else "next", on_step=lambda i, t, z: seen.append(z.clone()))
    for i, z in enumerate(seen):
        eps = draws[i] if fresh else noise
        if own:
            expected = _closed_form(sched, name, source.expand_as(z), eps, timesteps[i])
        elif i + 1 < len(timesteps):
            expected = _closed_form(sched, name, source.expand_as(z), eps, timesteps[i + 1])
        else:
            expected = source.expand_as(z)
        torch.testing.assert_close(z, expected, rtol=1e-4, atol=1e-4, msg=f"{name} step {i}")


@pytest.mark.parametrize("name", ["dpm++", "euler", "euler-a"])
def test_the_stepping_scheduler_would_noise_to_the_wrong_timestep(name):
    """Why the loop noises with a second instance: after set_begin_index and a step, diffusers' sigma
    schedulers ignore the timestep given to add_noise (diffusers issue 7348)."""
    sched, noiser, timesteps = schedule(_pipe(), name, 10, 0.3)
    x, eps = torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2)
    sched.step(torch.zeros_like(x), timesteps[0], x)
    late = timesteps[-1:]
    assert not torch.allclose(sched.add_noise(x, eps, late), noiser.add_noise(x, eps, late))
    torch.testing.assert_close(noiser.add_noise(x, eps, late), _closed_form(noiser, name, x, eps, late[0]))


@pytest.mark.parametrize("name", SCHEDULERS)
def test_pure_noise_start_has_the_spread_of_a_noised_image(name):
    """Pure noise at t: the spread of a unit-variance image noised to t (1 for VP schedulers, sqrt(sigma^2 + 1)
    for Euler, whose init_noise_sigma is this up to diffusers' approximation by sigma for some spacings)."""
    sched, noiser, timesteps = schedule(_pipe(), name, 10, 0.0)
    noise = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    a = sched.alphas_cumprod[int(timesteps[0])]
    scale = 1 / a.sqrt() if name in ("euler", "euler-a") else torch.tensor(1.0)
    expected = noise * scale
    torch.testing.assert_close(pure_noise(noiser.add_noise, noise, timesteps[:1]), expected)
    torch.testing.assert_close(scale, torch.as_tensor(sched.init_noise_sigma, dtype=scale.dtype), rtol=5e-3, atol=0)
    seen = []
    blend_loop(lambda x, t: x, lambda e, t, x: x, noiser.add_noise, torch.zeros(1, 4, 3, 3), noise,
               [torch.ones(1, 1, 3, 3)] * len(timesteps), timesteps, start="noise",
               on_step=lambda i, t, z: seen.append(z.clone()))
    torch.testing.assert_close(seen[0], expected)  # identity step: the start itself


def _previous_loop(denoise, step, add_noise, source, noise, masks, timesteps):
    """The loop as it was before the variants (commit 12149d8), for the regression test below."""
    source = source.expand_as(noise)
    latents = add_noise(source, noise, timesteps[:1])
    for i, t in enumerate(timesteps):
        latents = step(denoise(latents, t), t, latents)
        background = add_noise(source, noise, timesteps[i + 1:i + 2]) if i + 1 < len(timesteps) else source
        latents = masks[i] * latents + (1 - masks[i]) * background
    return latents


def _previous_schedule(mask, n, kernels, core, core_steps):
    dilated = [dilate(mask, k) for k in kernels]
    masks = [dilated[min(i * len(kernels) // n, len(kernels) - 1)] for i in range(n)]
    if core is not None and core_steps > 0 and bool(core.any()):
        k = min(int(n * core_steps), n - 1)
        masks = [core] * k + masks[k:]
    return masks


@pytest.mark.parametrize("name", SCHEDULERS)
def test_loop_without_variants_and_hard_schedule_are_the_previous_ones_exactly(name):
    pixels = np.zeros((32, 32), bool)
    pixels[6:23, 5:19] = True
    m, core = latent_mask(pixels, 4), latent_mask(pixels, 4, "core")
    for core_steps in (0.0, 0.5):
        new = mask_schedule(m, 9, (7, 5, 3, 1), True, core, core_steps)
        old = _previous_schedule(m, 9, (7, 5, 3, 1), core, core_steps)
        assert all(torch.equal(a, b) for a, b in zip(new, old))
    runs = []
    for loop in (blend_loop, _previous_loop):
        sched, noiser, timesteps = schedule(_pipe(), name, 12, 0.25)
        g = torch.Generator().manual_seed(2)
        source, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        kw = step_kwargs(name, torch.Generator().manual_seed(3))
        step = lambda eps, t, x, sched=sched, kw=kw: sched.step(eps, t, x, return_dict=False, **kw)[0]  # noqa: E731
        runs.append(loop(lambda x, t: torch.tanh(x) * 0.5, step, noiser.add_noise, source, noise,
                         mask_schedule(m, len(timesteps), (7, 5, 3, 1), True, core, 0.5), timesteps))
    assert torch.equal(*runs)


def test_engine_set_up_like_the_script_equals_the_port(sd1_editor):
    from blended_dev.official import OFFICIAL_SETTINGS, official_edit

    image, mask = scene(32, 32), box_mask(32, 32, (6, 5, 23, 22))
    kw = dict(num_candidates=2, num_inference_steps=6, guidance_scale=3.0, blend_start=0.0, seed=5)
    ported = official_edit(sd1_editor, image, np.asarray(mask) > 127, "a cat", rank=False, **kw)
    ours = sd1_editor.edit(image, mask, "a cat", rank=False, **kw, **OFFICIAL_SETTINGS).images
    default = sd1_editor.edit(image, mask, "a cat", rank=False, **kw).images
    for p, o, d in zip(ported, ours, default):
        p, o, d = (np.asarray(x, np.int16) for x in (p, o, d))
        assert np.abs(p - o).max() <= 1  # the same numbers up to rounding
        assert np.abs(p - d).max() > 10  # and the default is another loop
