"""Issue 31: the tiny decoder (`decode`), crop decode, the encode cache and the bf16 path, on the tiny test models."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from conftest import box_mask, scene
from PIL import Image
from safetensors.torch import save_file

from blended import EditConfig, Editor
from blended.codec import Decoding, EncodeCache, crop_box, decode_box, nonzero_box, receptive_field, tiny_decoding
from blended.errors import ModelLoadError


def make_tiny(latent_channels: int = 4, levels: int = 3, seed: int = 0):
    """A random AutoencoderTiny decoding `levels - 1` doublings (x4 for the test models' VAE)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    return AutoencoderTiny(latent_channels=latent_channels, encoder_block_out_channels=(8,) * levels,
                           decoder_block_out_channels=(8,) * levels, num_encoder_blocks=(1,) * levels,
                           num_decoder_blocks=(1,) * levels).eval()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "tiny_sd"
    make_tiny().save_pretrained(folder)
    return folder


@pytest.fixture
def editor(tiny_dirs):
    return Editor.load(str(tiny_dirs["sd1"]), ranker=None)


def edit(editor, image=None, mask=None, **kw):
    image = image if image is not None else scene(32, 32, seed=1)
    mask = mask if mask is not None else box_mask(32, 32, (8, 8, 20, 20))
    return editor.edit(image, mask, "a red ball", num_inference_steps=4, num_candidates=2, **kw)


def outside_kept(result, image, mask, feather=8):
    """Every pixel farther than the seam band from the mask is the upload's, bit for bit."""
    from scipy.ndimage import binary_dilation

    band = binary_dilation(np.asarray(mask) > 127, np.ones((3, 3), bool), iterations=feather + 1)
    src = np.asarray(image)
    return all((np.asarray(c.image)[~band] == src[~band]).all() for c in result.candidates)


# -- loading -------------------------------------------------------------------------------------------------------

def test_tiny_decoder_from_folder_decodes_the_candidates(editor, tiny_folder):
    image, mask = scene(32, 32, seed=1), box_mask(32, 32, (8, 8, 20, 20))
    full = edit(editor, image, mask)
    tiny = edit(editor, image, mask, decode=str(tiny_folder))
    assert list(editor.model.tiny_decoders) == [str(tiny_folder)]
    assert outside_kept(tiny, image, mask)
    inside = np.asarray(mask) > 127
    diff = [np.abs(np.asarray(a.image, np.int16) - np.asarray(b.image, np.int16))[inside].mean()
            for a, b in zip(full.candidates, tiny.candidates)]
    assert min(diff) > 1  # a random tiny decoder draws other pixels than the full one: it was used
    assert tiny.config.decode == str(tiny_folder) and tiny.notes == []


def original_layout(state: dict) -> dict:
    """diffusers' `decoder.layers.N.*` keys as madebyollin's taesd_decoder file has them (`N+1.*`: its layer 0 is
    the clamp)."""
    return {f"{int(k.split('.')[2]) + 1}.{'.'.join(k.split('.')[3:])}": v for k, v in state.items()}


def test_tiny_decoder_from_a_file_in_both_key_layouts(editor, tmp_path):
    tiny = make_tiny(seed=3)
    state = {k: v.contiguous() for k, v in tiny.state_dict().items() if k.startswith("decoder.")}
    save_file(state, str(tmp_path / "tiny_decoder.safetensors"))
    save_file(original_layout(state), str(tmp_path / "taesd_decoder.safetensors"))
    latents = torch.randn(1, 4, 8, 8)
    want = tiny.decode(latents).sample
    image, mask = scene(32, 32, seed=1), box_mask(32, 32, (8, 8, 20, 20))
    results = []
    for name in ("tiny_decoder.safetensors", "taesd_decoder.safetensors"):
        path = str(tmp_path / name)
        torch.testing.assert_close(editor.model.tiny_decoder(path).decode(latents).sample, want)
        results.append(edit(editor, image, mask, decode=path))
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image))
               for a, b in zip(*(r.candidates for r in results)))


def test_taesd_shaped_file_loads_without_a_config(tmp_path):
    """A TAESD-shaped decoder as one file (default AutoencoderTiny shapes, x8) on an x8 model."""
    from diffusers import AutoencoderTiny

    from blended.models.tiny import load_tiny_decoder

    torch.manual_seed(0)
    tiny = AutoencoderTiny().eval()
    state = {k: v.contiguous() for k, v in tiny.state_dict().items() if k.startswith("decoder.")}
    path = tmp_path / "taesd_decoder.safetensors"
    save_file(original_layout(state), str(path))
    model = _FakeModel(vae_scale_factor=8)
    got = load_tiny_decoder(str(path), model)
    latents = torch.randn(1, 4, 4, 4)
    torch.testing.assert_close(got.decode(latents).sample, tiny.decode(latents).sample)


class _FakeModel:
    """What `load_tiny_decoder` reads off a LoadedModel."""

    def __init__(self, vae_scale_factor=4, latent_channels=4, family="sd"):
        self.vae_scale_factor, self.latent_channels, self.family = vae_scale_factor, latent_channels, family
        self.source, self.device, self.dtype = "/nonexistent", torch.device("cpu"), torch.float32


def refusals(tmp_path, tiny_dirs):
    """(what, path, the message's pattern) for each thing that is not a fitting tiny decoder."""
    from diffusers import AutoencoderKL

    out = []
    full_vae = AutoencoderKL.from_pretrained(tiny_dirs["sd1"] / "vae")
    full_vae.save_pretrained(tmp_path / "full_vae")
    out.append(("a full VAE folder", tmp_path / "full_vae", "AutoencoderKL, not a tiny decoder"))
    save_file({k: v.contiguous() for k, v in full_vae.state_dict().items()}, str(tmp_path / "vae.safetensors"))
    out.append(("a full VAE file", tmp_path / "vae.safetensors", "is a full VAE"))
    torch.save(make_tiny().state_dict(), tmp_path / "tiny.pt")
    out.append(("a pickle", tmp_path / "tiny.pt", "not a .safetensors file"))
    pickled = tmp_path / "pickled_folder"
    make_tiny().save_pretrained(pickled, safe_serialization=False)
    out.append(("a folder of pickled weights", pickled, "pickled weights are never loaded"))
    make_tiny().save_pretrained(tmp_path / "wrong_keys")
    w = tmp_path / "wrong_keys" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    state = load_file(str(w))
    state["decoder.layers.99.weight"] = torch.zeros(1)
    save_file(state, str(w))
    out.append(("wrong keys", tmp_path / "wrong_keys", "unexpected decoder.layers.99.weight"))
    make_tiny(latent_channels=16).save_pretrained(tmp_path / "sixteen")
    out.append(("other latent channels", tmp_path / "sixteen", "reads 16 latent channels; the model's VAE has 4"))
    make_tiny(levels=4).save_pretrained(tmp_path / "x8")
    out.append(("another upsampling", tmp_path / "x8", "upsamples 8x; the model's VAE decodes 4x"))
    make_tiny().save_pretrained(tmp_path / "taesdxl")
    out.append(("SDXL's on an SD model", tmp_path / "taesdxl", "for SDXL; this model is SD 1.x/2.x"))
    tagged = tmp_path / "tagged.safetensors"
    save_file({k: v.contiguous() for k, v in make_tiny().state_dict().items()}, str(tagged),
              metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base/taesd"})
    out.append(("SDXL's by its modelspec", tagged, "for SDXL"))
    (tmp_path / "notes.txt").write_text("hello")
    out.append(("a text file", tmp_path / "notes.txt", "not a .safetensors file"))
    return out


def test_each_refusal_is_one_line_keeps_nothing_and_the_next_edit_works(editor, tiny_dirs, tmp_path, tiny_folder):
    for what, path, pattern in refusals(tmp_path, tiny_dirs):
        with pytest.raises(ModelLoadError) as e:
            edit(editor, decode=str(path))
        message = str(e.value)
        assert pattern in message and "\n" not in message, (what, message)
        assert str(path) not in editor.model.tiny_decoders, what
        assert edit(editor, decode=str(tiny_folder)).candidates  # nothing half-loaded: the next edit works
    with pytest.raises(ModelLoadError, match="no file or folder"):
        edit(editor, decode=str(tmp_path / "missing"))


def test_tiny_without_one_decodes_full_and_says_so(editor):
    """"tiny" on a model with no vae_tiny/ and no hub: the full decoder, a note, the same pixels as "full"."""
    full = edit(editor)
    tiny = edit(editor, decode="tiny")
    assert any("decoded with the full decoder" in n for n in tiny.notes)
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(full.candidates, tiny.candidates))


def test_preserve_faces_and_text_keeps_the_full_decoder(editor, tiny_folder):
    """Decoder fine-tuning needs the full decoder: with decode tiny it decodes with the full one, and says so."""
    settings = dict(background="decoder", decoder_steps=2)
    full = edit(editor, **settings)
    tiny = edit(editor, decode=str(tiny_folder), **settings)
    assert any("not used: background 'decoder'" in n for n in tiny.notes)
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(full.candidates, tiny.candidates))


def test_previews_use_the_tiny_decoder(editor, tiny_folder):
    seen = []
    edit(editor, decode=str(tiny_folder), preview=lambda done, total, images: seen.append(images))
    assert seen and all(im.size == (32, 32) for im in seen[0])
    linear = []
    edit(editor, preview=lambda done, total, images: linear.append(images))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(seen[0], linear[0]))


# -- crop decode ---------------------------------------------------------------------------------------------------

def test_receptive_field_is_finite_for_tiny_and_global_for_the_full_decoder(editor):
    assert receptive_field(editor.model.pipe.vae.decoder) is None  # GroupNorm: the whole frame
    assert 0 < receptive_field(make_tiny().decoder) < 16


@torch.no_grad()
def test_crop_decode_matches_the_whole_decode_inside_the_box():
    tiny = tiny_decoding(make_tiny(seed=5))
    latents = torch.randn(2, 4, 40, 48) * 2
    fill = torch.zeros(1, 3, 160, 192)
    whole = tiny.decode(latents)
    for box in [(10, 12, 20, 25), (0, 0, 6, 9), (40, 30, 48, 40)]:
        got = decode_box(tiny, latents, box, fill, 4)
        l, t, r, b = (v * 4 for v in box)
        assert (got[..., t:b, l:r] - whole[..., t:b, l:r]).abs().max() <= 1 / 255  # [-1, 1]: half a level
        assert (got[..., :t, :] == 0).all()  # outside the box: the fill
    smaller = Decoding("tiny", tiny.decode, 0)  # no field at all shows at the box's edges: the test can fail
    got = decode_box(smaller, latents, (10, 12, 20, 25), fill, 4)
    assert (got[..., 48:100, 40:80] - whole[..., 48:100, 40:80]).abs().max() > 1 / 255


def test_crop_box_covers_the_weights_and_the_resize():
    weights = np.zeros((100, 120), np.float32)
    weights[30:50, 40:70] = 1
    box = nonzero_box(weights)
    assert box == (40, 30, 70, 50)
    l, t, r, b = crop_box(box, (240, 200), (120, 100), 8, (30, 25))  # work 2x the region
    assert l * 8 <= 40 * 2 - 6 and r * 8 >= 70 * 2 + 6 and t * 8 <= 30 * 2 - 6 and b * 8 >= 50 * 2 + 6
    assert nonzero_box(np.zeros((4, 4))) is None


def test_an_edit_with_crop_decode_gives_the_whole_decode_pixels(editor, tiny_folder, monkeypatch):
    import blended.editor as engine

    image, mask = scene(256, 256, seed=2), box_mask(256, 256, (8, 8, 48, 40))
    calls = []
    real = engine.decode_box
    monkeypatch.setattr(engine, "decode_box", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    kw = dict(decode=str(tiny_folder), resolution=256)
    cropped = edit(editor, image, mask, **kw)
    assert calls and (calls[0][2] - calls[0][0]) * (calls[0][3] - calls[0][1]) < 64 * 64 / 4  # a quarter or less
    import blended.codec as codec

    monkeypatch.setattr(codec, "nonzero_box", lambda weights: None)  # no box: the whole frame is decoded
    whole = edit(editor, image, mask, **kw)
    assert len(calls) == 1
    for a, b in zip(cropped.candidates, whole.candidates):
        assert np.abs(np.asarray(a.image, np.int16) - np.asarray(b.image, np.int16)).max() <= 1


# -- the encode cache ----------------------------------------------------------------------------------------------

def test_a_second_edit_of_the_same_pixels_hits_and_gives_the_same_pixels(editor):
    image, mask = scene(32, 32, seed=4), box_mask(32, 32, (8, 8, 20, 20))
    first = edit(editor, image, mask)
    second = edit(editor, image, mask)
    assert first.timings["encode_cached"] == 0 and second.timings["encode_cached"] == 1
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image))
               for a, b in zip(first.candidates, second.candidates))
    other_prompt = editor.edit(image, mask, "a blue cube", num_inference_steps=4, num_candidates=1)
    assert other_prompt.timings["encode_cached"] == 1


def test_one_changed_pixel_or_another_region_is_a_miss(editor):
    image, mask = scene(32, 32, seed=6), box_mask(32, 32, (8, 8, 20, 20))
    edit(editor, image, mask)
    changed = np.asarray(image).copy()
    changed[30, 2, 1] ^= 1
    assert edit(editor, Image.fromarray(changed), mask).timings["encode_cached"] == 0
    big = scene(200, 100, seed=6)  # a large image is cropped to the mask's box: another mask, another region
    edit(editor, big, box_mask(200, 100, (8, 8, 30, 30)))
    assert edit(editor, big, box_mask(200, 100, (150, 50, 180, 80))).timings["encode_cached"] == 0
    assert edit(editor, big, box_mask(200, 100, (150, 50, 180, 80))).timings["encode_cached"] == 1


def test_the_cache_is_bounded_and_keys_the_vae():
    cache, calls = EncodeCache(entries=2), []

    def encode(x):
        calls.append(1)
        return x.mean(1, keepdim=True)

    xs = [torch.full((1, 3, 4, 4), float(i)) for i in range(3)]
    for x in xs:
        cache.encode(encode, x, "vae")
    assert len(cache) == 2 and len(calls) == 3
    assert cache.encode(encode, xs[0], "vae")[1] is False  # the oldest was dropped
    assert cache.encode(encode, xs[2], "other vae")[1] is False
    z, hit = cache.encode(encode, xs[2], "other vae")
    z += 100  # the caller's copy: the table is not changed
    assert hit and cache.encode(encode, xs[2], "other vae")[0].max() == 2


def test_concurrent_edits_share_the_cache_safely(editor):
    image, mask = scene(32, 32, seed=8), box_mask(32, 32, (4, 4, 24, 24))
    want = {p: editor.edit(image, mask, p, num_inference_steps=3, num_candidates=1).candidates[0].image
            for p in ("a red ball", "a green cube", "a blue star")}
    editor.model.encodes.clear()
    got, errors = {}, []

    def run(prompt):
        try:
            got[prompt] = editor.edit(image, mask, prompt, num_inference_steps=3, num_candidates=1).candidates[0].image
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(p,)) for p in want for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(np.array_equal(np.asarray(got[p]), np.asarray(want[p])) for p in want)
    assert len(editor.model.encodes) <= editor.model.encodes.entries


def test_nine_channel_models_cache_the_masked_image_too(tmp_path):
    from blended_dev.tiny import build_pipeline

    folder = build_pipeline("sd1", tmp_path / "sd1")
    config = json.loads((folder / "unet" / "config.json").read_text())
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**config, "in_channels": 9})
    unet.save_pretrained(folder / "unet")
    ed = Editor.load(str(folder), ranker=None)
    assert ed.model.is_inpainting
    image, mask = scene(32, 32, seed=9), box_mask(32, 32, (8, 8, 20, 20))
    assert edit(ed, image, mask).timings["encode_cached"] == 0
    again = edit(ed, image, mask)
    assert again.timings["encode_cached"] == 2  # the source and the masked source
    assert edit(ed, image, box_mask(32, 32, (10, 8, 20, 20))).timings["encode_cached"] == 1  # another hole


# -- bf16 ----------------------------------------------------------------------------------------------------------

def test_the_bf16_path_edits_and_keeps_the_photo(tiny_dirs, tiny_folder):
    image, mask = scene(32, 32, seed=1), box_mask(32, 32, (8, 8, 20, 20))
    fp32 = edit(Editor.load(str(tiny_dirs["sd1"]), ranker=None), image, mask)
    bf16_editor = Editor.load(str(tiny_dirs["sd1"]), ranker=None, dtype="bf16")
    assert bf16_editor.model.pipe.unet.dtype == torch.bfloat16
    for decode in ("full", str(tiny_folder)):
        result = edit(bf16_editor, image, mask, decode=decode)
        assert outside_kept(result, image, mask)
    bf16 = edit(bf16_editor, image, mask)
    inside = np.asarray(mask) > 127
    for a, b in zip(fp32.candidates, bf16.candidates):  # the same edit, rounded differently
        assert np.abs(np.asarray(a.image, np.int16) - np.asarray(b.image, np.int16))[inside].mean() < 12


def test_decode_setting_is_checked():
    with pytest.raises(ValueError, match="decode must be"):
        EditConfig(decode=" ").validate()
    assert EditConfig.from_json({"decode": "tiny"}).decode == "tiny"
