"""Issue 27's bugs of logic written twice, each one a test that failed before the house had one way through:
a soft mask ranked as two different masks (2), two JSON coercers (3), an image and mask read several times (6).
(Bugs 1, 4 and 5 are the app's: tests/test_app_client.py, tests/test_speed.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import box_mask, scene

from blended import EditConfig, Editor
from blended.errors import InputError

ROOT = Path(__file__).resolve().parent.parent


class RecordingRanker:
    """Scores candidates by their seed order and records the region it was asked to judge."""

    def __init__(self):
        self.regions = []

    def score(self, images, mask, prompt):
        self.regions.append(np.asarray(mask, bool).copy())
        return [{"score": float(-i)} for i in range(len(images))]


def soft(w: int, h: int) -> Image.Image:
    """A soft mask: a strong core (255) inside a faint ring (60, under 0.5)."""
    a = np.zeros((h, w), np.uint8)
    a[6:26, 10:38] = 60
    a[12:20, 18:30] = 255
    return Image.fromarray(a, "L")


def test_a_soft_mask_is_ranked_on_the_same_region_by_a_single_and_a_multi_mask_edit(sd1_editor):
    from blended.multimask import edit_masks

    ranker = RecordingRanker()
    editor = Editor(sd1_editor.model, ranker)
    image, mask = scene(48, 32), soft(48, 32)
    settings = dict(soft_mask=True, num_inference_steps=2, num_candidates=2, guidance_scale=1.0)
    editor.edit(image, mask, "a hat", **settings)
    edit_masks(editor, image, [("only", mask)], "a hat", **settings)
    single, multi = ranker.regions
    assert single.sum() == 8 * 12  # the strong core: strengths >= 0.5
    assert np.array_equal(single, multi)


def test_one_coercer_for_the_manifest_the_app_and_the_api(tmp_path):
    from blended.batch import plan, read_manifest

    scene(48, 32).save(tmp_path / "i.png")
    box_mask(48, 32, (8, 8, 24, 24)).save(tmp_path / "m.png")
    lines = [{"id": "whole", "image": "i.png", "mask": "m.png", "prompt": "a hat", "num_candidates": 2.0,
              "guidance_scale": 5},
             {"id": "half", "image": "i.png", "mask": "m.png", "prompt": "a hat", "num_candidates": 2.5}]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(j) + "\n" for j in lines))
    pending, rows = plan(read_manifest(tmp_path / "jobs.jsonl"), EditConfig(), "model", tmp_path / "out", False)
    (job, config, _), = pending
    assert job.id == "whole" and config.num_candidates == 2 and type(config.num_candidates) is int
    assert type(config.guidance_scale) is float and config.guidance_scale == 5.0
    assert rows["half"]["status"] == "error" and "num_candidates must be an integer" in rows["half"]["message"]
    # the app and the API read settings through the same function: the same answers
    assert EditConfig.from_json({"num_candidates": 2.0, "guidance_scale": 5}) == config
    with pytest.raises(InputError, match="num_candidates must be an integer"):
        EditConfig.from_json({"num_candidates": 2.5})


def test_the_cli_reads_the_image_and_the_mask_once(tmp_path, monkeypatch):
    import blended.images as images
    from blended.__main__ import main

    scene(64, 64).save(tmp_path / "i.png")
    box_mask(64, 64, (16, 16, 40, 40)).save(tmp_path / "m.png")
    opened = []
    real = images._open
    monkeypatch.setattr(images, "_open", lambda src, what, max_pixels: opened.append((what, src)) or
                        real(src, what, max_pixels))
    for extra, out in (([], "plain"), (["--mask-grow", "3"], "grown"), (["--multi-mask"], "multi")):
        opened.clear()
        code = main(["edit", "--image", str(tmp_path / "i.png"), "--mask", str(tmp_path / "m.png"), "--prompt",
                     "a red circle", "--model", "demo", "--steps", "4", "--candidates", "3", "--no-rank", "--quiet",
                     "--out", str(tmp_path / out), *extra])
        assert code == 0
        assert [w for w, _ in opened].count("image") == 1, (extra, opened)
        assert [w for w, _ in opened].count("mask") == 1, (extra, opened)
        assert len(list((tmp_path / out).glob("0*.png"))) == 3
