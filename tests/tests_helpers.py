"""Small helpers shared by tests."""

import torch

from blended.editor import _to_tensor


@torch.no_grad()
def encode(editor, image):
    """z_init of a PIL image with the editor's VAE (the same path Editor.edit uses)."""
    return editor.model.encode(_to_tensor(image))
