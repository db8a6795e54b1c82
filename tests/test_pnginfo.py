"""Parameters inside every result PNG (issue 28): A1111's infotext that A1111's own rules read back, our record that
`read_recipe` turns into the same edit, `--from` on the CLI, and untrusted files refused with one line."""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from blended.config import EditConfig
from blended.errors import InputError
from blended.images import Region
from blended.pnginfo import MAX_CHUNK, read_recipe
from blended.result import Candidate, EditResult

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "assets" / "examples" / "scene-red-circle.png"
EXAMPLE_MASK = ROOT / "assets" / "examples" / "scene-red-circle-mask.png"


def a1111_parse(text: str) -> dict[str, str]:
    """A1111's reading of an infotext (the rules of `parse_generation_parameters` in modules/infotext_utils.py,
    written again here so the test does not trust the engine's own parser):

    1. strip the text; its last line holds the parameters only when A1111's pair pattern finds 3 or more pairs in
       it, else it is one more prompt line;
    2. every other line is stripped; the first one starting `Negative prompt:` (that prefix cut) and all after it
       belong to the negative prompt, those before to the prompt; lines are joined with line breaks, a leading
       empty line adding nothing;
    3. a pair is `key: value`: the key a word character then word characters, spaces, '-' or '/'; the value a
       double-quoted JSON string or everything up to the next comma; a quoted value is JSON-decoded;
    4. a value of the form `<W>x<H>` is split into `key-1` and `key-2`.
    """
    pattern = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
    lines = text.strip().split("\n")
    last = lines.pop()
    if len(pattern.findall(last)) < 3:
        lines.append(last)
        last = ""
    out = {"Prompt": "", "Negative prompt": ""}
    target = "Prompt"
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            target, line = "Negative prompt", line[len("Negative prompt:"):].strip()
        out[target] = line if out[target] == "" else out[target] + "\n" + line
    for key, value in pattern.findall(last):
        if value[:1] == '"' and value[-1:] == '"':
            value = json.loads(value)
        size = re.fullmatch(r"(\d+)x(\d+)", value)
        if size:
            out[f"{key}-1"], out[f"{key}-2"] = size.groups()
        else:
            out[key] = value
    return out


def fake_result(prompt="a red hat", negative="", model="demo", n=3, **settings) -> EditResult:
    """An EditResult without a model: distinct images, seeds 7, 8, 9 ranked 9, 7, 8."""
    rng = np.random.default_rng(0)
    config = EditConfig(negative_prompt=negative, num_candidates=n, seed=7, **settings)
    cands = [Candidate(Image.fromarray(rng.integers(0, 255, (30, 40, 3), np.uint8)), seed=7 + i,
                       scores={"score": 0.1 * i}) for i in range(n)]
    cands = cands[-1:] + cands[:-1]
    return EditResult(candidates=cands, prompt=prompt, config=config, model=model, timings={"total": 1.0},
                      region=Region((0, 0, 40, 30), (32, 32), True), model_info={"vae": None, "loras": []})


def test_a1111_rules_read_our_pngs_back(tmp_path):
    model = str(tmp_path / "my, model: v2.safetensors")  # a file name A1111 would have to quote
    result = fake_result(prompt="a red hat,\nknitted: wool", negative='blurry, "dark"\nlow quality', model=model,
                         scheduler="euler-a", num_inference_steps=12, guidance_scale=4.5)
    result.save(tmp_path / "out")
    for rank, seed in ((1, 9), (2, 7), (3, 8)):
        text = Image.open(tmp_path / "out" / f"{rank:02d}.png").text["parameters"]
        got = a1111_parse(text)
        assert got["Prompt"] == "a red hat,\nknitted: wool"
        assert got["Negative prompt"] == 'blurry, "dark"\nlow quality'
        assert (got["Steps"], got["Sampler"], got["CFG scale"], got["Seed"]) == ("12", "Euler a", "4.5", str(seed))
        assert (got["Size-1"], got["Size-2"]) == ("40", "30")
        assert got["Model"] == "my, model: v2"  # quoted, read back whole; no folder of this machine
        assert text.splitlines()[-1].startswith("Steps: 12, Sampler: Euler a, CFG scale: 4.5, ")
    plain = fake_result(n=1, scheduler="dpm++", num_inference_steps=20, guidance_scale=7.0)
    plain.save(tmp_path / "plain")
    text = Image.open(tmp_path / "plain" / "01.png").text["parameters"]
    assert "Negative prompt" not in text and text.splitlines()[0] == "a red hat"  # no empty negative line
    got = a1111_parse(text)
    assert (got["Prompt"], got["Negative prompt"], got["Sampler"], got["CFG scale"], got["Model"]) == \
        ("a red hat", "", "DPM++ 2M", "7", "demo")


def test_each_png_records_its_own_candidate_and_keeps_its_pixels(tmp_path):
    result = fake_result(negative="blurry", background="poisson", mask_grow=3, safety_checker=False, batch_size=2)
    result.save(tmp_path)
    info = json.loads((tmp_path / "result.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["01.png", "02.png", "03.png", "result.json"]
    for i, cand in enumerate(result.candidates):
        im = Image.open(tmp_path / f"{i + 1:02d}.png")
        assert np.array_equal(np.asarray(im), np.asarray(cand.image)), "the pixels are the candidate's"
        rec = json.loads(im.text["blended"])
        assert rec["candidate"] == info["candidates"][i] and rec["settings"]["seed"] == cand.seed
        assert {k: v for k, v in rec["settings"].items() if k != "seed"} == \
            {k: v for k, v in info["settings"].items() if k != "seed"}
        recipe = read_recipe(tmp_path / f"{i + 1:02d}.png")
        assert (recipe.source, recipe.prompt, recipe.negative_prompt, recipe.model) == \
            ("blended", "a red hat", "blurry", "demo")
        assert recipe.settings["seed"] == cand.seed and recipe.settings["background"] == "poisson"
        assert recipe.settings["mask_grow"] == 3 and recipe.settings["shrink_kernels"] == (7, 5, 3, 1)
        assert "safety_checker" not in recipe.settings and "batch_size" not in recipe.settings
        assert any("safety checker" in n for n in recipe.notes)
        assert EditConfig.from_json(recipe.settings).replace(negative_prompt=recipe.negative_prompt) == \
            result.config.replace(seed=cand.seed, safety_checker=True, batch_size=EditConfig.batch_size)


def test_a_removal_records_no_prompt_and_reads_back(tmp_path):
    fake_result(prompt="", n=1, remove=True, remove_strength=0.4).save(tmp_path)
    text = Image.open(tmp_path / "01.png").text["parameters"]
    assert a1111_parse(text)["Prompt"] == "" and a1111_parse(text)["Denoising strength"] == "0.4"
    recipe = read_recipe(tmp_path / "01.png")
    assert (recipe.prompt, recipe.settings["remove"], recipe.settings["remove_strength"]) == ("", True, 0.4)
    with pytest.raises(InputError, match="no prompt"):  # an edit (not a removal) needs its prompt
        read_recipe(png_with({"blended": json.dumps({"prompt": " ", "settings": {"seed": 1}})}))


def test_text_beyond_latin1_goes_in_itxt_and_reads_back(tmp_path):
    fake_result(prompt="un chapeau rouge — 赤い帽子", negative="flou", n=1).save(tmp_path)
    raw = (tmp_path / "01.png").read_bytes()
    assert b"iTXt" in raw
    recipe = read_recipe(raw)  # bytes as well as paths
    assert (recipe.prompt, recipe.negative_prompt) == ("un chapeau rouge — 赤い帽子", "flou")
    assert a1111_parse(Image.open(tmp_path / "01.png").text["parameters"])["Prompt"] == "un chapeau rouge — 赤い帽子"


def png_with(chunks: dict[str, str], size=(8, 8)) -> bytes:
    info = PngInfo()
    for key, text in chunks.items():
        info.add_text(key, text)
    buf = io.BytesIO()
    Image.new("RGB", size, "red").save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


A1111_TEXT = """masterpiece, a cat
  in a hat
Negative prompt: ugly, (blurry:1.2)
Steps: 28, Sampler: {sampler}, Schedule type: Karras, CFG scale: 6, Seed: 965400086, Size: 512x768, Model hash: 45dee52b, Model: "dream, v8", Denoising strength: 0.7"""


@pytest.mark.parametrize("sampler, scheduler", [("DDIM", "ddim"), ("DPM++ 2M", "dpm++"), ("Euler", "euler"),
                                                ("Euler a", "euler-a"), ("LCM", "lcm"), ("TCD", "tcd"),
                                                ("Heun", None)])
def test_an_a1111_png_fills_what_maps(sampler, scheduler):
    recipe = read_recipe(png_with({"parameters": A1111_TEXT.format(sampler=sampler)}))
    assert (recipe.source, recipe.model) == ("a1111", None)
    assert (recipe.prompt, recipe.negative_prompt) == ("masterpiece, a cat\nin a hat", "ugly, (blurry:1.2)")
    want = {"num_inference_steps": 28, "guidance_scale": 6.0, "seed": 965400086}
    if scheduler:
        want["scheduler"] = scheduler
    assert recipe.settings == want
    assert any("dream, v8" in n for n in recipe.notes)  # the checkpoint is named, not loaded
    assert any(n.startswith("not used:") and "Schedule type" in n and "Size" in n for n in recipe.notes)
    assert (scheduler is None) == any("Heun" in n for n in recipe.notes)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _with_chunk(png: bytes, kind: bytes, body: bytes) -> bytes:
    return png[:33] + _chunk(kind, body) + png[33:]  # after IHDR (8 signature + 25)


def _bad_files() -> dict[str, bytes]:
    good = png_with({"blended": json.dumps({"prompt": "a cat", "settings": {"seed": 1}})})
    damaged = bytearray(good)
    damaged[good.index(b"a cat")] ^= 1  # the chunk's checksum no longer fits
    return {
        "not a PNG": b"GIF89a" + bytes(100),
        "garbage": bytes(range(256)) * 4,
        "cut off": good[: len(good) // 2],
        "damaged": bytes(damaged),
        "no parameters": png_with({}),
        "record not JSON": png_with({"blended": "{not json"}),
        "record a list": png_with({"blended": "[1, 2]"}),
        "prompt a number": png_with({"blended": json.dumps({"prompt": 5, "settings": {}})}),
        "model a list": png_with({"blended": json.dumps({"prompt": "a", "model": ["x"], "settings": {}})}),
        "settings a string": png_with({"blended": json.dumps({"prompt": "a", "settings": "fast"})}),
        "steps a string": png_with({"blended": json.dumps({"prompt": "a", "settings": {"num_inference_steps": "9"}})}),
        "unknown setting": png_with({"blended": json.dumps({"prompt": "a", "settings": {"evil\nname": 1}})}),
        "out of range": png_with({"blended": json.dumps({"prompt": "a", "settings": {"guidance_scale": 1e9}})}),
        "nested too deep": png_with({"blended": "[" * 50_000}),
        "chunk too large": png_with({"blended": json.dumps({"prompt": "a" * (MAX_CHUNK + 10), "settings": {}})}),
        "zip bomb": _with_chunk(png_with({}), b"zTXt", b"blended\0\0" + zlib.compress(b" " * (8 * MAX_CHUNK))),
        "a1111 steps words": png_with({"parameters": "a cat\nSteps: many, Sampler: DDIM, CFG scale: 7, Seed: 1"}),
        "a1111 seed negative": png_with({"parameters": "a cat\nSteps: 20, Sampler: DDIM, CFG scale: 7, Seed: -1"}),
        "a1111 no prompt": png_with({"parameters": "Steps: 20, Sampler: DDIM, CFG scale: 7, Seed: 1"}),
    }


@pytest.mark.parametrize("name", list(_bad_files()))
def test_untrusted_files_are_refused_with_one_line(name, tmp_path):
    data = _bad_files()[name]
    path = tmp_path / "x.png"
    path.write_bytes(data)
    with pytest.raises(InputError) as e:
        read_recipe(path)
    message = str(e.value)
    assert "\n" not in message and 0 < len(message) <= 400, message
    assert path.read_bytes() == data  # nothing changed


def test_large_files_are_refused_before_they_are_read(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    path.write_bytes(png_with({"blended": json.dumps({"prompt": "a", "settings": {}})}, size=(64, 64)))
    assert read_recipe(path).prompt == "a"
    opened = []

    def no_open(*args, **kwargs):
        opened.append(args)
        raise AssertionError("opened")

    monkeypatch.setattr("builtins.open", no_open)
    with pytest.raises(InputError, match="MiB"):
        read_recipe(path, max_bytes=100)
    monkeypatch.undo()
    assert not opened
    with pytest.raises(InputError, match="no such file"):
        read_recipe(tmp_path / "missing.png")


# -- the command line ------------------------------------------------------------------------------------------

def test_cli_from_repeats_a_candidate_pixel_for_pixel(tmp_path, capsys):
    from blended.__main__ import main

    first = tmp_path / "first"
    assert main(["edit", "--image", str(EXAMPLE), "--mask", str(EXAMPLE_MASK), "--prompt", "a green circle",
                 "--negative-prompt", "red, dark", "--model", "demo", "--candidates", "3", "--steps", "6",
                 "--seed", "11", "--out", str(first), "--quiet"]) == 0
    info = json.loads((first / "result.json").read_text())
    again = tmp_path / "again"
    assert main(["edit", "--image", str(EXAMPLE), "--mask", str(EXAMPLE_MASK), "--from", str(first / "02.png"),
                 "--out", str(again), "--quiet"]) == 0  # no --prompt, no --model: both from the file
    repeat = json.loads((again / "result.json").read_text())
    assert sorted(p.name for p in again.iterdir()) == ["01.png", "result.json"]
    assert (repeat["prompt"], repeat["model"], repeat["settings"]["negative_prompt"]) == ("a green circle", "demo",
                                                                                          "red, dark")
    assert repeat["candidates"][0]["seed"] == info["candidates"][1]["seed"]
    assert repeat["settings"]["num_inference_steps"] == 6 and repeat["settings"]["num_candidates"] == 1
    a = np.asarray(Image.open(first / "02.png"))
    b = np.asarray(Image.open(again / "01.png"))
    assert np.array_equal(a, b), f"max difference {np.abs(a.astype(int) - b).max()}"
    other = tmp_path / "other"  # a flag wins over the file
    assert main(["edit", "--image", str(EXAMPLE), "--mask", str(EXAMPLE_MASK), "--from", str(first / "02.png"),
                 "--seed", "99", "--prompt", "a blue square", "--out", str(other), "--quiet"]) == 0
    other_info = json.loads((other / "result.json").read_text())
    assert (other_info["candidates"][0]["seed"], other_info["prompt"]) == (99, "a blue square")
    assert other_info["settings"]["negative_prompt"] == "red, dark"


@pytest.mark.parametrize("name", ["not a PNG", "out of range", "no parameters"])
def test_cli_bad_from_file_exits_2_with_one_line(name, tmp_path, capsys):
    from blended.__main__ import main

    bad = tmp_path / "bad.png"
    bad.write_bytes(_bad_files()[name])
    code = main(["edit", "--image", str(EXAMPLE), "--mask", str(EXAMPLE_MASK), "--from", str(bad), "--model",
                 "/nonexistent-model-never-loaded", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert not (tmp_path / "out").exists()


def test_cli_needs_a_prompt_or_a_file(tmp_path, capsys):
    from blended.__main__ import main

    code = main(["edit", "--image", str(EXAMPLE), "--mask", str(EXAMPLE_MASK), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--prompt" in err[0] and "--from" in err[0]
