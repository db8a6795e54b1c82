"""Few-step edits (issue 21): LCM, TCD and Euler-a schedulers in the loop, an LCM-distilled UNet's guidance
embedding, `blend_start` at few steps, the recommendations for few-step models and LoRAs, the speed estimate."""

import json

import numpy as np
import pytest
import torch

from blended import EditConfig, Editor
from blended.errors import InputError
from blended.fewstep import FAST_DECODER, LCM, TCD, TURBO, recommended_for_lora, recommended_for_model
from blended.models import PRESETS
from blended.schedulers import schedule, steps_run
from blended.unet_call import guidance_embedding
from conftest import box_mask, scene
from ui.speed import edit_seconds

BOX = (10, 8, 30, 24)


@pytest.fixture(scope="module")
def lcm_editor(tiny_dirs, tmp_path_factory):
    """The tiny SD1 checkpoint with a guidance embedding (`time_cond_proj_dim`) and an LCMScheduler."""
    from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dirs["sd1"])
    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_config({**pipe.unet.config, "time_cond_proj_dim": 16})
    unet.load_state_dict(pipe.unet.state_dict(), strict=False)  # cond_proj keeps its random init
    pipe.unet, pipe.scheduler = unet, LCMScheduler.from_config(pipe.scheduler.config)
    folder = tmp_path_factory.mktemp("lcm") / "tiny-lcm"
    pipe.save_pretrained(folder, safe_serialization=True)
    return Editor.load(str(folder), ranker=None)


def _count_calls(editor):
    rows = []
    handle = editor.model.pipe.unet.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    return rows, handle


def _outside(image, box=BOX, feather=8):
    a = np.asarray(image).copy()
    l, t, r, b = box
    a[max(0, t - feather):b + feather, max(0, l - feather):r + feather] = 0
    return a


def test_guidance_embedding_is_diffusers_lcm_one():
    from diffusers import LatentConsistencyModelPipeline

    for scale, dim in ((7.5, 256), (1.5, 33)):
        ours = guidance_embedding(scale, dim, batch=2)
        theirs = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.tensor([scale - 1] * 2), dim)
        torch.testing.assert_close(ours, theirs)


def test_distilled_unet_reads_the_scale_and_runs_once_per_candidate(lcm_editor):
    d = lcm_editor.defaults
    assert (d.scheduler, d.num_inference_steps, d.guidance_scale) == ("lcm", 4, 7.5)  # the scale is kept
    image, mask = scene(40, 32), box_mask(40, 32, BOX)
    rows, handle = _count_calls(lcm_editor)
    previews = []
    try:
        a = lcm_editor.edit(image, mask, "a cat", num_candidates=3, batch_size=2, seed=4,
                            preview=lambda done, total, ims: previews.append((done, total, len(ims))))
    finally:
        handle.remove()
    assert sum(rows) == 4 * 3 and rows == [2] * 4 + [1] * 4  # steps x candidates: no guidance doubling
    assert previews == [(1, 8, 2), (2, 8, 2), (3, 8, 2), (5, 8, 1), (6, 8, 1), (7, 8, 1)]  # live previews still come
    b = lcm_editor.edit(image, mask, "a cat", num_candidates=3, batch_size=3, seed=4)
    c = lcm_editor.edit(image, mask, "a cat", num_candidates=1, seed=4, guidance_scale=2.0)
    src = np.asarray(image)
    for x, y, z in zip(a.images, b.images, c.images):
        assert np.array_equal(np.asarray(x), np.asarray(y))  # LCM's step noise comes from each seed
        assert not np.array_equal(np.asarray(x), np.asarray(z))  # the scale reaches the UNet as timestep_cond
        assert np.array_equal(_outside(x), _outside(src))  # the upload outside the mask and its seam band


@pytest.mark.parametrize("name", ["lcm", "tcd", "euler-a"])
def test_few_step_schedulers_keep_the_source_outside_exactly(sd1_editor, name):
    """The real loop with the tiny UNet at 2 steps: outside the mask the latents end as the clean source (the
    "next" rule), inside they changed; the edit keeps the upload outside its seam band, and a seed gives the
    same candidate whatever the batch (the schedulers' step noise comes from each candidate's generator)."""
    from blended.sampler import blend_loop
    from blended.schedulers import step_kwargs
    from blended.unet_call import conditions, make_denoise

    m = sd1_editor.model
    sched, noiser, timesteps = schedule(m.pipe, name, 2, 0.0)
    g = torch.Generator().manual_seed(0)
    source, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 3:7] = 1
    denoise = make_denoise(m.pipe.unet, sched, conditions(m, "a dog", "", 1.0, (32, 32)).repeat(2), 1.0)
    kw = step_kwargs(name, [torch.Generator().manual_seed(s) for s in (1, 2)])
    out = blend_loop(denoise, lambda e, t, x: sched.step(e, t, x, return_dict=False, **kw)[0], noiser.add_noise,
                     source, noise, [mask] * len(timesteps), timesteps, background_timestep="next")
    keep = mask.expand_as(out) == 0
    assert torch.equal(out[keep], source.expand_as(out)[keep])
    assert (out - source).abs()[~keep].mean() > 0.1

    image, pmask = scene(64, 48), box_mask(64, 48, (20, 12, 44, 36))
    kw = dict(scheduler=name, num_inference_steps=2, guidance_scale=1.0, num_candidates=2, blend_start=0.0)
    a = sd1_editor.edit(image, pmask, "a dog", **kw)
    b = sd1_editor.edit(image, pmask, "a dog", batch_size=1, **kw)
    for x, y in zip(a.images, b.images):  # one shared generator would give other noise: far more than 1 level
        assert np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max() <= 1  # batch numerics round
        assert np.array_equal(_outside(x, (20, 12, 44, 36)), _outside(image, (20, 12, 44, 36)))


def test_tcd_gamma_zero_is_a_deterministic_ddim_step(sd1_editor):
    """`tcd_gamma` 0: TCD's step is the DDIM step of the model's own prediction, so the in-step noise (the
    candidate's generator) no longer matters; any other gamma draws from it. Out of [0, 1] is one line."""
    from blended.schedulers import step_kwargs

    sched, _, timesteps = schedule(sd1_editor.model.pipe, "tcd", 2, 0.0)
    x, eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.zeros(1, 4, 8, 8)

    def first_step(gamma, seed):
        sched._step_index = None
        return sched.step(eps, timesteps[0], x, return_dict=False,
                          **step_kwargs("tcd", torch.Generator().manual_seed(seed), gamma))[0]

    assert torch.equal(first_step(0.0, 1), first_step(0.0, 2))
    assert not torch.allclose(first_step(0.3, 1), first_step(0.3, 2))
    image, pmask = scene(64, 48), box_mask(64, 48, (20, 12, 44, 36))
    kw = dict(scheduler="tcd", num_inference_steps=2, guidance_scale=1.0, num_candidates=1, blend_start=0.0)
    a, b = (sd1_editor.edit(image, pmask, "a dog", tcd_gamma=g, **kw).images[0] for g in (0.0, 1.0))
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(InputError, match="tcd_gamma"):
        sd1_editor.edit(image, pmask, "a dog", tcd_gamma=1.5, **kw)


def test_blend_start_keeps_every_lcm_step_over_a_shorter_range(sd1_editor):
    pipe = sd1_editor.model.pipe
    full = schedule(pipe, "lcm", 4, 0.0)[2]
    short = schedule(pipe, "lcm", 4, 0.5)[2]
    assert len(full) == len(short) == 4 and int(full[0]) == 999 and int(short[0]) <= 499
    assert steps_run("lcm", 4, 0.75) == 4 and steps_run("ddim", 4, 0.75) == 1  # img2img's slicing, at least 1
    assert len(schedule(pipe, "ddim", 4, 0.9)[2]) == 1
    with pytest.raises(InputError, match="blend_start"):
        schedule(pipe, "lcm", 10, 0.9)  # 5 distillation timesteps left for 10 steps
    with pytest.raises(InputError, match="blend_start"):
        sd1_editor.edit(scene(40, 32), box_mask(40, 32, BOX), "a dog", scheduler="lcm", num_inference_steps=10,
                        blend_start=0.9, num_candidates=1)


def test_recommendations_for_few_step_checkpoints(sd1_editor, lcm_editor):
    assert PRESETS["sd-turbo"] == "stabilityai/sd-turbo" and PRESETS["sdxl-turbo"] == "stabilityai/sdxl-turbo"
    pipe = sd1_editor.model.pipe  # DDIM, no guidance embedding
    assert recommended_for_model(PRESETS["sdxl-turbo"], pipe) == TURBO
    assert recommended_for_model(sd1_editor.model.source, pipe) == {}
    assert sd1_editor.defaults == EditConfig()
    assert recommended_for_model("any/name", lcm_editor.model.pipe) == {"scheduler": "lcm", "num_inference_steps": 4,
                                                                        **FAST_DECODER, "num_candidates": 8}
    fast = lcm_editor.defaults  # a few-step model's decoder fine-tuning: the fast recipe; demo-fast keeps the 75 steps
    assert (fast.decoder_blocks, fast.decoder_schedule, fast.decoder_steps) == (1, "linear", 100)
    assert Editor.load("demo-fast", device="cpu").defaults.decoder_blocks == 0


def _lora_file(path, keys, metadata=None):
    from safetensors.torch import save_file

    save_file({k: torch.zeros(2, 2) for k in keys}, str(path), metadata=metadata)
    return path


def test_recommended_for_lora(tmp_path):
    plain = ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]
    assert recommended_for_lora(_lora_file(tmp_path / "lcm-lora-sdv1-5.safetensors", plain)) == LCM
    assert recommended_for_lora(_lora_file(tmp_path / "Hyper_TCD_8steps.safetensors", plain)) == {**TCD, "num_inference_steps": 8}
    assert recommended_for_lora(_lora_file(tmp_path / "pytorch_lora_weights.safetensors", plain,
                                           {"ss_output_name": "sdxl_lcm_lora"})) == LCM  # named in the metadata
    cond = plain + ["unet.time_embedding.cond_proj.lora_A.weight"]
    assert recommended_for_lora(_lora_file(tmp_path / "weights.safetensors", cond)) == LCM  # a guidance embedding
    assert recommended_for_lora(_lora_file(tmp_path / "watercolour_style.safetensors", plain)) == {}
    assert recommended_for_lora(_lora_file(tmp_path / "sd_turbo_lora.safetensors", plain)) == {}  # not LCM/TCD
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(InputError, match="not a readable safetensors"):
        recommended_for_lora(tmp_path / "broken.safetensors")
    with pytest.raises(InputError, match="not found"):
        recommended_for_lora(tmp_path / "missing.safetensors")
    cfg = EditConfig().replace(**recommended_for_lora(tmp_path / "lcm-lora-sdv1-5.safetensors"))
    assert cfg.validate().scheduler == "lcm"


def test_speed_estimate_of_a_few_step_edit():
    cfg = EditConfig(scheduler="lcm", num_inference_steps=4, guidance_scale=7.5, blend_start=0.5, num_candidates=4)
    assert edit_seconds(cfg, 2.0, guided=False) == 4 * 4 * 1.0  # every LCM step runs; one UNet row per candidate
    assert edit_seconds(cfg.replace(scheduler="ddim"), 2.0) == 2 * 4 * 2.0


def test_app_defaults_and_cpu_banner_follow_a_few_step_model(lcm_editor):
    from ui import Limits, create_demo
    from ui.speed import cpu_notice

    text = cpu_notice(lcm_editor, lcm_editor.defaults, per_call=3.0)  # 3 s for a guided batch of 2
    assert "8 candidates x 4 steps" in text and "about 48 s" in text  # 32 unguided rows x 1.5 s
    demo = create_demo(lcm_editor, limits=Limits(), speed=None)
    sliders = {c["props"].get("label"): c["props"].get("value") for c in demo.config["components"]
               if c.get("type") == "slider"}
    assert sliders["Denoising steps"] == 4 and sliders["Guidance scale"] == 7.5


def test_demo_fast_is_a_preset_with_its_settings():
    from pathlib import Path

    folder = Path(PRESETS["demo-fast"])
    rec = json.loads((folder / "blended.json").read_text())
    assert rec["scheduler"] == "lcm" and rec["num_inference_steps"] <= 4
    unet = json.loads((folder / "unet" / "config.json").read_text())
    assert unet["time_cond_proj_dim"] and json.loads((folder / "scheduler" / "scheduler_config.json").read_text())[
        "_class_name"] == "LCMScheduler"


def test_demo_fast_edits_in_four_unguided_steps():
    """The bundled distilled model through the public loader: its ranker, its settings, 4 x 4 UNet rows, and the
    asked colour in the top candidate of the demo model's held-out test cases (tests/test_demo_model.py)."""
    from blended_dev import analyse, scenes

    editor = Editor.load("demo-fast", device="cpu")
    assert editor.ranker is not None and editor.defaults.num_inference_steps == 4
    rows, handle = _count_calls(editor)
    try:
        for k in (3, 11, 42):
            image, mask, prompt, colour, _ = scenes.make_edit_case(scenes.HELDOUT_SEED_START + k)
            top = np.asarray(editor.edit(image, mask.astype(np.uint8) * 255, prompt, seed=0).candidates[0].image)
            assert analyse.analyse_region(top, mask)[0] == colour, prompt
    finally:
        handle.remove()
    assert sum(rows) == 3 * 4 * 8  # 3 edits x 4 steps x demo-fast's 8 candidates
