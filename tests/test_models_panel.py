"""The app's model picker: the folder scan, loading with a failure that keeps the model, LoRA switching (issue 20)."""

import numpy as np
from conftest import box_mask, scene
from blended_dev.ldm_layout import write_single_file
from test_lora import make_lora

from ui.models_panel import ServerModels, load_for_session

EDIT = dict(num_inference_steps=2, num_candidates=1, rank=False, guidance_scale=3.0)


def test_scan_tells_models_loras_and_vaes_apart(tiny_dirs, tmp_path):
    import torch
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    from blended.models.catalog import scan

    (tmp_path / "folder-model").symlink_to(tiny_dirs["sd1"], target_is_directory=True)
    write_single_file(DiffusionPipeline.from_pretrained(str(tiny_dirs["sd1"])), tmp_path / "single.safetensors")
    (tmp_path / "loras").mkdir()
    make_lora(tiny_dirs["sd1"], tmp_path / "loras" / "style")
    (tmp_path / "loras" / "style" / "pytorch_lora_weights.safetensors").rename(tmp_path / "loras" / "style.safetensors")
    save_file({"decoder.conv_in.weight": torch.zeros(1)}, str(tmp_path / "my-vae.safetensors"))
    (tmp_path / "broken.safetensors").write_text("not a model")
    models, loras = scan(tmp_path)
    assert [label for label, _ in models] == ["broken.safetensors", "folder-model", "single.safetensors"]
    assert [label for label, _ in loras] == ["loras/style.safetensors"]


def test_a_failed_load_keeps_the_model_and_a_lora_leaves_no_residue(tiny_dirs, sd1_editor, tmp_path):
    """A session's failed load changes nothing; a LoRA is part of the loaded model (its own cache entry), so the
    model without it edits exactly as before."""
    server = ServerModels(sd1_editor, max_models=3)
    args = (scene(32, 32), box_mask(32, 32, (8, 8, 24, 24)), "a cat")
    base = np.asarray(sd1_editor.edit(*args, **EDIT).images[0])
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not a model")
    key, status = load_for_session(server, str(bad))
    assert key is None and status.startswith("**Could not load it:**") and "not a safetensors file" in status
    assert server.cache.keys() == [server.default_key]
    lora = make_lora(tiny_dirs["sd1"], tmp_path / "lora")
    key, status = load_for_session(server, str(tiny_dirs["sd1"]), [str(lora)], 1.0)
    assert key is not None and status.startswith("In use in this session:") and "LoRA pytorch_lora_weights" in status
    with server.acquire(key) as editor:
        assert editor.model.loras and not np.array_equal(np.asarray(editor.edit(*args, **EDIT).images[0]), base)
    key, _ = load_for_session(server, str(tiny_dirs["sd1"]), [], 1.0)
    assert key == server.default_key  # the same model without LoRAs: the server's own, not loaded again
    with server.acquire(key) as editor:
        assert editor is sd1_editor and np.array_equal(np.asarray(editor.edit(*args, **EDIT).images[0]), base)
    assert len(server.cache) == 2


def test_the_app_shows_the_picker(sd1_editor, tmp_path):
    from ui import create_demo

    demo = create_demo(sd1_editor, speed=None, models_dir=str(tmp_path))
    ids = {c.get("props", {}).get("elem_id") for c in demo.config["components"]}
    assert {"model-picker", "load-model", "model-status"} <= ids


def test_app_flags_load_a_lora_and_fall_back_with_a_notice(tiny_dirs, tmp_path):
    import app

    args = app.parse_args(["--model", str(tiny_dirs["sd1"]), "--lora", "style.safetensors:0.5", "--vae", "v/"])
    assert (args.loras, args.vae) == (["style.safetensors:0.5"], "v/")
    lora = make_lora(tiny_dirs["sd1"], tmp_path / "lora")
    editor, notice = app.load_editor(str(tiny_dirs["sd1"]), None, None, loras=[f"{lora}:0.5"])
    assert notice is None and [(l.path, l.weight) for l in editor.model.loras] == [(str(lora), 0.5)]
    editor, notice = app.load_editor(str(tiny_dirs["sd1"]), None, None, loras=[str(tmp_path / "missing.safetensors")])
    assert editor.model.name == "demo" and "does not exist" in notice


def test_loading_a_few_step_model_brings_its_settings(tmp_path):
    """A session's load of demo-fast sets its Settings to 4 LCM steps; a failed load gives no key (nothing changes)."""
    from blended import Editor
    from ui.settings_panel import MODEL_SETTINGS, model_settings
    from ui.limits import Limits

    server, limits = ServerModels(Editor.load("demo", ranker=None)), Limits()
    names = [n for n in MODEL_SETTINGS if n != "negative_prompt"]
    key, _ = load_for_session(server, "demo")
    before = dict(zip(names, model_settings(server.cache.get(key), names, limits)))
    assert (before["scheduler"], before["num_inference_steps"]) == ("ddim", 20)
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not a model")
    assert load_for_session(server, str(bad))[0] is None
    key, _ = load_for_session(server, "demo-fast")
    after = dict(zip(names, model_settings(server.cache.get(key), names, limits)))
    assert (after["scheduler"], after["num_inference_steps"]) == ("lcm", server.cache.get(key).defaults.num_inference_steps)
    assert after["num_inference_steps"] <= 8


# -- issue 27, bug 1: an edit uses the settings of the model in use, not the first model's ----------------

PER_MODEL = ("core_steps", "background_timestep", "background_noise")  # demo-fast's blended.json sets them; no widget does


def test_edits_use_the_settings_of_the_session_model(tmp_path):
    """The server starts on `demo`; a session that loaded `demo-fast` gets demo-fast's blended.json from Generate
    (core_steps, background_timestep, background_noise have no widget), while /edit keeps the server's model."""
    import json
    from pathlib import Path

    from gradio_client import Client, handle_file

    from blended import Editor, PRESETS
    from blended.models.cache import ModelKey
    from ui.limits import Limits
    from test_app_client import generate_handler, launch, make_case, painted

    editor, limits = Editor.load("demo", ranker=None), Limits(max_candidates=2)
    first = {n: getattr(editor.defaults, n) for n in PER_MODEL}
    demo, url = launch(editor, limits)
    try:
        wanted = {n: v for n, v in json.loads((Path(PRESETS["demo-fast"]) / "blended.json").read_text()).items()
                  if n in PER_MODEL}
        assert wanted != first
        image, mask, _ = make_case(editor, tmp_path)
        _, result = Client(url, verbose=False).predict(handle_file(str(image)), handle_file(str(mask)), "a red circle",
                                                       {"num_candidates": 1}, api_name="/edit")
        assert result["model"] == "demo" and {n: result["settings"][n] for n in PER_MODEL} == first

        handler, inputs = generate_handler(demo)
        by_id = {c.elem_id: c for c in inputs if getattr(c, "elem_id", None)}
        key_state = next(c for c in inputs if isinstance(c.value, ModelKey))  # the session's model
        fast = Editor.load("demo-fast", ranker=None).defaults
        data = {c: c.value for c in inputs}
        data.update({by_id["editor"]: painted(editor.model.native_size), by_id["prompt"]: "a red circle",
                     by_id["live-preview"]: False, by_id["num-candidates"]: 1, by_id["randomize-seed"]: False,
                     key_state: ModelKey("demo-fast")})
        for name in ("num_inference_steps", "guidance_scale", "scheduler", "blend_start"):  # what the picker resets
            data[by_id[name.replace("_", "-")]] = getattr(fast, name)
        last = list(handler(data, None))[-1]
        details = next(v for k, v in last.items() if getattr(k, "elem_id", None) == "details")
        assert details["model"] == "demo-fast" and {n: details["settings"][n] for n in PER_MODEL} == wanted
        assert (details["settings"]["scheduler"], details["settings"]["num_inference_steps"]) == ("lcm", 4)
    finally:
        demo.close()
