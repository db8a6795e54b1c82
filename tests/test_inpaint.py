"""9-channel inpainting UNets with blending: what the UNet receives, the mask weight, the exact composite (issue 20)."""

import numpy as np
import pytest
import torch
from conftest import box_mask, scene
from blended_dev.ldm_layout import write_single_file

from blended import Editor

EDIT = dict(num_inference_steps=2, num_candidates=1, rank=False, guidance_scale=3.0, blend_start=0.0)


@pytest.fixture(scope="module")
def inpaint_dir(tiny_dirs, tmp_path_factory):
    """The tiny SD1 pipeline with a seeded random 9-channel UNet (latents, mask, masked-source latents)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dirs["sd1"]))
    torch.manual_seed(3)
    pipe.unet = UNet2DConditionModel.from_config({**pipe.unet.config, "in_channels": 9})
    folder = tmp_path_factory.mktemp("inpaint") / "sd1-inpaint"
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def inpaint_editor(inpaint_dir):
    return Editor.load(str(inpaint_dir), ranker=None)


def unet_inputs(editor, image, mask, **settings) -> list[torch.Tensor]:
    seen = []
    handle = editor.model.pipe.unet.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    try:
        editor.edit(image, mask, "a cat", **{**EDIT, **settings})
    finally:
        handle.remove()
    return seen


def test_the_unet_receives_the_mask_and_the_masked_source_channel_for_channel(inpaint_editor):
    from blended.editor import _to_tensor

    ed = inpaint_editor
    image, mask = scene(32, 32), box_mask(32, 32, (8, 8, 24, 24))  # 32 px: the tiny model's native size, x4 VAE
    hole = torch.zeros(1, 1, 32, 32)
    hole[..., 8:24, 8:24] = 1
    z_mask = torch.zeros(1, 1, 8, 8)
    z_mask[..., 2:6, 2:6] = 1
    source = _to_tensor(image)
    for weight in (1.0, 0.5, 0.0):
        inputs = unet_inputs(ed, image, mask, inpainting_mask_weight=weight)
        assert len(inputs) == 2  # two steps, guided: negative and prompt rows in each call
        expected = ed.model.encode(source * (1 - weight * hole))
        for x in inputs:
            assert x.shape == (2, 9, 8, 8)
            assert torch.equal(x[:, 4:5], z_mask.expand(2, 1, 8, 8))
            assert torch.allclose(x[:, 5:], expected.expand(2, -1, -1, -1), atol=1e-6)
    assert torch.equal(ed.model.encode(source), ed.model.encode(source * (1 - 0.0 * hole)))  # w=0: the whole source
    for x in unet_inputs(ed, image, mask, inpainting_conditioning=False):
        assert not x[:, 4:].any()


def test_outside_the_mask_the_composite_is_exact(inpaint_editor):
    image = scene(64, 64, seed=1)
    out = np.asarray(inpaint_editor.edit(image, box_mask(64, 64, (24, 24, 40, 40)), "a cat", feather=4,
                                         **EDIT).images[0])
    keep = np.ones((64, 64), bool)
    keep[24 - 4:40 + 4, 24 - 4:40 + 4] = False
    assert np.array_equal(out[keep], np.asarray(image)[keep])
    assert not np.array_equal(out[~keep], np.asarray(image)[~keep])


def test_a_9_channel_single_file_gives_the_folders_pixels(inpaint_dir, inpaint_editor, tmp_path):
    from diffusers import StableDiffusionPipeline

    from blended.models.detect import inspect

    path = write_single_file(StableDiffusionPipeline.from_pretrained(str(inpaint_dir)), tmp_path / "inp.safetensors")
    assert inspect(path).in_channels == 9
    single = Editor.load(str(path), ranker=None, model_config=str(inpaint_dir))
    assert single.model.is_inpainting
    args = (scene(32, 32), box_mask(32, 32, (8, 8, 24, 24)), "a cat")
    assert np.array_equal(np.asarray(single.edit(*args, **EDIT).images[0]),
                          np.asarray(inpaint_editor.edit(*args, **EDIT).images[0]))
