"""The command line end to end, as a user runs it (a subprocess)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import box_mask, scene

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "blended", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd or ROOT, timeout=300)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    scene(48, 32).save(d / "image.png")
    box_mask(48, 32, (16, 8, 36, 24)).save(d / "mask.png")
    box_mask(48, 32, (0, 0, 0, 0)).save(d / "empty.png")
    box_mask(40, 32, (8, 8, 20, 20)).save(d / "small.png")
    (d / "junk.png").write_bytes(b"this is not an image")
    return d


def test_cli_edit_writes_ranked_pngs_and_result_json(tiny_dirs, files, tmp_path):
    out = tmp_path / "out"
    p = run_cli("edit", "--image", files / "image.png", "--mask", files / "mask.png", "--prompt", "a red circle",
                "--model", tiny_dirs["sd1"], "--candidates", 3, "--steps", 4, "--seed", 5, "--no-rank",
                "--out", out)
    assert p.returncode == 0, p.stderr
    assert sorted(x.name for x in out.iterdir()) == ["01.png", "02.png", "03.png", "result.json"]
    info = json.loads((out / "result.json").read_text())
    assert info["prompt"] == "a red circle" and [c["seed"] for c in info["candidates"]] == [5, 6, 7]
    assert info["settings"]["num_inference_steps"] == 4 and info["settings"]["shrink"] is True
    assert "total" in info["timings"]
    im = Image.open(out / "01.png")
    assert im.format == "PNG" and im.size == (48, 32)
    src = np.asarray(Image.open(files / "image.png"), np.int16)
    assert np.abs(np.asarray(im, np.int16) - src)[10:22, 18:34].mean() > 3, "inside the mask changed"


def test_cli_no_shrink_and_background_flags_reach_the_settings(tiny_dirs, files, tmp_path):
    out = tmp_path / "o"
    p = run_cli("edit", "--image", files / "image.png", "--mask", files / "mask.png", "--prompt", "x",
                "--model", tiny_dirs["sd1"], "--candidates", 1, "--steps", 2, "--no-shrink", "--background", "none",
                "--blend-start", 0.5, "--guidance", 3, "--negative-prompt", "blurry", "--out", out, "--quiet")
    assert p.returncode == 0, p.stderr
    s = json.loads((out / "result.json").read_text())["settings"]
    assert (s["shrink"], s["background"], s["blend_start"], s["guidance_scale"], s["negative_prompt"]) == \
        (False, "none", 0.5, 3.0, "blurry")


@pytest.mark.parametrize("args, message", [
    (["--image", "{d}/nope.png", "--mask", "{d}/mask.png"], "does not exist"),
    (["--image", "{d}/junk.png", "--mask", "{d}/mask.png"], "not a readable image"),
    (["--image", "{d}/image.png", "--mask", "{d}/empty.png"], "mask is empty"),
    (["--image", "{d}/image.png", "--mask", "{d}/small.png"], "same size"),
    (["--image", "{d}/image.png", "--mask", "{d}/mask.png", "--steps", "0"], "num_inference_steps"),
    (["--image", "{d}/image.png", "--mask", "{d}/mask.png", "--blend-start", "1.5"], "blend_start"),
    (["--image", "{d}/image.png", "--mask", "{d}/mask.png", "--candidates", "-1"], "num_candidates"),
    (["--image", "{d}/image.png", "--mask", "{d}/mask.png", "--background", "magic"], "background"),
    (["--image", "{d}/image.png", "--mask", "{d}/mask.png", "--steps", "many"], "invalid int"),
])
def test_cli_bad_input_exits_2_with_one_line(files, args, message):
    args = [a.format(d=files) for a in args]
    p = run_cli("edit", *args, "--prompt", "a cat", "--model", "/nonexistent-model-never-loaded")
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], p.stderr
    assert "Traceback" not in p.stderr


def test_cli_missing_model_is_one_line(files):
    p = run_cli("edit", "--image", files / "image.png", "--mask", files / "mask.png", "--prompt", "a cat",
                "--model", "org/not-cached-model")
    assert p.returncode == 1
    assert len(p.stderr.strip().splitlines()) == 1 and "org/not-cached-model" in p.stderr
