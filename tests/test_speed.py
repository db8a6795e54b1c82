"""Honest speed: a Stable Diffusion model on the CPU gets a banner with a measured time per edit."""

from blended import EditConfig
from ui.speed import cpu_notice, duration, edit_seconds, unet_seconds


def test_edit_estimate_counts_the_steps_that_run():
    cfg = EditConfig(num_inference_steps=50, blend_start=0.25, num_candidates=4, guidance_scale=7.5)
    assert edit_seconds(cfg, 2.0) == 37 * 4 * 2.0  # 37 steps run after blend_start (first_step)
    assert edit_seconds(cfg.replace(guidance_scale=1.0), 2.0) == 37 * 4 * 1.0  # unguided: half the batch
    assert duration(40) == "40 s" and duration(600) == "10 min" and duration(3 * 3600) == "3.0 h"


def test_cpu_banner_for_stable_diffusion_on_the_cpu(sd1_editor):
    assert unet_seconds(sd1_editor) > 0
    text = cpu_notice(sd1_editor, sd1_editor.defaults, per_call=3.0)
    assert "running on the CPU" in text and "python app.py --model demo" in text
    assert "about 7 min" in text  # 37 steps x 4 candidates x 3 s


def test_app_shows_the_banner(sd1_editor):
    from ui import Limits, create_demo

    demo = create_demo(sd1_editor, limits=Limits())
    ids = [c.get("props", {}).get("elem_id") for c in demo.config["components"]]
    assert "speed-banner" in ids and "continue-editing" in ids and "extend-canvas" in ids
    assert "live-preview" in ids


def test_the_unet_is_timed_through_unet_call_on_an_sdxl_model(tiny_dirs, monkeypatch):
    """Issue 27, bug 5: `unet_seconds` goes through `blended.unet_call` (the one place a UNet is called), which
    gives an SDXL UNet its pooled text embeddings and size ids; ui/speed.py never calls the UNet itself."""
    import inspect

    import ui.speed
    from blended import Editor
    from blended.unet_call import time_unet_call

    editor = Editor.load(str(tiny_dirs["sdxl"]), ranker=None)
    unet = editor.model.pipe.unet
    real, seen = unet.forward, []

    def forward(*args, **kwargs):
        seen.append((args[0].shape, kwargs["encoder_hidden_states"].shape, kwargs.get("added_cond_kwargs")))
        return real(*args, **kwargs)

    monkeypatch.setattr(unet, "forward", forward)
    assert unet_seconds(editor) > 0 and time_unet_call(editor.model) > 0
    assert len(seen) == 2
    for sample, states, added in seen:  # a guided batch for one candidate: the negative row, then the prompt's
        assert sample[0] == 2 and states[0] == 2 and sample[1] == unet.config.in_channels
        assert added["text_embeds"].shape[0] == 2 and tuple(added["time_ids"].shape) == (2, 6)
    source = inspect.getsource(ui.speed)
    assert "unet(" not in source and "time_unet_call" in source
