"""The checkpoint's safety checker stays on where the checkpoint has one; flagged candidates are blanked and last."""

import numpy as np
import pytest
import torch

from blended import Editor
from conftest import box_mask, scene
from blended_dev.tiny import build_pipeline


@pytest.fixture(scope="module")
def flagging_dir(tmp_path_factory):
    """A tiny SD1 checkpoint with a tiny safety checker whose concept thresholds flag every image."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    root = tmp_path_factory.mktemp("safety")
    base = StableDiffusionPipeline.from_pretrained(build_pipeline("sd1", root / "base"))
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2),
                     vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                                        image_size=32, patch_size=8), projection_dim=16)
    checker = StableDiffusionSafetyChecker(cfg).eval()
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-10.0)  # every cosine is above a threshold of -10: all flagged
        checker.special_care_embeds_weights.fill_(-10.0)
    fe = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pipe = StableDiffusionPipeline(**{k: v for k, v in base.components.items()
                                      if k not in ("safety_checker", "feature_extractor", "image_encoder")},
                                   safety_checker=checker, feature_extractor=fe, requires_safety_checker=True)
    pipe.save_pretrained(root / "flagging", safe_serialization=True)
    return root / "flagging"


def test_flagged_candidates_are_blanked_captioned_and_last(flagging_dir):
    editor = Editor.load(str(flagging_dir), ranker=None)
    assert editor.model.pipe.safety_checker is not None
    image, mask = scene(32, 32), box_mask(32, 32, (8, 8, 24, 24))
    r = editor.edit(image, mask, "a cat", num_inference_steps=2, num_candidates=2)
    assert all(c.filtered for c in r.candidates)
    assert [c["filtered"] for c in r.to_json()["candidates"]] == [True, True]
    out, src = np.asarray(r.images[0], np.int16), np.asarray(image, np.int16)
    assert np.abs(out[10:22, 10:22] - 128).max() <= 1, "the edited region is blanked (grey)"
    assert np.abs(out[:6] - src[:6]).mean() < 12, "the rest shows the source"
    off = editor.edit(image, mask, "a cat", num_inference_steps=2, num_candidates=2, safety_checker=False)
    assert not any(c.filtered for c in off.candidates)
    assert np.abs(np.asarray(off.images[0], np.int16)[10:22, 10:22]).max() > 10
