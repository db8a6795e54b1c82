"""LoRAs: diffusers and kohya format, weights, no residue, records and batch hash, wrong architecture (issue 20)."""

import json

import numpy as np
import pytest
import torch
from conftest import box_mask, scene

from blended import Editor
from blended.errors import ModelLoadError
from blended.models import LoraSpec

EDIT = dict(num_inference_steps=2, num_candidates=1, rank=False, guidance_scale=3.0)


def make_lora(folder, out, seed: int = 1):
    """A peft LoRA (rank 4, non-zero B) on the UNet's attention projections, saved in diffusers' format."""
    from diffusers import DiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    type(pipe).save_lora_weights(str(out), unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                 safe_serialization=True)
    return out / "pytorch_lora_weights.safetensors"


def to_kohya(path, out):
    """The same LoRA with kohya / A1111 keys (`lora_unet_<module>.lora_down/up.weight`, `.alpha` = rank)."""
    from safetensors.torch import load_file, save_file

    kohya = {}
    for key, value in load_file(str(path)).items():
        module, kind = key.removeprefix("unet.").rsplit(".lora_", 1)
        base = "lora_unet_" + module.replace(".", "_")
        kohya[base + (".lora_down.weight" if kind.startswith("A") else ".lora_up.weight")] = value
        kohya[base + ".alpha"] = torch.tensor(float(value.shape[0] if kind.startswith("A") else value.shape[1]))
    save_file(kohya, str(out))
    return out


@pytest.fixture(scope="module")
def loras(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    a = make_lora(tiny_dirs["sd1"], root / "a")
    return {"a": a, "b": make_lora(tiny_dirs["sd1"], root / "b", seed=2), "kohya": to_kohya(a, root / "a_kohya.safetensors"),
            "xl": make_lora(tiny_dirs["sdxl"], root / "xl")}


def pixels(editor) -> np.ndarray:
    return np.asarray(editor.edit(scene(32, 32), box_mask(32, 32, (8, 8, 24, 24)), "a cat", **EDIT).images[0])


def lora_editor(tiny_dirs, *specs):
    return Editor.load(str(tiny_dirs["sd1"]), ranker=None, loras=list(specs))


def test_weight_zero_is_the_base_model_and_one_is_not(tiny_dirs, sd1_editor, loras):
    base = pixels(sd1_editor)
    unet_before = {k: v.clone() for k, v in sd1_editor.model.pipe.unet.state_dict().items()}
    assert np.array_equal(pixels(lora_editor(tiny_dirs, LoraSpec(str(loras["a"]), 0.0))), base)
    with_lora = pixels(lora_editor(tiny_dirs, LoraSpec(str(loras["a"]), 1.0)))
    assert not np.array_equal(with_lora, base)
    # the shared base model was never touched: its next edit is the base pixels again
    assert all(torch.equal(v, sd1_editor.model.pipe.unet.state_dict()[k]) for k, v in unet_before.items())
    assert np.array_equal(pixels(sd1_editor), base)


def test_kohya_keys_give_the_same_pixels_as_diffusers_format(tiny_dirs, loras):
    a = pixels(lora_editor(tiny_dirs, LoraSpec(str(loras["a"]), 0.8)))
    assert np.array_equal(a, pixels(lora_editor(tiny_dirs, LoraSpec(str(loras["kohya"]), 0.8))))


def test_several_loras_with_their_weights(tiny_dirs, loras):
    ed = lora_editor(tiny_dirs, f"{loras['a']}:0.5", f"{loras['b']}:0")
    assert [l.weight for l in ed.model.loras] == [0.5, 0.0]
    assert np.array_equal(pixels(ed), pixels(lora_editor(tiny_dirs, f"{loras['a']}:0.5")))
    assert not np.array_equal(pixels(lora_editor(tiny_dirs, f"{loras['a']}:0.5", f"{loras['b']}:0.7")), pixels(ed))


def test_result_json_and_batch_hash_follow_the_lora_bytes(tiny_dirs, loras, tmp_path):
    import shutil

    from blended.__main__ import main

    scene(32, 32).save(tmp_path / "src.png")
    box_mask(32, 32, (8, 8, 24, 24)).save(tmp_path / "mask.png")
    lora = tmp_path / "style.safetensors"
    shutil.copy(loras["a"], lora)
    fast = ["--steps", "2", "--candidates", "1", "--no-rank", "--quiet", "--model", str(tiny_dirs["sd1"]),
            "--lora", f"{lora}:0.5"]
    assert main(["edit", "--image", str(tmp_path / "src.png"), "--mask", str(tmp_path / "mask.png"), "--prompt",
                 "a cat", "--out", str(tmp_path / "e"), *fast]) == 0
    recorded = json.loads((tmp_path / "e" / "result.json").read_text())["loras"]
    assert [(r["file"], r["weight"]) for r in recorded] == [(str(lora), 0.5)] and len(recorded[0]["sha256"]) == 64
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"id": "j", "image": "src.png", "mask": "mask.png",
                                                      "prompt": "a cat"}) + "\n")
    batch = ["batch", str(tmp_path / "jobs.jsonl"), "--out", str(tmp_path / "b"), *fast]
    status = lambda: [json.loads(l)["status"] for l in (tmp_path / "b" / "summary.jsonl").read_text().splitlines()]
    assert main(batch) == 0 and status() == ["ok"]
    assert main(batch) == 0 and status() == ["skipped"]
    shutil.copy(loras["b"], lora)  # same path and weight, other bytes: the job is redone
    assert main(batch) == 0 and status() == ["ok"]


def test_a_lora_for_another_architecture_gets_one_line(tiny_dirs, loras, tmp_path, capsys):
    from blended.__main__ import main

    with pytest.raises(ModelLoadError, match="does not fit this model"):
        lora_editor(tiny_dirs, str(loras["xl"]))
    with pytest.raises(ModelLoadError, match="pickle"):
        lora_editor(tiny_dirs, str(tmp_path / "style.pt"))
    scene(32, 32).save(tmp_path / "src.png")
    box_mask(32, 32, (8, 8, 24, 24)).save(tmp_path / "mask.png")
    capsys.readouterr()
    assert main(["edit", "--image", str(tmp_path / "src.png"), "--mask", str(tmp_path / "mask.png"), "--prompt", "x",
                 "--model", str(tiny_dirs["sd1"]), "--lora", str(loras["xl"]), "--quiet", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: LoRA") and err.count("\n") == 1, err


def test_an_lcm_lora_brings_its_few_step_settings_and_the_result_records_them(tiny_dirs, loras, tmp_path):
    import shutil

    lcm = tmp_path / "lcm-lora-sdv1-5.safetensors"  # named as the published LCM-LoRA is
    shutil.copy(loras["a"], lcm)
    ed = lora_editor(tiny_dirs, LoraSpec(str(lcm), 1.0))
    assert (ed.defaults.scheduler, ed.defaults.num_inference_steps, ed.defaults.guidance_scale) == ("lcm", 4, 1.0)
    result = ed.edit(scene(32, 32), box_mask(32, 32, (8, 8, 24, 24)), "a cat", num_candidates=1, rank=False)
    info = result.to_json()
    assert info["recommended"]["scheduler"] == "lcm" and info["settings"]["num_inference_steps"] == 4
    # a style LoRA, or the LCM-LoRA at weight 0, leaves the model's own defaults
    assert lora_editor(tiny_dirs, LoraSpec(str(loras["a"]), 1.0)).defaults.scheduler == "ddim"
    assert lora_editor(tiny_dirs, LoraSpec(str(lcm), 0.0)).defaults.scheduler == "ddim"


def test_batch_jobs_with_their_own_loras(tiny_dirs, loras, tmp_path):
    from blended.__main__ import main

    scene(32, 32).save(tmp_path / "src.png")
    box_mask(32, 32, (8, 8, 24, 24)).save(tmp_path / "mask.png")
    shutil_copy = __import__("shutil").copy
    shutil_copy(loras["a"], tmp_path / "a.safetensors")
    job = {"image": "src.png", "mask": "mask.png", "prompt": "a cat"}
    lines = [{**job, "id": "base"}, {**job, "id": "styled", "loras": ["a.safetensors:0.5"]},
             {**job, "id": "none", "loras": []}, {**job, "id": "bad", "loras": [{"file": "missing.safetensors"}]}]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    batch = ["batch", str(tmp_path / "jobs.jsonl"), "--out", str(tmp_path / "b"), "--steps", "2", "--candidates", "1",
             "--no-rank", "--quiet", "--model", str(tiny_dirs["sd1"])]
    assert main(batch) == 1  # the job whose LoRA is missing fails alone
    rows = {json.loads(l)["id"]: json.loads(l) for l in (tmp_path / "b" / "summary.jsonl").read_text().splitlines()}
    assert [rows[i]["status"] for i in ("base", "styled", "none", "bad")] == ["ok", "ok", "ok", "error"]
    assert rows["bad"]["message"].startswith("the LoRA file does not exist")
    image = lambda i: np.asarray(__import__("PIL.Image").Image.open(tmp_path / "b" / i / "01.png"))
    assert np.array_equal(image("base"), image("none")) and not np.array_equal(image("base"), image("styled"))
    info = json.loads((tmp_path / "b" / "styled" / "result.json").read_text())
    assert [(l["file"], l["weight"]) for l in info["loras"]] == [(str(tmp_path / "a.safetensors"), 0.5)]
    assert main(batch) == 1
    rows = [json.loads(l)["status"] for l in (tmp_path / "b" / "summary.jsonl").read_text().splitlines()]
    assert rows == ["skipped", "skipped", "skipped", "error"]


def test_a_malformed_loras_key_names_its_line(tmp_path):
    from blended.batch import ManifestError, read_manifest

    (tmp_path / "jobs.jsonl").write_text(json.dumps({"image": "a.png", "mask": "m.png", "prompt": "x", "loras": "a"}))
    with pytest.raises(ManifestError, match="line 1: 'loras' must be a list"):
        read_manifest(tmp_path / "jobs.jsonl")
