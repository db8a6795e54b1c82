"""Background reconstruction (paper §4.2): stitch, Poisson, latent optimisation, decoder fine-tuning.

A tiny AutoencoderKL is trained for a few seconds on smooth pictures, so it is lossy but not random.
"""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blended import EditCancelled, EditConfig, InputError
from blended import background as bg
from conftest import box_mask, scene

H = W = 32  # tiny VAE: x4 downsampling, 8x8 latents


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These small convolutions run ~10x faster on one thread than on two when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def smooth_images(n: int, seed: int) -> torch.Tensor:
    """(n, 3, H, W) in [-1, 1]: colour gradients with a few soft blobs."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    out = []
    for _ in range(n):
        a, b, c = torch.rand(3, 3, 1, 1, generator=g) * 2 - 1
        img = a * x + b * y + c * 0.5
        for _ in range(3):
            cx, cy, r = (torch.rand(3, generator=g) * torch.tensor([2.0, 2.0, 0.4]) - torch.tensor([1, 1, -0.15]))
            col = torch.rand(3, 1, 1, generator=g) * 2 - 1
            img = img + col * torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / r ** 2)
        out.append(img.clamp(-1, 1))
    return torch.stack(out)


@pytest.fixture(scope="module")
def vae():
    """The tests' tiny VAE, trained for 150 deterministic Adam steps (a few seconds)."""
    from blended_dev.tiny import _vae

    torch.manual_seed(0)
    model = _vae()
    data = smooth_images(256, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        x = data[torch.randint(0, len(data), (8,), generator=g)]
        rec = model.decode(model.encode(x).latent_dist.mode()).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval().requires_grad_(False)


def _encode(vae, x):
    with torch.no_grad():
        return vae.encode(x).latent_dist.mode() * vae.config.scaling_factor


@pytest.fixture(scope="module")
def edit(vae):
    """A synthetic edit: the source's latents with a red (candidate 0) or blue (candidate 1) patch's latents
    inside a box mask, decoded: what the blend loop's last step gives."""
    source = smooth_images(1, seed=7)
    mask = torch.zeros(1, 1, H, W)
    mask[..., 8:24, 10:26] = 1
    z_mask = F.max_pool2d(mask, 4)
    z_src = _encode(vae, source)
    latents = torch.cat([z_mask * _encode(vae, torch.tensor(c).view(1, 3, 1, 1).expand(1, 3, H, W))
                         + (1 - z_mask) * z_src for c in ([0.8, -0.6, -0.6], [-0.6, -0.6, 0.8])])  # (2, 4, 8, 8)
    with torch.no_grad():
        decoded = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
    return latents, decoded, source, mask


def psnr(a, b, weight):
    mse = ((a - b) ** 2 * weight).sum() / (weight.expand_as(a).sum())
    return float(10 * torch.log10(4 / mse))


def test_vae_is_lossy_but_trained(vae, edit):
    _, decoded, source, mask = edit
    p = psnr(decoded, source, 1 - mask)
    assert 15 < p < 35, p  # learned something, still visibly lossy


def test_latent_decoder_matches_vae_decode_and_decodes_a_window_alone(vae, edit):
    from torch.func import functional_call

    latents, _, _, mask = edit
    with torch.no_grad():
        ref = vae.decode(latents / vae.config.scaling_factor).sample
        dec = bg.LatentDecoder(vae)
        assert torch.allclose(dec(latents), ref, atol=1e-5)
        images, stats = dec.record(latents)
        assert torch.allclose(images, ref, atol=1e-5) and all(v.shape[0] == 2 for v in stats.values())
        mid = functional_call(dec, stats, (latents, 0, 2))  # stages run in two parts give the same
        assert torch.allclose(functional_call(dec, stats, (mid, 2)), ref, atol=1e-5)
        # a window decoded alone, with the whole image's pinned GroupNorm statistics, matches inside the mask
        window = bg.latent_window(mask, (8, 8), 1)
        crop = functional_call(dec, stats, (latents, 0, None, window))
        inside = window.pixels(mask).bool().expand_as(crop)
        err = (crop - window.pixels(ref))[inside].abs().mean()
        unpinned = bg.LatentDecoder(vae)(latents, 0, None, window)  # the window's own statistics: off
        assert err < 0.02 and (unpinned - window.pixels(ref))[inside].abs().mean() > 3 * err


def test_stitch_pixel_exact_outside_mask_and_feather():
    g = torch.Generator().manual_seed(0)
    decoded, source = torch.rand(2, 3, H, W, generator=g) * 2 - 1, torch.rand(1, 3, H, W, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, H, W)
    mask[..., 10:18, 5:15] = 1
    for feather in (0, 3):
        out = bg.stitch(decoded, source, mask, feather)
        inside = mask.bool().expand_as(out)
        assert torch.equal(out[inside], decoded[inside])
        # Chebyshev distance > feather implies Euclidean distance > feather: pure source there
        far = ~F.max_pool2d(mask, 2 * feather + 1, 1, feather).bool().expand_as(out)
        assert torch.equal(out[far], source.expand_as(out)[far])
        band = ~inside & ~far
        if feather == 0:
            assert not band.any()
        else:  # the seam mixes both, weighted toward the candidate next to the mask
            w = bg.feather_weights(mask, feather)
            assert w[0, 0, 12, 15] == pytest.approx(feather / (feather + 1))
            assert 0 < w[0, 0, 12, 17] < w[0, 0, 12, 16] < 1 and w[0, 0, 12, 19] == 0


def test_poisson_blends_gradients_and_keeps_outside():
    src = smooth_images(1, seed=3) * 0.4  # no saturated pixels: the offset below stays a pure offset
    mask = torch.zeros(1, 1, H, W)
    mask[..., 0:14, 0:16] = 1  # touches the top and left borders
    bar = torch.zeros(1, 3, H, W)
    bar[..., 0:2, 2:8] = 0.4  # a feature at the top border, inside the mask
    decoded = src + 0.2 + bar  # a brighter copy: a constant offset, as a colour-shifted VAE gives
    decoded = torch.cat([decoded, src.clone()])
    out = bg.poisson(decoded, src, mask)
    outside = ~mask.bool().expand_as(out)
    assert torch.allclose(out[outside], src.expand_as(out)[outside])
    inner = mask.bool().clone()
    inner[..., 0:3, :] = False  # away from the bar
    inner = inner.expand(1, 3, H, W)
    # gradient-domain: the constant offset is gone, the source's own shading stays
    assert (out[0:1][inner] - src[inner]).abs().mean() < 0.03 < (decoded[0:1][inner] - src[inner]).abs().mean()
    # the border is free (mirrored), not pinned to the source: the bar's contrast survives on row 0
    contrast = (out[0, :, 0, 2:8] - out[0, :, 0, 9:14].mean(dim=1, keepdim=True)).mean()
    assert contrast > 0.3  # unpadded seamlessClone: 0.005
    assert (out[1] - src[0]).abs().max() < 3 / 127.5  # a candidate equal to the source comes back (8-bit rounding)


def test_decoder_and_latent_raise_psnr_outside(vae, edit):
    latents, decoded, source, mask = edit
    none = psnr(decoded, source, 1 - mask)
    dec = bg.finetune_decoder(vae, latents, decoded, source, mask, steps=40, lr=3e-3, margin=1, patience=0)
    lat = bg.optimize_latents(vae, latents, decoded, source, mask, steps=40, lr=0.01, margin=1, patience=0)
    window = bg.latent_window(mask, (8, 8), 1)
    ring = torch.zeros_like(mask)
    window.pixels(ring).fill_(1)
    ring = ring * (1 - mask)  # outside the mask, inside the window: what the method itself produced
    assert psnr(dec, source, 1 - mask) > none + 8
    assert psnr(dec, source, ring) > psnr(decoded, source, ring) + 8
    assert psnr(lat, source, 1 - mask) > none + 1
    assert psnr(lat, source, ring) > psnr(decoded, source, ring) + 1
    # inside, the edit stays: not pulled back to the source
    assert psnr(dec, source, mask) < psnr(dec, source, 1 - mask) - 5
    assert psnr(lat, decoded, mask) > psnr(lat, source, mask) + 3
    # outside the window the source is kept exactly
    out_win = torch.ones_like(mask)
    window.pixels(out_win).fill_(0)
    sel = out_win.bool().expand_as(dec)
    assert sel.any()
    assert torch.equal(dec[sel], source.expand_as(dec)[sel]) and torch.equal(lat[sel], source.expand_as(lat)[sel])


def test_tuning_last_blocks_only_also_helps(vae, edit):
    latents, decoded, source, mask = edit
    out = bg.finetune_decoder(vae, latents, decoded, source, mask, steps=40, lr=3e-3, margin=8, patience=0,
                              blocks=1)
    assert psnr(out, source, 1 - mask) > psnr(decoded, source, 1 - mask) + 3


def test_shared_decoder_unchanged(vae, edit):
    import copy

    latents, decoded, source, mask = edit
    vae = copy.deepcopy(vae).requires_grad_(True)  # as a loaded pipeline's VAE is
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    flags = {k: p.requires_grad for k, p in vae.named_parameters()}
    bg.finetune_decoder(vae, latents, decoded, source, mask, steps=5, lr=1e-2, patience=0)
    bg.finetune_decoder(vae, latents, decoded, source, mask, steps=5, lr=1e-2, patience=0, share=False,
                        vectorize=True)
    bg.optimize_latents(vae, latents, decoded, source, mask, steps=5, lr=0.1, patience=0)
    after = vae.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in vae.parameters())
    assert flags == {k: p.requires_grad for k, p in vae.named_parameters()}
    assert not vae.training


def test_vectorised_copies_equal_separate_runs(vae, edit):
    latents, decoded, source, mask = edit
    kw = dict(steps=6, lr=3e-3, margin=2, patience=0, share=False)
    together = bg.finetune_decoder(vae, latents, decoded, source, mask, vectorize=True, **kw)
    alone = torch.cat([bg.finetune_decoder(vae, latents[i:i + 1], decoded[i:i + 1], source, mask, vectorize=False,
                                           **kw) for i in range(2)])
    assert torch.allclose(together, alone, atol=2e-4)
    assert not torch.allclose(together[0], together[1], atol=1e-2)  # different candidates, different copies


def test_shared_copy_fits_every_candidate(vae, edit):
    """One copy for the edit, trained on the candidates in turn: for the same number of steps in all, the
    background comes back as well as with a copy per candidate, the inside as close to each candidate, and for a single
    candidate the two ways are the same computation."""
    latents, decoded, source, mask = edit
    kw = dict(lr=3e-3, margin=1, patience=0)
    shared = bg.finetune_decoder(vae, latents, decoded, source, mask, steps=80, **kw)  # the same 80 steps in all
    apart = bg.finetune_decoder(vae, latents, decoded, source, mask, steps=40, share=False, **kw)
    none = psnr(decoded, source, 1 - mask)
    for i in range(2):
        assert psnr(shared[i:i + 1], source, 1 - mask) > none + 8
        assert psnr(shared[i:i + 1], source, 1 - mask) > psnr(apart[i:i + 1], source, 1 - mask) - 1
        # inside, as close to candidate i as its own copy gets (this tiny VAE washes the red patch out either way)
        assert psnr(shared[i:i + 1], decoded[i:i + 1], mask) > psnr(apart[i:i + 1], decoded[i:i + 1], mask) - 2
    assert not torch.allclose(shared[0], shared[1], atol=1e-2)  # one copy, each candidate's own latents
    one = dict(steps=6, lr=3e-3, margin=2, patience=0)
    assert torch.allclose(bg.finetune_decoder(vae, latents[:1], decoded[:1], source, mask, **one),
                          bg.finetune_decoder(vae, latents[:1], decoded[:1], source, mask, share=False, **one),
                          atol=1e-5)


def test_early_stopping_per_candidate(vae, edit):
    latents, decoded, source, mask = edit
    seen = []
    bg.finetune_decoder(vae, latents, decoded, source, mask, steps=50, lr=1e-9, patience=3, share=False,
                        progress=lambda done, total: seen.append((done, total)))
    # a copy per candidate, sequential on the CPU: each stops after 1 + 3 steps without improvement
    assert seen[-1] == (100, 100) and len(seen) == 2 * 4 + 1
    seen.clear()
    bg.finetune_decoder(vae, latents, decoded, source, mask, steps=50, lr=1e-9, patience=3,
                        progress=lambda done, total: seen.append((done, total)))
    # one shared copy: watched once both candidates were seen (step 2), done 3 steps later
    assert seen[-1] == (50, 50) and len(seen) == 5 + 1
    seen.clear()
    bg.optimize_latents(vae, latents, decoded, source, mask, steps=50, lr=1e-9, patience=3,
                        progress=lambda done, total: seen.append(done))
    assert len(seen) == 4 + 1


def test_fp16_model_is_optimised_in_fp32(vae, edit):
    import copy

    latents, decoded, source, mask = edit
    half = copy.deepcopy(vae).half()
    before = {k: v.clone() for k, v in half.state_dict().items()}
    out = bg.finetune_decoder(half, latents.half(), decoded.half(), source, mask, steps=3, lr=1e-3, patience=0)
    lat = bg.optimize_latents(half, latents.half(), decoded.half(), source, mask, steps=3, patience=0)
    assert out.dtype == lat.dtype == torch.float32 and torch.isfinite(out).all() and torch.isfinite(lat).all()
    assert all(torch.equal(before[k], v) for k, v in half.state_dict().items())


def test_window_and_paste():
    mask = torch.zeros(1, 1, H, W)
    mask[..., 0:5, 13:18] = 1  # touches the top border
    w = bg.latent_window(mask, (8, 8), 2)
    assert (w.top, w.bottom, w.left, w.right, w.factor, w.fade) == (0, 4, 1, 7, 4, 4)
    weights = w.weights((8, 8), torch.device("cpu"))
    assert weights.shape == (1, 1, 16, 24)
    assert weights[0, 0, 0, 12] == 1  # the top side is the image border: no fade there
    assert weights[0, 0, 8, 0] < 0.2 and weights[0, 0, 15, 12] < 0.2 and weights[0, 0, 6, 8] == 1
    source = torch.zeros(1, 3, H, W)
    out = bg.paste(w, torch.ones(2, 3, 16, 24), source, (8, 8))
    assert out.shape == (2, 3, H, W) and out[..., 16:, :].abs().sum() == 0 and out[..., :, :4].abs().sum() == 0
    assert (out[..., 0:5, 13:18] == 1).all()


def test_reconstruct_dispatch_and_errors(sd1_editor, edit):
    latents, decoded, source, mask = edit
    cfg = EditConfig()
    kw = dict(vae=sd1_editor.model.pipe.vae, latents=latents, decoded=decoded, source=source, mask=mask, config=cfg)
    assert torch.equal(bg.reconstruct("none", **kw), decoded)
    with pytest.raises(InputError, match="background"):
        bg.reconstruct("blur", **kw)
    full = torch.ones_like(mask)
    assert torch.equal(bg.reconstruct("decoder", **{**kw, "mask": full}), decoded)  # nothing to keep
    empty = torch.zeros_like(mask)
    assert torch.equal(bg.reconstruct("poisson", **{**kw, "mask": empty}), source.expand_as(decoded))
    with pytest.raises(ValueError, match="source"):
        bg.reconstruct("stitch", **{**kw, "source": source[..., :16]})
    for bad in ({"decoder_margin": -1}, {"decoder_patience": -2}, {"latent_steps": 0}, {"latent_lr": 0.0},
                {"decoder_lr": 0.0}, {"decoder_steps": 0}, {"background": "blur"}, {"decoder_shared": "yes"},
                {"exact_outside": 1}, {"core_steps": 1.0}, {"decoder_schedule": "step"}, {"decoder_loss": "ring"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            EditConfig(**bad).validate()


def test_cancel_stops_reconstruction(sd1_editor, edit):
    latents, decoded, source, mask = edit
    for method in ("decoder", "latent"):
        polls, seen = [], []

        def stop():
            polls.append(1)
            return len(polls) > 3

        with pytest.raises(EditCancelled):
            bg.reconstruct(method, vae=sd1_editor.model.pipe.vae, latents=latents, decoded=decoded, source=source,
                           mask=mask, config=EditConfig(decoder_patience=0, latent_steps=50),
                           progress=lambda done, total: seen.append(done), should_stop=stop)
        assert len(polls) == 4 and max(seen) == 3


def test_the_registry_refuses_an_unknown_method(edit):
    latents, decoded, source, mask = edit
    for name in ("blur", "Decoder", ""):
        with pytest.raises(InputError, match="none, stitch, poisson, latent, decoder"):
            bg.get_method(name)
        with pytest.raises(InputError, match=f"unknown background method '{name}'"):
            bg.reconstruct(name, vae=None, latents=latents, decoded=decoded, source=source, mask=mask,
                           config=EditConfig())
    assert bg.get_method("poisson") is bg.METHODS["poisson"]
    # the methods that do not decode do not need the VAE
    assert torch.equal(bg.reconstruct("stitch", vae=None, latents=latents, decoded=decoded, source=source, mask=mask,
                                      config=EditConfig(feather=0)), mask * decoded + (1 - mask) * source)


def test_the_registry_lists_the_configs_methods_and_what_each_needs():
    from blended.config import BACKGROUND_METHODS

    assert tuple(bg.METHODS) == BACKGROUND_METHODS
    assert all(m.name == name and m.help and "\n" not in m.help for name, m in bg.METHODS.items())
    fitted = {name for name, m in bg.METHODS.items() if m.needs_stats}
    assert fitted == {name for name, m in bg.METHODS.items() if m.memory_fallback} == {"latent", "decoder"}
    assert [name for name, m in bg.METHODS.items() if not m.keeps_outside] == ["none"]
    assert {name: m.steps_setting for name, m in bg.METHODS.items() if m.steps_setting} == \
        {"latent": "latent_steps", "decoder": "decoder_steps"}
    assert all(hasattr(EditConfig(), m.steps_setting) for m in bg.METHODS.values() if m.steps_setting)
    assert bg.PRESERVE_METHOD == "decoder" and bg.PRESERVE_METHOD in bg.METHODS


def test_latent_and_decoder_share_the_one_fitting_loop(vae, edit, monkeypatch):
    """`optimize_latents` and `finetune_decoder` (one shared copy, or a copy per candidate) all run
    `fitting.fit`: it polls `should_stop` before each step (EditCancelled) and reports each step's progress."""
    latents, decoded, source, mask = edit
    calls = []
    real = bg.fitting.fit
    monkeypatch.setattr(bg.fitting, "fit", lambda *a, **k: (calls.append(k["steps"]), real(*a, **k))[1])
    runs = {"latent": lambda **k: bg.optimize_latents(vae, latents, decoded, source, mask, **k),
            "decoder, shared": lambda **k: bg.finetune_decoder(vae, latents, decoded, source, mask, **k),
            "decoder, copies": lambda **k: bg.finetune_decoder(vae, latents, decoded, source, mask, share=False,
                                                               vectorize=False, **k)}
    for label, run in runs.items():
        calls.clear()
        seen, polls = [], []
        out = run(steps=3, lr=1e-3, margin=1, patience=0, progress=lambda done, total: seen.append((done, total)))
        assert calls and set(calls) == {3}, label  # through the one loop
        assert out.shape == decoded.shape and seen[-1][0] == seen[-1][1] == len(seen) - 1, (label, seen)
        seen.clear()
        with pytest.raises(EditCancelled):
            run(steps=20, lr=1e-3, margin=1, patience=0, progress=lambda done, total: seen.append(done),
                should_stop=lambda: polls.append(1) or len(polls) > 2)
        assert len(polls) == 3 and seen == [1, 2], (label, seen)


@pytest.mark.parametrize("method", ["decoder", "latent", "stitch", "poisson"])
def test_editor_end_to_end(sd1_editor, method):
    image, mask = scene(32, 32), box_mask(32, 32, (8, 8, 24, 20))  # work size = image size: no resampling
    stages = []
    result = sd1_editor.edit(image, mask, "a red circle", num_inference_steps=4, num_candidates=2, background=method,
                             decoder_steps=4, latent_steps=4, feather=2, rank=False,
                             progress=lambda stage, done, total: stages.append(stage))
    assert len(result.images) == 2 and all(im.size == (32, 32) for im in result.images)
    assert "reconstructing" in stages and result.timings["background"] > 0
    src, m = np.asarray(image).astype(int), np.asarray(mask) > 0
    for im in result.images:
        out = np.asarray(im).astype(int)
        if method == "stitch":  # pixel-exact beyond the mask and its 2-pixel feather
            far = np.ones_like(m)
            far[8 - 2:20 + 2, 8 - 2:24 + 2] = False
            assert (out[far] == src[far]).all()
        else:
            assert out.shape == src.shape and not (out[m] == src[m]).all()


def test_latent_decoder_decodes_like_the_editor(sd1_editor):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        ref = sd1_editor.vae_decode(latents)
        assert torch.allclose(bg.LatentDecoder(sd1_editor.model.pipe.vae)(latents), ref, atol=1e-5)


def test_two_concurrent_decoder_edits_do_not_affect_each_other(vae, edit):
    """Two users' decoder fine-tunings running at the same time on the shared VAE give exactly what each
    gives alone: every edit tunes a copy of its own."""
    import threading

    latents, decoded, source, mask = edit
    other_source = smooth_images(1, seed=11)
    jobs = [(latents[:1], decoded[:1], source), (latents[1:], decoded[1:], other_source)]
    kw = dict(steps=12, lr=3e-3, margin=2, patience=0)
    alone = [bg.finetune_decoder(vae, z, d, s, mask, **kw) for z, d, s in jobs]
    together: dict[int, torch.Tensor] = {}
    start = threading.Barrier(2)

    def run(i):
        start.wait()
        together[i] = bg.finetune_decoder(vae, *jobs[i][:2], jobs[i][2], mask, **kw)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert torch.equal(together[i], alone[i])
    assert not torch.allclose(alone[0], alone[1], atol=1e-2)


def test_keep_inside_keeps_the_candidate_inside_and_the_reconstruction_outside(sd1_editor, edit):
    """`keep_inside`: deeper than feather/2 px inside the mask the result is the candidate itself; outside the
    mask (and on its border) it is the optimised decode, exactly as without the option."""
    latents, decoded, source, mask = edit
    kw = dict(vae=sd1_editor.model.pipe.vae, latents=latents, decoded=decoded, source=source, mask=mask)
    # the paper's window loss: the fit is the same with and without the option (the band loss fits where each shows it)
    cfg = EditConfig(decoder_steps=6, decoder_patience=0, decoder_lr=3e-3, feather=4, decoder_loss="window")
    kept = bg.reconstruct("decoder", config=cfg, **kw)
    whole = bg.reconstruct("decoder", config=cfg.replace(keep_inside=False), **kw)
    w = bg.inner_weights(mask, 2)
    assert w.max() == 1 and w[mask == 0].max() == 0 and 0 < w[(w > 0) & (w < 1)].numel()
    deep, outside = (w == 1).expand_as(kept), (mask == 0).expand_as(kept)
    assert torch.equal(kept[deep], decoded[deep])
    assert torch.equal(kept[outside], whole[outside])
    assert not torch.allclose(whole[deep], decoded[deep], atol=1e-3)  # the whole decode does change the inside
    band = bg.reconstruct("decoder", config=cfg.replace(decoder_loss="band"), **kw)
    assert torch.equal(band[deep], decoded[deep])


def test_exact_outside_keeps_the_source_beyond_the_seam_band(sd1_editor, edit):
    """`exact_outside`: beyond `feather` px outside the mask the result is the source, bit for bit; in the band
    it ramps from the optimised decode (at the mask) to the source, and inside nothing changes."""
    latents, decoded, source, mask = edit
    kw = dict(vae=sd1_editor.model.pipe.vae, latents=latents, decoded=decoded, source=source, mask=mask)
    # the paper's window loss and margin: the fit is the same with and without the option
    cfg = EditConfig(decoder_steps=6, decoder_patience=0, decoder_lr=3e-3, feather=3, decoder_loss="window")
    for method in ("decoder", "latent"):
        exact = bg.reconstruct(method, config=cfg, **kw)
        window = bg.reconstruct(method, config=cfg.replace(exact_outside=False), **kw)
        v = bg.feather_weights(mask, 3)
        far, band, inside = (v == 0).expand_as(exact), ((v > 0) & (mask == 0)).expand_as(exact), \
            (mask == 1).expand_as(exact)
        assert band.any() and far.any()
        assert torch.equal(exact[far], source.expand_as(exact)[far])
        assert not torch.equal(window[far], source.expand_as(window)[far])  # the decode alone is not exact
        assert torch.allclose(exact[band], (v * window + (1 - v) * source).expand_as(exact)[band], atol=1e-6)
        assert torch.equal(exact[inside], window[inside])


def test_window_margin_covers_the_seam_band_and_its_fade():
    auto = EditConfig()
    assert bg.window_margin(auto, 8) == 2 and bg.window_margin(auto, 4) == 4  # 8 px band: 16 px either way
    assert bg.window_margin(auto.replace(feather=20), 8) == 5 and bg.window_margin(auto.replace(feather=1), 8) == 2
    assert bg.window_margin(auto.replace(decoder_margin=7), 8) == 7  # asked for: as asked
    assert bg.window_margin(auto.replace(exact_outside=False), 8) == 4  # the whole window is kept: more context
    # `decoder_loss="band"` (the default): the window is the seam band, at least one latent
    assert bg.decoder_settings(auto, 8)["margin"] == 1 and bg.decoder_settings(auto, 4)["margin"] == 2
    assert bg.decoder_settings(auto.replace(decoder_loss="window"), 8)["margin"] == 2
    assert bg.latent_settings(auto, 8)["margin"] == 2  # `latent` fits the whole window: as before
    assert bg.decoder_settings(auto.replace(exact_outside=False), 8)["margin"] == 4


def test_checkpointing_gives_the_same_gradients_with_swapped_in_weights(vae, edit):
    """Activation checkpointing recomputes each up-block piece in backward with the weights `functional_call`
    swapped in (not the module's own): outputs and gradients match the plain run exactly."""
    from torch.func import functional_call

    latents, _, _, mask = edit
    base = bg.LatentDecoder(vae)
    window = bg.latent_window(mask, tuple(latents.shape[-2:]), 1)
    _, stats = base.record(latents[:1])
    g = torch.Generator().manual_seed(0)
    params = {k: (v + 0.05 * torch.randn(v.shape, generator=g)).requires_grad_(True)  # differ from the module's
              for k, v in base.named_parameters()}
    results = []
    for checkpointing in (False, True):
        base.checkpointing = checkpointing
        with torch.enable_grad():
            out = functional_call(base, {**params, **stats}, (latents[:1], 0, None, window))
            grads = torch.autograd.grad((out ** 2).mean(), list(params.values()))
        results.append((out.detach(), grads))
    (o1, g1), (o2, g2) = results
    assert torch.allclose(o1, o2, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(g1, g2))
    assert sum(float(a.abs().sum()) for a in g1) > 0


def test_checkpointing_changes_nothing_in_the_result(vae, edit):
    latents, decoded, source, mask = edit
    kw = dict(steps=4, lr=3e-3, margin=2, patience=0)
    plain = bg.finetune_decoder(vae, latents, decoded, source, mask, checkpointing=False, **kw)
    ckpt = bg.finetune_decoder(vae, latents, decoded, source, mask, checkpointing=True, **kw)
    assert torch.allclose(plain, ckpt, atol=1e-5)
    small, base, cpu = bg.latent_window(mask, tuple(latents.shape[-2:]), 2), bg.LatentDecoder(vae), torch.device("cpu")
    assert not bg.needs_checkpointing(base, small, cpu)  # the tests' 32 px windows: auto leaves it off
    huge = bg.Window(0, 0, 512, 512, factor=4, fade=8)  # 2048 px
    assert bg.activation_bytes(base, huge) > bg.CPU_ACTIVATION_BYTES and bg.needs_checkpointing(base, huge, cpu)
    assert bg.activation_bytes(base, small, rows=4) == 4 * bg.activation_bytes(base, small)


def test_decoder_out_of_memory_falls_back_to_the_default_with_a_note(sd1_editor, monkeypatch):
    """A decoder fine-tuning that runs out of memory is not an error: the edit keeps the default composite."""
    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    image, mask = scene(48, 32), box_mask(48, 32, (16, 8, 36, 24))
    kw = dict(num_inference_steps=3, num_candidates=2, rank=False)
    monkeypatch.setitem(bg.METHODS, "decoder", dataclasses.replace(bg.METHODS["decoder"], run=no_memory))
    r = sd1_editor.edit(image, mask, "a red circle", background="decoder", **kw)
    assert any("ran out of memory" in n and "stitch" in n for n in r.notes)
    default = sd1_editor.edit(image, mask, "a red circle", **kw)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(r.images, default.images))

    def shape_bug(**kwargs):
        raise RuntimeError("shape bug")

    monkeypatch.setitem(bg.METHODS, "decoder", dataclasses.replace(bg.METHODS["decoder"], run=shape_bug))
    with pytest.raises(RuntimeError, match="shape bug"):  # other errors are not hidden
        sd1_editor.edit(image, mask, "a red circle", background="decoder", **kw)


def test_lr_schedules_decay_from_the_peak():
    assert [bg.lr_factor("constant", i, 4) for i in range(4)] == [1.0] * 4  # the paper
    for schedule in ("linear", "cosine"):
        f = [bg.lr_factor(schedule, i, 20) for i in range(20)]
        assert f[0] == 1.0 and all(a > b for a, b in zip(f, f[1:])) and 0 < f[-1] < 0.1
    assert bg.lr_factor("linear", 10, 20) == 0.5 and abs(bg.lr_factor("cosine", 10, 20) - 0.5) < 1e-9
    with pytest.raises(ValueError, match="decoder_schedule"):
        bg.lr_factor("step", 0, 4)


def test_finetuning_uses_the_schedule(vae, edit, monkeypatch):
    latents, decoded, source, mask = edit
    rates = []
    real = bg.fitting._set_lr
    monkeypatch.setattr(bg.fitting, "_set_lr", lambda opt, lr: (rates.append(lr), real(opt, lr)))
    for share in (True, False):
        rates.clear()
        bg.finetune_decoder(vae, latents, decoded, source, mask, steps=4, lr=1e-3, patience=0, schedule="linear",
                            share=share)
        per_copy = rates if share else rates[:4]
        assert per_copy == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    # the first step is the peak rate: one step of either schedule is the same computation
    one = dict(steps=1, lr=3e-3, margin=2, patience=0)
    assert torch.equal(bg.finetune_decoder(vae, latents, decoded, source, mask, schedule="cosine", **one),
                       bg.finetune_decoder(vae, latents, decoded, source, mask, **one))


def test_decode_stats_are_the_recorded_statistics(vae, edit, monkeypatch):
    """The GroupNorm statistics recorded while the edit decodes (in chunks) are those `record` computes with one
    more decode; a decode in another thread is not recorded; and fine-tuning with them gives the same result."""
    import threading

    latents, decoded, source, mask = edit
    base = bg.LatentDecoder(vae)
    _, recorded = base.record(latents)
    with torch.no_grad():
        rec = bg.DecodeStats(vae)
        for chunk in (latents[:1], latents[1:]):
            with rec:
                other = threading.Thread(target=lambda: vae.decode(latents[:1] / vae.config.scaling_factor))
                other.start()
                other.join()
                vae.decode(chunk / vae.config.scaling_factor)
    stats = rec.stats(2)
    assert set(stats) == set(recorded)
    assert all(torch.allclose(stats[k], recorded[k], atol=1e-5, rtol=1e-4) for k in recorded)
    assert rec.stats(3) is None  # not every candidate was seen: the caller records them itself
    assert not any(m._forward_hooks for m in vae.modules())  # the hooks are gone
    kw = dict(steps=5, lr=3e-3, margin=2, patience=0)
    assert torch.allclose(bg.finetune_decoder(vae, latents, decoded, source, mask, stats=stats, **kw),
                          bg.finetune_decoder(vae, latents, decoded, source, mask, **kw), atol=1e-4)

    def no_kernel(*args):
        raise RuntimeError("not implemented for this dtype")

    def recorded_while(patch: str, value):
        stats = bg.DecodeStats(vae)
        with monkeypatch.context() as mp:
            mp.setattr(torch if patch == "native_group_norm" else vae, patch, value)
            with stats, torch.no_grad():
                vae.decode(latents / vae.config.scaling_factor)
        return stats.stats(2)

    fallback = recorded_while("native_group_norm", no_kernel)  # a backend without GroupNorm's kernel: var_mean
    assert all(torch.allclose(fallback[k], recorded[k], atol=1e-5, rtol=1e-4) for k in recorded)
    assert recorded_while("use_tiling", True) is None  # tiles are normalised on their own: not the whole image's statistics


def test_editor_decoder_edit_does_not_decode_again_for_the_statistics(sd1_editor, monkeypatch):
    image, mask = scene(32, 32), box_mask(32, 32, (8, 8, 24, 20))
    kw = dict(num_inference_steps=2, num_candidates=2, background="decoder", decoder_steps=3, feather=2, rank=False)
    before = sd1_editor.edit(image, mask, "a red circle", **kw)

    def no_record(self, latents):
        raise AssertionError("recorded again")

    monkeypatch.setattr(bg.LatentDecoder, "record", no_record)
    after = sd1_editor.edit(image, mask, "a red circle", **kw)
    for a, b in zip(before.images, after.images):
        assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1


def test_band_loss_fits_only_what_the_result_shows(sd1_editor, edit):
    """`decoder_loss="band"`: the loss counts only where the result shows the decode (the seam band outside the
    mask, its border band inside), so the source beyond the band and the candidate deep inside do not matter."""
    latents, decoded, source, mask = edit
    cfg = EditConfig(decoder_steps=4, decoder_patience=0, decoder_lr=3e-3, feather=3, decoder_loss="band")
    use = bg.shown(mask, cfg)
    v, w = bg.feather_weights(mask, 3), bg.inner_weights(mask, 1)
    assert torch.equal(use.bool(), (v > 0) & (w < 1))
    assert use[mask.bool()].float().mean() < 0.5 and use[~mask.bool()].float().mean() < 0.5  # a band, not the window
    changed = source.clone()
    changed[(use == 0).expand_as(source) & (mask == 0).expand_as(source)] = 1.0  # the source beyond the band
    cands = decoded.clone()
    cands[(use == 0).expand_as(decoded) & (mask == 1).expand_as(decoded)] = -1.0  # the candidates deep inside
    kw = dict(vae=sd1_editor.model.pipe.vae, latents=latents, mask=mask, composite=False)
    a = bg.reconstruct("decoder", decoded=decoded, source=source, config=cfg, **kw)
    b = bg.reconstruct("decoder", decoded=cands, source=changed, config=cfg, **kw)
    assert torch.allclose((a * use), (b * use), atol=1e-5)
    window = bg.reconstruct("decoder", decoded=cands, source=changed, config=cfg.replace(decoder_loss="window"), **kw)
    assert not torch.allclose(a * use, window * use, atol=1e-3)  # the paper's loss does see them
    # without `exact_outside` the whole window's outside is shown: the band is then the window's outside
    assert bg.shown(mask, cfg.replace(exact_outside=False))[mask == 0].all()


def test_band_strips_cover_every_used_pixel_once(monkeypatch):
    monkeypatch.setattr(bg.window, "STRIPS_WORTH", 2.0)  # strips even where they save little
    used = np.ones((40, 48), bool)
    used[10:33, 6:44] = False  # the part of the window the loss does not see
    strips = bg.band_strips(used, context=3)
    assert strips is not None
    covered = np.zeros_like(used, dtype=int)
    for st in strips:
        rows, cols = np.zeros(40, bool), np.zeros(48, bool)
        rows[st.out_rows], cols[st.out_cols] = True, True
        covered += rows[:, None] & cols[None, :]
        # the kept outputs are `context` px away from every cut side of the crop
        r0, r1 = st.rows.start or 0, st.rows.stop or 40
        c0, c1 = st.cols.start or 0, st.cols.stop or 48
        o = np.arange(40)[st.out_rows]
        assert (o - r0 >= 3).all() or r0 == 0
        assert (r1 - 1 - o >= 3).all() or r1 == 40
        o = np.arange(48)[st.out_cols]
        assert ((o - c0 >= 3).all() or c0 == 0) and ((c1 - 1 - o >= 3).all() or c1 == 48)
        assert len(np.arange(r1 - r0)[st.keep_rows]) == len(np.arange(40)[st.out_rows])
    assert covered.max() == 1 and covered[used].all()  # every used pixel once; only the hole is left out
    assert bg.band_strips(np.ones((40, 48), bool), context=3) is None  # the paper's window loss: nothing to leave out
    assert bg.receptive_context([torch.nn.Conv2d(1, 1, 3), torch.nn.Conv2d(1, 1, 5, dilation=2)]) == 5


def test_band_strips_give_the_whole_windows_result(vae, monkeypatch):
    """With the band loss and only the last up block trained, the steps run on strips around the band: the same
    fine-tuned decode as running the whole window."""
    source = smooth_images(1, seed=7)
    mask = torch.zeros(1, 1, H, W)
    mask[..., 4:28, 5:29] = 1
    latents = torch.cat([_encode(vae, source), _encode(vae, smooth_images(1, seed=9))])
    with torch.no_grad():
        decoded = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
    focus = bg.shown(mask, EditConfig(feather=2))
    kw = dict(steps=6, lr=3e-3, margin=1, patience=0, blocks=1, focus=focus)
    calls = []
    real = bg.band_strips
    monkeypatch.setattr(bg.finetune, "band_strips", lambda *a: calls.append(real(*a)) or calls[-1])
    monkeypatch.setattr(bg.window, "STRIPS_WORTH", 10.0)  # this tiny window: strips though they save nothing
    monkeypatch.setattr(bg.window, "STRIP_CELL", 1)
    strips = bg.finetune_decoder(vae, latents, decoded, source, mask, **kw)
    assert calls and calls[-1] is not None  # the strips were used
    monkeypatch.setattr(bg.window, "STRIPS_WORTH", 0.0)
    whole = bg.finetune_decoder(vae, latents, decoded, source, mask, **kw)
    assert torch.allclose(strips, whole, atol=1e-5)
