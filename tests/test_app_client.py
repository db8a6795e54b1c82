"""The app through its API: launch the real Blocks on a small model, edit with gradio_client, stop, fail, recover.

The model is the bundled demo model when `assets/demo` exists (with its recommended settings), else a
tiny random SD1-shaped pipeline built in-process (blended_dev/tiny.py).
"""

import random
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blended_dev.server import free_port
from blended import Candidate, EditConfig, InputError
from conftest import box_mask, scene

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "assets" / "demo"


# -- shared with test_browser.py ----------------------------------------------------------------------

@pytest.fixture(scope="session")
def app_editor(tmp_path_factory):
    """The demo model when it has been trained into assets/demo, else a tiny SD1 pipeline; no ranker."""
    from blended import Editor

    if (DEMO / "model_index.json").is_file():
        return Editor.load("demo", ranker=None)
    from blended_dev.tiny import build_pipeline

    folder = build_pipeline("sd1", tmp_path_factory.mktemp("app") / "sd1")
    return Editor.load(str(folder), ranker=None)


def launch(editor, limits):
    """Launch the app in this process on a free port; return (demo, url)."""
    from ui import create_demo

    demo = create_demo(editor, limits=limits)
    demo.queue(max_size=limits.max_queue, default_concurrency_limit=limits.concurrency)
    demo.launch(prevent_thread_lock=True, server_port=free_port(), quiet=True,
                max_file_size=f"{limits.max_upload_mb}mb")
    return demo, demo.local_url


def make_case(editor, tmp_path):
    """A source of 6x4 native sizes with a small square mask near its top-left corner, as files.

    The engine edits a crop around the mask (plus its margin), so the bottom-right quadrant lies far
    outside what is edited and must come back unchanged, pixel for pixel.
    """
    n = editor.model.native_size
    w, h = 6 * n, 4 * n
    box = (n // 8, n // 8, 5 * n // 8, 5 * n // 8)
    image, mask = tmp_path / "source.png", tmp_path / "mask.png"
    scene(w, h, seed=3).save(image)
    box_mask(w, h, box).save(mask)
    return image, mask, box


def generate_handler(demo):
    """The Generate button's handler and its inputs (the UI's own path, without a browser)."""
    fn = next(f for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "on_generate")
    return fn.fn, fn.inputs


def painted(size: int) -> dict:
    """An ImageEditor value: a scene with a square painted in its middle."""
    layer = np.zeros((size, size, 4), np.uint8)
    layer[size // 4:3 * size // 4, size // 4:3 * size // 4] = (255, 0, 255, 140)
    return {"background": scene(size, size).convert("RGBA"), "layers": [Image.fromarray(layer, "RGBA")],
            "composite": None}


# -- through the API ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(app_editor):
    from ui import Limits

    demo, url = launch(app_editor, Limits(max_candidates=3, max_steps=1000, max_queue=8))
    yield url
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


def fast(editor, **changes) -> dict:
    """Settings for a quick edit with this model."""
    return {"num_inference_steps": min(editor.defaults.num_inference_steps, 8), "seed": 5, **changes}


def test_edit_through_the_client(client, app_editor, tmp_path):
    from gradio_client import handle_file

    image, mask, box = make_case(app_editor, tmp_path)
    gallery, result = client.predict(handle_file(str(image)), handle_file(str(mask)), "a red circle",
                                     fast(app_editor, num_candidates=2), api_name="/edit")
    assert len(gallery) == 2 and len(result["candidates"]) == 2
    assert [c["seed"] for c in result["candidates"]] == [5, 6]
    assert [item["caption"] for item in gallery] == ["#1 · seed 5", "#2 · seed 6"]
    assert result["settings"]["num_inference_steps"] == fast(app_editor)["num_inference_steps"]
    assert result["region"]["box"][2] <= Image.open(image).size[0] // 2  # the engine edited a crop
    source = np.asarray(Image.open(image).convert("RGB"), np.int16)
    h, w = source.shape[:2]
    l, t, r, b = box
    for item in gallery:
        assert item["image"].endswith(".png")
        out = Image.open(item["image"])
        assert out.format == "PNG" and out.size == (w, h)
        out = np.asarray(out.convert("RGB"), np.int16)
        np.testing.assert_array_equal(out[:, w // 2:], source[:, w // 2:])  # far outside: untouched
        assert np.abs(out[t:b, l:r] - source[t:b, l:r]).mean() > 3  # inside: edited


def test_user_errors_reach_the_client_and_the_server_keeps_serving(client, app_editor, tmp_path):
    from gradio_client import handle_file

    image, mask, _ = make_case(app_editor, tmp_path)
    empty = tmp_path / "empty.png"
    Image.new("L", Image.open(image).size, 0).save(empty)
    with pytest.raises(Exception, match="mask is empty"):
        client.predict(handle_file(str(image)), handle_file(str(empty)), "a red circle", fast(app_editor),
                       api_name="/edit")
    with pytest.raises(Exception, match="at most 3"):
        client.predict(handle_file(str(image)), handle_file(str(mask)), "a red circle",
                       fast(app_editor, num_candidates=4), api_name="/edit")
    with pytest.raises(Exception, match="unknown setting"):
        client.predict(handle_file(str(image)), handle_file(str(mask)), "a red circle", {"steps": 3},
                       api_name="/edit")
    with pytest.raises(Exception, match="prompt is empty"):
        client.predict(handle_file(str(image)), handle_file(str(mask)), "  ", fast(app_editor), api_name="/edit")
    broken = tmp_path / "broken.png"
    broken.write_text("not a picture")
    with pytest.raises(Exception, match="not a readable image"):
        client.predict(handle_file(str(broken)), handle_file(str(mask)), "a red circle", fast(app_editor),
                       api_name="/edit")
    gallery, result = client.predict(handle_file(str(image)), handle_file(str(mask)), "a red circle",
                                     fast(app_editor, num_candidates=1, randomize_seed=True), api_name="/edit")
    assert len(gallery) == 1 and result["candidates"][0]["seed"] == result["settings"]["seed"]


def test_stop_halts_a_running_edit(server, app_editor, tmp_path):
    """A long edit reports named progress; /stop from the same session ends it within a step."""
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    image, mask, _ = make_case(app_editor, tmp_path)
    job = client.submit(handle_file(str(image)), handle_file(str(mask)), "a red circle",
                        {"num_inference_steps": 900, "blend_start": 0.0, "num_candidates": 3}, api_name="/edit")
    deadline = time.time() + 60
    desc = None
    while time.time() < deadline and not (desc or "").startswith("denoising") and not job.done():
        progress = job.status().progress_data
        desc = progress[0].desc if progress else None
        time.sleep(0.05)
    assert desc is not None and desc.startswith("denoising ") and desc.endswith("/900"), desc
    stopped_at = time.perf_counter()
    client.predict(api_name="/stop")
    with pytest.raises(Exception, match="stopped"):  # had it not stopped, the edit would end with a result
        job.result(timeout=120)
    # the worker is free again at once (one edit at a time on this server: a stuck one would block the next)
    gallery, _ = client.predict(handle_file(str(image)), handle_file(str(mask)), "a red circle",
                                fast(app_editor, num_candidates=1), api_name="/edit")
    freed_in = time.perf_counter() - stopped_at
    print(f"\nStop -> next edit finished in {freed_in:.2f} s")
    assert len(gallery) == 1
    assert freed_in < 8.0, f"the next edit finished {freed_in:.1f} s after Stop"  # the 900 steps take ~19 s here


# -- the glue, without a server ---------------------------------------------------------------------------

def test_mask_is_the_painted_layers_alpha_not_their_colour():
    from ui.editing import mask_from_layers

    a = np.zeros((10, 12, 4), np.uint8)
    a[2:5, 3:7] = (0, 0, 0, 200)  # black, opaque: painted
    a[7:9, 0:2] = (255, 255, 255, 10)  # white, nearly transparent: not painted
    b = np.zeros((10, 12, 4), np.uint8)
    b[0, 11] = (255, 0, 255, 140)
    mask = np.asarray(mask_from_layers([Image.fromarray(a), Image.fromarray(b)], (12, 10))) > 0
    expected = np.zeros((10, 12), bool)
    expected[2:5, 3:7] = True
    expected[0, 11] = True
    np.testing.assert_array_equal(mask, expected)
    with pytest.raises(InputError, match="is 12x10 but the image is 20x10"):
        mask_from_layers([Image.fromarray(a)], (20, 10))


def test_editor_value_needs_an_image_and_a_painted_mask():
    from ui import Limits
    from ui.editing import editor_inputs

    limits = Limits(max_pixels=400)
    bg = Image.new("RGBA", (16, 12), (10, 20, 30, 255))
    with pytest.raises(InputError, match="upload an image"):
        editor_inputs(None, limits)
    with pytest.raises(InputError, match="mask is empty"):
        editor_inputs({"background": bg, "layers": [Image.new("RGBA", (16, 12))]}, limits)
    with pytest.raises(InputError, match="over the limit of 400"):
        editor_inputs({"background": Image.new("RGBA", (30, 30)), "layers": []}, limits)
    layer = Image.new("RGBA", (16, 12))
    layer.putpixel((3, 4), (255, 0, 255, 255))
    source, mask = editor_inputs({"background": bg, "layers": [layer]}, limits)
    assert source.mode == "RGB" and source.getpixel((0, 0)) == (10, 20, 30)
    assert np.argwhere(np.asarray(mask)).tolist() == [[4, 3]]


def test_settings_become_an_edit_config_within_the_limits():
    from ui import Limits
    from ui.editing import server_defaults, settings_to_config

    limits = Limits(max_candidates=4, max_steps=50)
    defaults = server_defaults(EditConfig(num_inference_steps=20, guidance_scale=5.0), limits)
    cfg = settings_to_config(defaults, {"num_candidates": 3.0, "seed": 9, "randomize_seed": False,
                                        "preserve_background": False, "shrink": False}, limits)
    assert (cfg.num_candidates, cfg.seed, cfg.shrink, cfg.num_inference_steps, cfg.guidance_scale) == \
        (3, 9, False, 20, 5.0)
    assert settings_to_config(defaults, {"seed": 9, "randomize_seed": True}, limits,
                              rng=random.Random(0)).seed == random.Random(0).randrange(2**31)
    assert settings_to_config(defaults, {"preserve_background": True, "background": "none"}, limits).background \
        == "decoder"
    assert settings_to_config(defaults, None, limits) == defaults
    within = server_defaults(EditConfig(num_candidates=8, num_inference_steps=500), limits)
    assert (within.num_candidates, within.num_inference_steps, within.decoder_steps, within.latent_steps) == \
        (4, 50, 50, 50)
    for bad, message in [({"num_candidates": 5}, "at most 4"), ({"num_inference_steps": 51}, "at most 50"),
                         ({"preserve_background": True, "decoder_steps": 60}, "decoder_steps 60 asked"),
                         ({"background": "latent", "latent_steps": 51}, "latent_steps 51 asked"),
                         ({"num_candidates": 2.5}, "an integer"), ({"randomize_seed": "yes"}, "true or false"), ({"shrink": "yes"}, "true or false"),
                         ({"guidance_scale": 99}, "guidance_scale must be between"),
                         ({"background": "magic"}, "background must be one of"), ({"cfg": 1}, "unknown setting")]:
        with pytest.raises(InputError, match=message):
            settings_to_config(defaults, bad, limits)
    with pytest.raises(InputError, match="JSON object"):
        settings_to_config(defaults, [1, 2], limits)


def test_limits_come_from_the_environment():
    from ui import Limits

    limits = Limits.from_env({"BLENDED_MAX_CANDIDATES": "2", "BLENDED_MAX_PIXELS": "1_000_000",
                              "BLENDED_CONCURRENCY": " 3 ", "BLENDED_MAX_QUEUE": ""})
    assert (limits.max_candidates, limits.max_pixels, limits.concurrency) == (2, 1_000_000, 3)
    assert (limits.max_queue, limits.max_upload_mb, limits.max_steps) == (20, 20, 100)  # unset: defaults
    with pytest.raises(ValueError, match="BLENDED_MAX_STEPS must be a whole number"):
        Limits.from_env({"BLENDED_MAX_STEPS": "many"})
    with pytest.raises(ValueError, match="BLENDED_CONCURRENCY must be at least 1"):
        Limits.from_env({"BLENDED_CONCURRENCY": "0"})


def test_captions_and_progress_labels():
    from ui.editing import caption, progress_label

    image = Image.new("RGB", (4, 4))
    ranked = Candidate(image, seed=42, scores={"score": 0.31234, "clip": 0.2})
    assert caption(1, ranked) == "#1 · score 0.312 · seed 42"
    assert caption(2, Candidate(image, seed=7)) == "#2 · seed 7"
    assert progress_label("denoising", 3, 20) == "denoising 3/20"
    assert progress_label("decoding", 0, 1) == "decoding"


def test_stop_switch_stops_only_its_session():
    from ui.editing import StopSwitch

    switch = StopSwitch()
    a1, a2, b = switch.start("a"), switch.start("a"), switch.start("b")
    assert switch.stop("a") == 2 and a1.is_set() and a2.is_set() and not b.is_set()
    switch.finish("a", a1)
    switch.finish("a", a2)
    assert switch.stop("a") == 0 and not b.is_set()


def test_examples_exist_and_fit_the_engine():
    from blended.images import load_image, load_mask
    from ui import load_examples

    examples = load_examples()
    assert len(examples) >= 5 and sum("(photo)" in ex["name"] for ex in examples) == 1
    for ex in examples:
        image = load_image(ex["image"])
        mask = load_mask(ex["mask"], image.size)  # the painted layer's alpha, as in the editor
        assert 0 < mask.mean() < 0.5 and ex["prompt"]
        if "(shapes)" in ex["name"]:
            assert image.size == (64, 64)


# -- the Blocks and app.py, without a server -------------------------------------------------------------

def test_demo_banner_png_everywhere_and_the_editor_keeps_resolution(app_editor):
    import dataclasses

    from blended import Editor
    from ui import create_demo

    def config_of(editor, **kw):
        return create_demo(editor, **kw).get_config_file()["components"]

    as_demo = Editor(dataclasses.replace(app_editor.model, name="demo"))
    banner = [c for c in config_of(as_demo, notice="The requested model 'x' could not be loaded.")
              if c["props"].get("elem_id") == "demo-banner"]
    assert len(banner) == 1 and "demo model is in use" in banner[0]["props"]["value"]
    assert "'x' could not be loaded" in banner[0]["props"]["value"]

    tiny = Editor(dataclasses.replace(app_editor.model, name="/some/folder", source="/some/folder"))
    components = config_of(tiny)
    assert not any(c["props"].get("elem_id") == "demo-banner" for c in components)
    formats = {c["type"]: c["props"]["format"] for c in components if "format" in c["props"]}
    assert {"imageeditor", "gallery", "imageslider"} <= set(formats) and set(formats.values()) == {"png"}
    editor = next(c["props"] for c in components if c["type"] == "imageeditor")
    assert editor["fixed_canvas"] is False and editor["brush"]["color_mode"] == "fixed"
    assert editor["eraser"] and editor["image_mode"] == "RGBA"


def test_app_falls_back_to_the_demo_model_with_one_line(capsys):
    import app

    try:
        editor, notice = app.load_editor("no-such-org/no-such-model", None, None)
    except SystemExit as e:  # the demo model has not been trained into assets/demo yet
        assert not DEMO.is_dir() and "demo model is missing" in str(e)
    else:
        assert editor.model.name == "demo" and "no-such-org/no-such-model" in notice
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "falling back to the bundled demo model" in lines[0]
    assert "no-such-org/no-such-model" in lines[0]


def test_importing_app_loads_nothing_heavy():
    import subprocess
    import sys

    code = "import app, sys; print(sorted(m for m in ('torch', 'gradio', 'diffusers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
    args = __import__("app").parse_args(["--model", "demo", "--port", "7999", "--share"])
    assert (args.model, args.port, args.share, args.device, args.host) == ("demo", 7999, True, None, None)


def test_gpu_decorator_is_the_identity_off_zerogpu(monkeypatch):
    from ui import zerogpu

    def work(x):
        return x + 1

    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    assert not zerogpu.on_zerogpu() and zerogpu.gpu(60)(work) is work
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")  # a ZeroGPU Space without the `spaces` package: still the identity
    has_spaces = __import__("importlib").util.find_spec("spaces") is not None
    assert zerogpu.on_zerogpu() == has_spaces
    if not has_spaces:
        assert zerogpu.gpu(60)(work) is work


def test_output_files_are_pruned_after_their_time(tmp_path):
    import os

    from ui.editing import OutputDir, caption

    files = OutputDir(keep_seconds=60, root=tmp_path)
    image = Image.new("RGB", (8, 8), (200, 10, 10))
    old_source, old_paths = files.save(image, [Candidate(image, seed=1)])
    old_folder = Path(old_source).parent
    os.utime(old_folder, (time.time() - 120, time.time() - 120))  # two minutes old
    new_source, new_paths = files.save(image, [Candidate(image, seed=2), Candidate(image, seed=3)])
    assert not old_folder.exists() and not Path(old_paths[0]).exists()  # pruned on the next save
    assert Path(new_source).is_file() and [Path(p).name for p in new_paths] == ["rank1-seed2.png", "rank2-seed3.png"]
    assert Image.open(new_paths[0]).format == "PNG"
    assert "filtered by the safety checker" in caption(1, Candidate(image, seed=4, filtered=True))
