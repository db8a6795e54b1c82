import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from blended_dev.tiny import build_pipeline  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Folders of tiny SD1-, SD2- and SDXL-shaped checkpoints, built once per session."""
    root = tmp_path_factory.mktemp("models")
    return {kind: build_pipeline(kind, root / kind) for kind in ("sd1", "sd2", "sdxl")}


@pytest.fixture(scope="session")
def sd1_editor(tiny_dirs):
    from blended import Editor

    return Editor.load(str(tiny_dirs["sd1"]), ranker=None)


def scene(w: int = 48, h: int = 32, seed: int = 0) -> Image.Image:
    """A smooth test picture of size w x h."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], -1) + rng.normal(0, 8, (h, w, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def box_mask(w: int, h: int, box: tuple[int, int, int, int]) -> Image.Image:
    a = np.zeros((h, w), np.uint8)
    l, t, r, b = box
    a[t:b, l:r] = 255
    return Image.fromarray(a)
