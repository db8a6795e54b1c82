"""Issue 31: what a CPU Space starts with (ui/cpu_space.py), the app's "Fast decode" setting and its limits."""

from __future__ import annotations

import argparse

import pytest

from blended import EditConfig, InputError
from ui.cpu_space import cpu_space_plan, native_bf16, on_cpu_space
from ui.editing import server_defaults, settings_to_config
from ui.limits import Limits
from ui.settings_panel import setting_of


def args(**kw):
    return argparse.Namespace(**{"model": "sd21", "dtype": None, **kw})


def test_only_a_space_without_a_gpu_is_a_cpu_space():
    assert on_cpu_space({"SPACE_ID": "me/app"}, cuda=False)
    assert not on_cpu_space({"SPACE_ID": "me/app"}, cuda=True)
    assert not on_cpu_space({"SPACE_ID": "me/app", "SPACES_ZERO_GPU": "true"}, cuda=False)
    assert not on_cpu_space({}, cuda=False)
    assert on_cpu_space({"BLENDED_CPU_SPACE": "1"}, cuda=True)
    assert not on_cpu_space({"SPACE_ID": "me/app", "BLENDED_CPU_SPACE": "0"}, cuda=False)


def test_the_plan_picks_few_step_tiny_decode_and_bf16_where_native():
    new, limits, line = cpu_space_plan(args(), Limits(), env={}, bf16=True)
    assert (new.model, new.dtype, limits.decode) == ("sd-turbo", "bf16", "tiny")
    assert line.count("\n") == 0 and "sd-turbo" in line and "tiny decoder" in line and "bf16" in line
    new, limits, line = cpu_space_plan(args(model="demo"), Limits(), env={}, bf16=True)
    assert (new.model, new.dtype) == ("demo-fast", None)  # the demo's tiny convolutions: bf16 does not pay
    new, limits, _ = cpu_space_plan(args(model="my/model", dtype="fp32"), Limits(), env={"BLENDED_DECODE": "full"},
                                    bf16=True)
    assert (new.model, new.dtype, limits.decode) == ("my/model", "fp32", "")  # the owner's choices are kept
    assert cpu_space_plan(args(model="x", dtype="fp32"), Limits(), env={"BLENDED_DECODE": "full"})[2] is None


def test_native_bf16_reads_the_cpu_flags(tmp_path):
    (tmp_path / "yes").write_text("flags : fpu avx512f avx512_bf16 amx_tile\n")
    (tmp_path / "no").write_text("flags : fpu avx2\n")
    assert native_bf16(str(tmp_path / "yes")) and not native_bf16(str(tmp_path / "no"))
    assert not native_bf16(str(tmp_path / "missing"))


def test_the_server_decode_default_and_the_fast_decode_checkbox():
    limits = Limits.from_env({"BLENDED_DECODE": "tiny"})
    defaults = server_defaults(EditConfig(), limits)
    assert defaults.decode == "tiny" and setting_of(defaults, "fast_decode") is True
    assert settings_to_config(defaults, {"fast_decode": False}, limits).decode == "full"
    assert settings_to_config(defaults, {}, limits).decode == "tiny"
    assert settings_to_config(EditConfig(), {"fast_decode": True}, Limits()).decode == "tiny"
    with pytest.raises(ValueError, match="BLENDED_DECODE must be full or tiny"):
        Limits.from_env({"BLENDED_DECODE": "/tmp/x"})


def test_a_visitor_cannot_name_a_file_on_the_server():
    with pytest.raises(InputError, match="this server decodes with full or tiny"):
        settings_to_config(EditConfig(), {"decode": "/etc/passwd.safetensors"}, Limits())
    assert settings_to_config(EditConfig(), {"decode": "tiny"}, Limits()).decode == "tiny"


def test_a_result_png_with_a_decoder_path_is_repeated_with_tiny(tmp_path):
    import json

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from blended.pnginfo import RECORD, read_recipe

    info = PngInfo()
    info.add_text(RECORD, json.dumps({"prompt": "a cat", "model": "demo",
                                      "settings": {"decode": "/somewhere/taesd.safetensors", "seed": 3}}))
    Image.new("RGB", (8, 8)).save(tmp_path / "r.png", pnginfo=info)
    recipe = read_recipe(tmp_path / "r.png")
    assert recipe.settings["decode"] == "tiny" and any("repeated with 'tiny'" in n for n in recipe.notes)
