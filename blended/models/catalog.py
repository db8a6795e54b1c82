"""The models and LoRAs in a folder (the app's picker, `BLENDED_MODELS_DIR`), told apart by their headers."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..errors import ModelLoadError
from .detect import kind_of, read_header
from .loaded import PRESET_SOURCES


LABELS = {"demo": "demo (bundled, 20 steps)", "demo-fast": "demo-fast (bundled, fast: 4 steps)"}


def local_presets() -> list[tuple[str, str]]:
    """(label, preset name) of the presets with a source folder that exists here (`demo`, `demo-fast`, ...)."""
    return [(LABELS.get(name, name), name) for name, sources in PRESET_SOURCES.items()
            if any(Path(where).is_dir() for where in sources)]


def scan(folder: Optional[str | Path]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(models, loras) in `folder` and its `loras/` subfolder as (label, path): diffusers folders and `.safetensors`
    files; a file whose header cannot be read is listed as a model, so picking it shows why it does not load."""
    models: list[tuple[str, str]] = []
    loras: list[tuple[str, str]] = []
    if not folder or not Path(folder).is_dir():
        return models, loras
    root = Path(folder)
    entries = sorted(root.iterdir()) + (sorted((root / "loras").iterdir()) if (root / "loras").is_dir() else [])
    for p in entries:
        label = str(p.relative_to(root))
        if p.is_dir() and (p / "model_index.json").is_file():
            models.append((label, str(p)))
        elif p.is_file() and p.suffix.lower() == ".safetensors":
            try:
                kind = kind_of(list(read_header(p)))
            except ModelLoadError:
                kind = "checkpoint"
            if kind == "lora":
                loras.append((label, str(p)))
            elif kind == "checkpoint":
                models.append((label, str(p)))
    return models, loras
