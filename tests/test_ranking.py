"""CLIP ranking: the views, the scores, loading (lazy, once, failures as notes) and the Editor's ordering."""

import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import box_mask, scene

import open_clip
from blended import Editor, ModelLoadError
from blended.ranking import (DEMO_RANKER, WEIGHTS, Ranker, crop_box, crop_view, letterbox, masked_view,
                             ranker_for)

PROMPT = "a red circle"
TINY_CLIP = {
    "model_cfg": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16,
                       "mlp_ratio": 2.0},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                     "mlp_ratio": 2.0},
    },
    "preprocess_cfg": {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                       "resize_mode": "shortest"},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A seeded tiny open_clip model, saved the way tools/train_demo.py saves the demo ranker; (model, folder)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP["model_cfg"]).eval()
    folder = tmp_path_factory.mktemp("tiny_ranker")
    (folder / "open_clip_config.json").write_text(json.dumps(TINY_CLIP))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return model, folder


@pytest.fixture(scope="module")
def ranker(tiny_clip):
    return Ranker(str(tiny_clip[1]), None, device="cpu")


def _reference(model, images, prompt):
    """Cosines computed without the Ranker: open_clip's own transform built from the config."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    pp = image_transform_v2(PreprocessCfg(**{k: v for k, v in TINY_CLIP["preprocess_cfg"].items()}), is_train=False)
    tok = open_clip.SimpleTokenizer(context_length=16)
    with torch.no_grad():
        t = model.encode_text(tok([prompt]), normalize=True)[0]
        x = torch.stack([pp(im) for im in images])
        return (model.encode_image(x, normalize=True) @ t).numpy()


def _noise_images(n, size=(40, 40), seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


# -- views ------------------------------------------------------------------------------------------

def test_masked_view_is_image_inside_and_fill_outside():
    image = scene(48, 32, seed=1)
    mask = np.zeros((32, 48), bool)
    mask[5:20, 10:30] = True
    mask[25, 40] = True
    out = np.asarray(masked_view(image, mask, fill=(1, 2, 3)))
    src = np.asarray(image)
    assert out.shape == src.shape
    np.testing.assert_array_equal(out[mask], src[mask])
    assert (out[~mask] == [1, 2, 3]).all()
    # a PIL mask is read the same way (white = edited), the default fill is mid grey
    out2 = np.asarray(masked_view(image, Image.fromarray(mask.astype(np.uint8) * 255)))
    np.testing.assert_array_equal(out2[mask], src[mask])
    assert (out2[~mask] == 128).all()
    with pytest.raises(ValueError, match="same size"):
        masked_view(image, mask[:, :40])


def test_crop_box_square_with_margin_and_clamped():
    mask = np.zeros((100, 200), bool)
    mask[40:60, 90:110] = True  # 20x20 box -> margin ceil(0.25 * 20) = 5 each side -> 30, below the 32 minimum
    l, t, r, b = crop_box(mask)
    assert (r - l, b - t) == (32, 32) and l <= 90 and r >= 110 and t <= 40 and b >= 60
    mask[:] = False
    mask[40:80, 100:140] = True  # 40x40 -> 40 + 2 * 10 = 60, centred on the box
    assert crop_box(mask) == (90, 30, 150, 90)
    mask[:] = False
    mask[0:10, 190:200] = True  # corner: the square is shifted inside the image, still contains the box
    assert crop_box(mask, min_side=0) == (184, 0, 200, 16)  # 10 + 2 * ceil(2.5)
    mask[:] = False
    mask[10:90, 20:180] = True  # 160 wide -> side 240: clamped to the image, no longer square
    assert crop_box(mask) == (0, 0, 200, 100)
    assert crop_box(np.zeros((100, 200), bool)) == (0, 0, 200, 100)  # empty mask: the whole image


def test_crop_view_pixels_are_the_box():
    image = scene(96, 64, seed=2)
    mask = np.asarray(box_mask(96, 64, (60, 10, 80, 30))) > 0
    box = crop_box(mask)
    view = crop_view(image, mask)
    assert view.size == (box[2] - box[0], box[3] - box[1]) == (32, 32)
    np.testing.assert_array_equal(np.asarray(view), np.asarray(image)[box[1]:box[3], box[0]:box[2]])


def test_letterbox_pads_to_square_centred():
    image = scene(40, 20)
    out = np.asarray(letterbox(image, (9, 9, 9)))
    assert out.shape == (40, 40, 3)
    np.testing.assert_array_equal(out[10:30], np.asarray(image))
    assert (out[:10] == 9).all() and (out[30:] == 9).all()


# -- loading ----------------------------------------------------------------------------------------

def test_loads_folder_weights_and_preprocessing(tiny_clip, ranker):
    model, _ = tiny_clip
    assert ranker._loaded is None  # lazy: nothing loaded by the constructor
    assert ranker.fill == (128, 128, 128) and ranker.image_size == 32  # from the config's preprocess_cfg
    tok = open_clip.SimpleTokenizer(context_length=16)
    with torch.no_grad():
        expected = model.encode_text(tok([PROMPT]), normalize=True)[0]
    torch.testing.assert_close(ranker.embed_text(PROMPT), expected)  # the saved weights, not a fresh init
    assert ranker.embed_text(PROMPT) is ranker.embed_text(PROMPT)  # cached per prompt


def test_config_json_plus_weights_file_matches_folder(tiny_clip, ranker, tmp_path):
    _, folder = tiny_clip
    cfg = tmp_path / "my_clip.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    custom = Ranker(str(cfg), str(folder / "open_clip_model.safetensors"), device="cpu")
    images = _noise_images(2)
    torch.testing.assert_close(custom.embed_images(images), ranker.embed_images(images))
    assert custom.fill == (128, 128, 128)
    bare = tmp_path / "bare.json"  # a bare model config (no preprocess_cfg): OpenAI's normalisation
    bare.write_text(json.dumps(TINY_CLIP["model_cfg"]))
    assert Ranker(str(bare), str(folder / "open_clip_model.safetensors")).fill == (123, 117, 104)


def test_loaded_once_under_concurrent_calls(tiny_clip, monkeypatch):
    calls = []
    real = open_clip.create_model_from_pretrained

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(open_clip, "create_model_from_pretrained", counting)
    fresh = Ranker(str(tiny_clip[1]), None, device="cpu")
    image, mask = scene(48, 32), np.asarray(box_mask(48, 32, (8, 8, 24, 24))) > 0
    results = []
    threads = [threading.Thread(target=lambda: results.append(fresh.score([image, image], mask, PROMPT)))
               for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(calls) == 1 and len(results) == 4
    assert all(r == results[0] for r in results)


def test_offline_default_ranker_fails_with_one_line(tmp_path):
    r = Ranker(cache_dir=str(tmp_path))  # empty cache, HF_HUB_OFFLINE=1 (conftest)
    with pytest.raises(ModelLoadError) as e:
        r.score([scene()], np.ones((32, 48), bool), PROMPT)
    assert str(e.value) == "CLIP ranker ViT-B-16/openai could not be loaded: not cached and the hub cannot be reached"
    with pytest.raises(ModelLoadError) as again:  # remembered, not retried at once
        r.load()
    assert again.value is e.value


def test_bad_sources_name_the_problem(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        Ranker(str(tmp_path / "missing"), None).load()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no open_clip_config.json"):
        Ranker(str(tmp_path / "empty"), None).load()
    (tmp_path / "empty" / "open_clip_config.json").write_text(json.dumps(TINY_CLIP))
    with pytest.raises(ModelLoadError, match="no weights file"):
        Ranker(str(tmp_path / "empty"), None).load()
    (tmp_path / "c.json").write_text(json.dumps(TINY_CLIP))
    with pytest.raises(ModelLoadError, match="needs its weights file"):
        Ranker(str(tmp_path / "c.json"), None).load()


def test_ranker_for_picks_demo_sibling_or_default(tmp_path):
    demo = ranker_for(str(DEMO_RANKER.parent / "demo"), device="cpu")
    assert demo.model_name == str(DEMO_RANKER) and demo.pretrained is None
    (tmp_path / "mine").mkdir()
    default = ranker_for(str(tmp_path / "mine"), device="cpu")
    assert default.name == "ViT-B-16/openai" and default._loaded is None  # lazy, nothing downloaded
    (tmp_path / "mine_ranker").mkdir()
    (tmp_path / "mine_ranker" / "open_clip_config.json").write_text(json.dumps(TINY_CLIP))
    assert ranker_for(str(tmp_path / "mine")).model_name == str(tmp_path / "mine_ranker")
    assert ranker_for("org/some-model").name == "ViT-B-16/openai"


# -- scores -----------------------------------------------------------------------------------------

def test_scores_are_clip_cosines_of_the_views(tiny_clip, ranker):
    model, _ = tiny_clip
    images = _noise_images(3, size=(48, 32), seed=3)
    mask = np.asarray(box_mask(48, 32, (30, 4, 44, 20))) > 0
    scores = ranker.score(images, mask, PROMPT)
    assert [set(s) for s in scores] == [{"local", "crop", "global", "score"}] * 3
    grey = (128, 128, 128)
    local = _reference(model, [letterbox(masked_view(im, mask, grey), grey) for im in images], PROMPT)
    crop = _reference(model, [letterbox(crop_view(im, mask), grey) for im in images], PROMPT)
    whole = _reference(model, [letterbox(im, grey) for im in images], PROMPT)
    for i, s in enumerate(scores):
        np.testing.assert_allclose([s["local"], s["crop"], s["global"]], [local[i], crop[i], whole[i]], atol=1e-5)
        assert s["score"] == pytest.approx(sum(WEIGHTS[k] * s[k] for k in WEIGHTS))
    assert ranker.score([], mask, PROMPT) == []


def test_candidate_matching_the_prompt_ranks_first(tiny_clip, ranker):
    model, _ = tiny_clip
    pool = _noise_images(16, seed=4)
    sims = _reference(model, pool, PROMPT)  # the prompt's best match in the text-image space, found independently
    picks = [*np.argsort(sims)[:2], int(sims.argmax()), np.argsort(sims)[2]]  # the best match third
    candidates = [pool[i] for i in picks]
    full = np.ones((40, 40), bool)  # the whole image is edited: all three views show the candidate itself
    scores = ranker.score(candidates, full, PROMPT)
    order = sorted(range(4), key=lambda i: -scores[i]["score"])
    assert order[0] == 2 and order == sorted(range(4), key=lambda i: -sims[picks[i]])


# -- through the Editor -----------------------------------------------------------------------------

def test_editor_sorts_candidates_by_score(sd1_editor, ranker):
    editor = Editor(sd1_editor.model, ranker=ranker)
    image, mask = scene(48, 32, seed=5), box_mask(48, 32, (8, 4, 40, 28))
    result = editor.edit(image, mask, PROMPT, num_candidates=4, num_inference_steps=2, guidance_scale=1.0)
    scores = [c.score for c in result.candidates]
    assert None not in scores and scores == sorted(scores, reverse=True)
    assert len({c.seed for c in result.candidates}) == 4 and result.notes == []
    data = result.to_json()
    assert all(set(c["scores"]) == {"local", "crop", "global", "score"} for c in data["candidates"])
    json.dumps(data)  # plain floats
    # the stored scores are the ranker's for those very images
    again = ranker.score(result.images, np.asarray(mask) > 0, PROMPT)
    assert [s["score"] for s in again] == pytest.approx(scores)


def test_ranking_off_or_one_candidate_leaves_scores_empty(sd1_editor, tmp_path):
    broken = Ranker(str(tmp_path / "nowhere"), None)  # would raise if it were asked
    editor = Editor(sd1_editor.model, ranker=broken)
    image, mask = scene(48, 32), box_mask(48, 32, (8, 4, 40, 28))
    kw = dict(num_inference_steps=2, guidance_scale=1.0)
    off = editor.edit(image, mask, PROMPT, num_candidates=2, rank=False, **kw)
    assert [c.scores for c in off.candidates] == [{}, {}] and [c.seed for c in off.candidates] == [0, 1]
    one = editor.edit(image, mask, PROMPT, num_candidates=1, **kw)
    assert one.candidates[0].scores == {} and one.notes == [] and "rank" not in one.timings


def test_unloadable_ranker_gives_a_note_not_a_failure(sd1_editor, tmp_path):
    editor = Editor(sd1_editor.model, ranker=Ranker(cache_dir=str(tmp_path)))
    result = editor.edit(scene(48, 32), box_mask(48, 32, (8, 4, 40, 28)), PROMPT, num_candidates=2,
                         num_inference_steps=2, guidance_scale=1.0)
    assert [c.seed for c in result.candidates] == [0, 1] and all(c.scores == {} for c in result.candidates)
    assert result.notes == ["ranking skipped: CLIP ranker ViT-B-16/openai could not be loaded: "
                            "not cached and the hub cannot be reached"]
