"""Single-file checkpoints: the reverse layout helper, family detection, offline loading, bad files (issue 20)."""

import json

import numpy as np
import pytest
import torch
from conftest import box_mask, scene
from blended_dev.ldm_layout import UNET, VAE, unet_to_ldm, vae_to_ldm, write_single_file

from blended.errors import ModelLoadError


def _pipe(folder):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(folder))


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k].reshape(a[k].shape)) for k in a)


@pytest.fixture(scope="module")
def sd1_file(tiny_dirs, tmp_path_factory):
    return write_single_file(_pipe(tiny_dirs["sd1"]), tmp_path_factory.mktemp("files") / "sd1.safetensors")


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_reverse_layout_round_trips_through_diffusers_converters(tiny_dirs, kind):
    """unet_to_ldm / vae_to_ldm invert convert_ldm_unet_checkpoint / convert_ldm_vae_checkpoint, key for key."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    pipe = _pipe(tiny_dirs[kind])
    unet, vae = pipe.unet.state_dict(), pipe.vae.state_dict()
    ldm = {UNET + k: v for k, v in unet_to_ldm(unet, pipe.unet.config).items()}
    assert _same(unet, convert_ldm_unet_checkpoint(ldm, pipe.unet.config))
    ldm = {VAE + k: v for k, v in vae_to_ldm(vae, pipe.vae.config).items()}
    assert _same(vae, convert_ldm_vae_checkpoint(ldm, pipe.vae.config))


def test_detect_reads_family_and_channels_from_the_header(tiny_dirs, sd1_file, tmp_path):
    from blended.models.detect import inspect

    info = inspect(sd1_file)
    assert (info.family, info.in_channels, info.text_encoders, info.vae) == ("sd1", 4, True, True)
    for kind in ("sd2", "sdxl"):  # UNet + VAE only: the family comes from the UNet's own keys
        path = write_single_file(_pipe(tiny_dirs[kind]), tmp_path / f"{kind}.safetensors", text_encoders=False)
        info = inspect(path)
        assert (info.family, info.in_channels, info.text_encoders) == (kind, 4, False)


def test_single_file_loads_offline_with_the_folders_weights(tiny_dirs, sd1_file):
    from blended.models import load_model

    folder = _pipe(tiny_dirs["sd1"])
    single = load_model(str(sd1_file), model_config=str(tiny_dirs["sd1"]), prediction_type="v_prediction").pipe
    assert folder.scheduler.config.prediction_type == "epsilon"  # a file cannot tell: --prediction-type says it
    assert single.scheduler.config.prediction_type == "v_prediction"
    for part in ("unet", "vae", "text_encoder"):
        assert _same(getattr(folder, part).state_dict(), getattr(single, part).state_dict()), part


def test_sdxl_file_with_text_encoders_passed_in(tiny_dirs, tmp_path):
    from blended.models.single_file import load_single_file

    pipe = _pipe(tiny_dirs["sdxl"])
    path = write_single_file(pipe, tmp_path / "xl.safetensors", text_encoders=False)
    parts = {k: getattr(pipe, k) for k in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")}
    loaded, info = load_single_file(path, dtype=torch.float32, config=str(tiny_dirs["sdxl"]), components=parts)
    assert info.family == "sdxl" and type(loaded).__name__ == "StableDiffusionXLPipeline"
    for part in ("unet", "vae"):
        assert _same(getattr(pipe, part).state_dict(), getattr(loaded, part).state_dict()), part
    with pytest.raises(ModelLoadError, match="no text encoder"):
        load_single_file(path, dtype=torch.float32, config=str(tiny_dirs["sdxl"]))


@pytest.fixture(scope="module")
def sdxl_dir(tiny_dirs, tmp_path_factory):
    """The tiny SDXL with text encoders of different widths (16 and 48, as SDXL's 768 and 1280 differ): diffusers
    tells a file's two encoders apart by width, so the shared tiny model's two 32-wide ones would be confused."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from blended_dev.tiny import _text_encoder

    pipe = _pipe(tiny_dirs["sdxl"])
    torch.manual_seed(0)
    pipe.text_encoder = _text_encoder(CLIPTextModel, 16, "gelu")
    pipe.text_encoder_2 = _text_encoder(CLIPTextModelWithProjection, 48, "gelu", projection_dim=32)
    folder = tmp_path_factory.mktemp("sdxl") / "sdxl"
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_cli_model_file_gives_the_folders_pixels(tiny_dirs, sdxl_dir, kind, tmp_path):
    """A whole original-layout file (UNet, VAE, the family's text encoders) edits like its diffusers folder."""
    from blended.__main__ import main

    folder = sdxl_dir if kind == "sdxl" else tiny_dirs[kind]
    path = write_single_file(_pipe(folder), tmp_path / f"{kind}.safetensors")
    scene(32, 32).save(tmp_path / "src.png")
    box_mask(32, 32, (8, 8, 24, 24)).save(tmp_path / "mask.png")
    common = ["edit", "--image", str(tmp_path / "src.png"), "--mask", str(tmp_path / "mask.png"), "--prompt", "a cat",
              "--steps", "2", "--candidates", "1", "--no-rank", "--quiet"]
    assert main(common + ["--model", str(folder), "--out", str(tmp_path / "a")]) == 0
    assert main(common + ["--model", str(path), "--model-config", str(folder),
                          "--out", str(tmp_path / "b")]) == 0
    a, b = (np.asarray(__import__("PIL.Image").Image.open(tmp_path / d / "01.png")) for d in "ab")
    assert np.array_equal(a, b)
    assert json.loads((tmp_path / "b" / "result.json").read_text())["model"] == str(path)


def test_bundled_configs_are_the_real_families_and_need_no_network(tmp_path, monkeypatch):
    """The configs build real-size models (parameter counts of the published checkpoints) and the CLIP tokenizer
    from open_clip's vocabulary, offline; an inpainting folder gets a 9-channel UNet."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTokenizer

    from blended.models.single_file import config_folder

    monkeypatch.setenv("BLENDED_CACHE", str(tmp_path))
    unet_params = {"sd1": 859_520_964, "sd2": 865_910_724, "sdxl": 2_567_463_684}
    for family, params in unet_params.items():
        folder = config_folder(family, 9 if family == "sd1" else 4)
        assert json.loads((folder / "model_index.json").read_text())["unet"][1] == "UNet2DConditionModel"
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder / "unet")))
        extra = 5 * 320 * 9 if family == "sd1" else 0  # 9-channel conv_in
        assert sum(p.numel() for p in unet.parameters()) == params + extra, family
        tok = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
        assert tok("a red circle").input_ids == [49406, 320, 736, 7117, 49407]


def test_bad_files_get_one_line_and_cli_status_1(tiny_dirs, sd1_file, tmp_path, capsys):
    from blended.__main__ import main
    from blended.models import load_model

    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04not really")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(sd1_file.read_bytes()[: sd1_file.stat().st_size // 2])
    text = tmp_path / "notes.safetensors"
    text.write_text("these are my notes, not a model\n" * 20)
    vae_only = tmp_path / "vae.safetensors"
    from safetensors.torch import save_file

    save_file({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}, str(vae_only))
    cases = {pickle: "pickle", cut: "truncated", text: "not a safetensors file", vae_only: "a VAE: pass it with --vae"}
    for path, words in cases.items():
        with pytest.raises(ModelLoadError, match=words):
            load_model(str(path))
    scene(32, 32).save(tmp_path / "src.png")
    box_mask(32, 32, (8, 8, 24, 24)).save(tmp_path / "mask.png")
    for path in cases:
        capsys.readouterr()
        status = main(["edit", "--image", str(tmp_path / "src.png"), "--mask", str(tmp_path / "mask.png"),
                       "--prompt", "x", "--model", str(path), "--quiet", "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert status == 1 and err.startswith("error: ") and err.count("\n") == 1, err


def test_the_bundled_sd1_folder_loads_a_file_offline(tiny_dirs, sd1_file, tmp_path, monkeypatch):
    """The bundled model_index, tokenizer and scheduler configs as they ship, with the three weight-bearing
    configs swapped for the tiny model's sizes: from_single_file reads them all without the network."""
    import shutil

    from blended.models import load_model
    from blended.models.single_file import config_folder

    monkeypatch.setenv("BLENDED_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "sd1-tiny-sizes"
    shutil.copytree(config_folder("sd1"), folder)
    for part in ("unet", "vae", "text_encoder"):
        shutil.copy(tiny_dirs["sd1"] / part / "config.json", folder / part / "config.json")
    pipe = load_model(str(sd1_file), model_config=str(folder)).pipe
    assert type(pipe.tokenizer).__name__.startswith("CLIPTokenizer")
    assert pipe.tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.safety_checker is None
