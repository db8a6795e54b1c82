"""Removal without a prompt (issue 29, blended/remove.py): the hole pre-filled from its surroundings, the loop started
from it, the photo kept beyond the seam band, the candidates ranked by how little object is left; the CLI, the batch
manifest and the app's Remove choice."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blended import EditConfig, InputError
from blended.images import seam_weights
from blended.remove import RemovalRanker, prefill, prefilled
from blended_dev import scenes
from blended_dev.analyse import analyse_region
from conftest import box_mask, scene

ROOT = Path(__file__).resolve().parent.parent
SCENE_SEED = scenes.HELDOUT_SEED_START + 990_100  # a two-object held-out scene (no bench uses these seeds)


@pytest.fixture(scope="module")
def demo():
    from blended import Editor

    return Editor.load("demo")  # with its own small CLIP ranker


def two_objects(seed: int = SCENE_SEED):
    """A held-out demo scene with two objects: (scene, image, mask of object 0 grown by 2 px as an 'L' image)."""
    from blended.select import grow

    sc = scenes.make_scene(seed, 2)
    assert len(sc.objects) == 2
    mask = grow(sc.masks[0], 2)
    return sc, Image.fromarray(sc.image), Image.fromarray(mask.astype(np.uint8) * 255)


def test_prefill_paints_the_hole_from_its_surroundings_and_nothing_else():
    a = np.full((40, 40, 3), (90, 110, 100), np.uint8)
    a[:, 20:] = (120, 100, 90)  # two halves: the fill follows each side
    a[12:28, 14:26] = (220, 40, 40)  # a red object across the boundary
    hole = np.zeros((40, 40), bool)
    hole[11:29, 13:27] = True
    for method in ("telea", "ns"):
        out = np.asarray(prefill(Image.fromarray(a), hole, method)).astype(int)
        assert (out[~hole] == a[~hole]).all()  # only the hole changes
        assert np.abs(out[hole] - (220, 40, 40)).sum(-1).min() > 150  # no red left
        assert np.abs(out[20, 14] - (90, 110, 100)).max() <= 6 and np.abs(out[20, 26] - (120, 100, 90)).max() <= 6
    with pytest.raises(ValueError, match="remove_fill"):
        prefill(Image.fromarray(a), hole, "lama")


def test_settings_are_validated_and_keep_old_batch_hashes():
    from blended.batch import hashed_settings
    from blended.config import REMOVE_FILLS
    from blended.remove import FILL_FLAGS

    assert tuple(FILL_FLAGS) == REMOVE_FILLS
    with pytest.raises(InputError, match="remove_strength"):
        EditConfig.from_json({"remove": True, "remove_strength": 1.5})
    with pytest.raises(InputError, match="remove_fill"):
        EditConfig.from_json({"remove_fill": "lama"})
    fields = {f.name: f for f in dataclasses.fields(EditConfig)}
    assert all(fields[n].metadata.get("added") == 29 for n in ("remove", "remove_strength", "remove_fill"))
    assert not {"remove", "remove_strength", "remove_fill"} & set(hashed_settings(EditConfig()))
    assert hashed_settings(EditConfig(remove=True))["remove"] is True


def test_a_removal_needs_no_prompt_and_keeps_the_photo_beyond_the_seam_band(sd1_editor):
    image, mask = scene(96, 64, seed=4), box_mask(96, 64, (10, 8, 34, 30))  # the engine edits a crop around the mask
    with pytest.raises(InputError, match="prompt is empty"):
        sd1_editor.edit(image, mask, "", num_candidates=1, num_inference_steps=4)
    result = sd1_editor.edit(image, mask, "", num_candidates=2, num_inference_steps=4, remove=True,
                             remove_strength=0.5)
    assert result.prompt == "" and len(result.candidates) == 2
    assert result.to_json()["settings"]["remove"] is True
    keep = seam_weights(np.asarray(mask) > 127, result.config.feather) == 0  # beyond the seam band
    src = np.asarray(image)
    for cand in result.candidates:
        out = np.asarray(cand.image)
        assert (out[keep] == src[keep]).all()
        assert (out[~keep] != src[~keep]).any()


def test_the_loop_blends_with_the_prefill_inside_the_mask_and_the_source_outside(sd1_editor):
    m = sd1_editor.model
    image = scene(32, 32, seed=2)
    hole = np.zeros((32, 32), bool)
    hole[8:24, 8:24] = True
    x = torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    z_init = m.encode(x)
    mask = torch.zeros_like(z_init[:, :1])
    mask[..., 2:6, 2:6] = 1
    z_start, x_fill = prefilled(m, image, hole, z_init, mask, EditConfig(remove=True))
    filled = torch.from_numpy(np.asarray(prefill(image, hole), np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    assert torch.equal(x_fill, filled)
    out = (mask == 0).expand_as(z_init)
    assert torch.equal(z_start[out], z_init[out])  # the source's latents, exactly, outside the mask
    assert torch.allclose(z_start[~out], m.encode(filled)[~out])  # the pre-fill's inside


def test_strength_0_is_the_prefill_inside_the_mask(demo):
    sc, image, mask = two_objects()
    result = demo.edit(image, mask, "", remove=True, remove_strength=0.0, num_candidates=2)
    hole = np.asarray(mask) > 127
    filled = np.asarray(prefill(image, hole))
    for cand in result.candidates:
        out = np.asarray(cand.image)
        assert (out[hole] == filled[hole]).all()
        beyond = seam_weights(hole, result.config.feather) == 0
        assert (out[beyond] == sc.image[beyond]).all()
    assert "denoise" not in result.timings  # no diffusion at all


def test_removal_on_a_demo_scene_leaves_no_object_in_most_seeds(demo):
    sc, image, mask = two_objects()
    hole = np.asarray(mask) > 127
    assert analyse_region(sc.image, hole) == (sc.objects[0].colour, sc.objects[0].shape)  # the object is there
    cleared = 0
    for seed in range(5):
        result = demo.edit(image, mask, "", remove=True, num_candidates=1, seed=seed, rank=False)
        out = np.asarray(result.candidates[0].image)
        cleared += analyse_region(out, hole) == (None, None)
        assert analyse_region(out, sc.masks[1]) == (sc.objects[1].colour, sc.objects[1].shape)  # the other one stays
    assert cleared >= 4


def test_the_removal_ranker_prefers_a_candidate_without_the_object(demo):
    sc, image, mask = two_objects()
    hole = np.asarray(mask) > 127
    ranker = RemovalRanker(demo.ranker, image)
    with_object, without = image, Image.fromarray(sc.background)
    scores = ranker.score([with_object, without], hole, "")
    assert scores[1]["score"] > scores[0]["score"]
    assert scores[0]["removed"] > 0.99  # the source compared with itself
    result = demo.edit(image, mask, "", remove=True, num_candidates=3)
    assert [c.scores["score"] for c in result.candidates] == sorted((c.scores["score"] for c in result.candidates),
                                                                     reverse=True)
    assert {"removed", "surroundings"} <= set(result.candidates[0].scores)


def test_stop_and_previews_work_during_a_removal(demo):
    from blended.errors import EditCancelled

    _, image, mask = two_objects()
    shown = []
    demo.edit(image, mask, "", remove=True, num_candidates=1, preview=lambda done, total, ims: shown.append(done))
    assert shown and shown == sorted(shown)
    with pytest.raises(EditCancelled):
        demo.edit(image, mask, "", remove=True, num_candidates=1, should_stop=lambda: True)


def test_the_cli_removes_an_object_end_to_end(tmp_path):
    sc, image, mask = two_objects()
    image.save(tmp_path / "scene.png")
    mask.save(tmp_path / "m.png")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "blended", "edit", "--model", "demo", "--image", str(tmp_path / "scene.png"),
                        "--mask", str(tmp_path / "m.png"), "--remove", "--candidates", "2", "--out", str(tmp_path / "out"),
                        "--quiet"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    info = json.loads((tmp_path / "out" / "result.json").read_text())
    assert info["prompt"] == "" and info["settings"]["remove"] is True
    out = np.asarray(Image.open(tmp_path / "out" / "01.png").convert("RGB"))
    assert analyse_region(out, np.asarray(mask) > 127) == (None, None)
    p = subprocess.run([sys.executable, "-m", "blended", "edit", "--model", "demo", "--image", str(tmp_path / "scene.png"),
                        "--mask", str(tmp_path / "m.png"), "--out", str(tmp_path / "out2")], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=300)
    assert p.returncode == 2 and "--prompt" in p.stderr  # no prompt and no --remove: refused before the load


def test_a_batch_job_with_remove_needs_no_prompt(demo, tmp_path):
    from blended.batch import ManifestError, plan, read_manifest, run_job

    _, image, mask = two_objects()
    image.save(tmp_path / "scene.png")
    mask.save(tmp_path / "m.png")
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"id": "gone", "image": "scene.png", "mask": "m.png", "remove": True,
                                                     "num_candidates": 2}) + "\n")
    jobs = read_manifest(tmp_path / "jobs.jsonl")
    assert jobs[0].prompt == "" and jobs[0].settings["remove"] is True
    (tmp_path / "plain.jsonl").write_text(json.dumps({"image": "scene.png", "mask": "m.png"}) + "\n")
    with pytest.raises(ManifestError, match="'prompt' is missing"):
        read_manifest(tmp_path / "plain.jsonl")
    assert read_manifest(tmp_path / "plain.jsonl", remove=True)[0].prompt == ""  # the command's --remove
    (pending,), _ = plan(jobs, demo.defaults, demo.model, tmp_path / "out", False)
    row = run_job(demo, *pending, tmp_path / "out")
    assert row["status"] == "ok", row
    info = json.loads((tmp_path / "out" / "gone" / "result.json").read_text())
    assert info["settings"]["remove"] is True and len(info["files"]) == 2


def test_the_app_removes_with_an_empty_prompt(tmp_path):
    from blended import Editor
    from test_app_client import generate_handler, launch
    from ui import Limits

    sc, image, mask = two_objects()
    layer = np.zeros((64, 64, 4), np.uint8)
    layer[np.asarray(mask) > 127] = (255, 0, 255, 200)
    demo_app, _ = launch(Editor.load("demo", ranker=None), Limits(max_candidates=2))
    try:
        handler, inputs = generate_handler(demo_app)
        by_id = {c.elem_id: c for c in inputs if getattr(c, "elem_id", None)}
        assert by_id["remove"].value is False  # the Remove choice, off until chosen
        data = {c: c.value for c in inputs}
        data.update({by_id["editor"]: {"background": image.convert("RGBA"), "layers": [Image.fromarray(layer, "RGBA")],
                                       "composite": None},
                     by_id["prompt"]: "", by_id["remove"]: True, by_id["live-preview"]: False,
                     by_id["num-candidates"]: 1, by_id["randomize-seed"]: False})
        last = list(handler(data, None))[-1]
        details = next(v for k, v in last.items() if getattr(k, "elem_id", None) == "details")
        assert details["prompt"] == "" and details["settings"]["remove"] is True
        best = next(v for k, v in last.items() if getattr(k, "elem_id", None) == "gallery")[0]
        out = np.asarray(Image.open(best[0] if isinstance(best, (tuple, list)) else best).convert("RGB"))
        assert analyse_region(out, np.asarray(mask) > 127) == (None, None)
        data[by_id["remove"]] = False
        with pytest.raises(Exception, match="prompt is empty"):
            list(handler(data, None))
    finally:
        demo_app.close()


def test_a_multi_mask_removal_ranks_by_how_little_object_is_left(demo):
    from blended.multimask import edit_masks, mask_variants

    _, image, mask = two_objects()
    masks = mask_variants(np.asarray(mask) > 127, [0, 2])
    result = edit_masks(demo, image, masks, "", demo.defaults.replace(remove=True, num_candidates=2))
    scores = [c.scores for c in result.candidates]
    assert all("surroundings" in s for s in scores) and scores[0]["score"] >= scores[1]["score"]


def test_the_bench_quick_mode_runs_and_gives_sane_numbers():
    p = subprocess.run([sys.executable, "-m", "bench.remove", "--quick"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in p.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| row")}
    prefill_alone = rows["pre-fill alone (Telea)"]
    assert 0.0 <= float(prefill_alone[0]) <= 1.0 and 20 < float(prefill_alone[2]) < 60
    assert any(k.startswith("**default**") for k in rows)  # the engine's default removal is one of the rows
