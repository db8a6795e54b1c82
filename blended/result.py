"""What an edit gives back: `Candidate`s best first in an `EditResult`, which saves itself (CLI and batch alike)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from PIL import Image

from .config import EditConfig
from .images import Region
from .pnginfo import png_info


@dataclass
class Candidate:
    """One edited image at the source's full resolution."""

    image: Image.Image
    seed: int
    scores: dict[str, float] = field(default_factory=dict)  # ranking scores; "score" orders the gallery
    filtered: bool = False  # the checkpoint's safety checker flagged it (its edit is blanked grey)
    mask: str = ""  # which of several masks made it (`blended.multimask`); "" = the edit's one mask

    @property
    def score(self) -> Optional[float]:
        return self.scores.get("score")


@dataclass
class EditResult:
    """Candidates best first, with what produced them."""

    candidates: list[Candidate]
    prompt: str
    config: EditConfig
    model: str
    timings: dict[str, float]  # seconds per stage
    region: Region  # what was edited, at which size
    notes: list[str] = field(default_factory=list)  # things the user should know (prompt cut, ...)
    model_info: dict = field(default_factory=dict)  # LoadedModel.describe(): VAE, LoRAs with weights and digests

    @property
    def images(self) -> list[Image.Image]:
        return [c.image for c in self.candidates]

    @property
    def files(self) -> list[str]:
        """The names `save` gives the candidates, best first: 01.png, 02.png, ..."""
        return [f"{i:02d}.png" for i in range(1, len(self.candidates) + 1)]

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "model": self.model,
            "vae": self.model_info.get("vae"),
            "loras": self.model_info.get("loras", []),
            "recommended": self.model_info.get("recommended", {}),  # the model's (and its LoRAs') own defaults
            "candidates": [{"rank": i + 1, "seed": c.seed, "scores": c.scores, "filtered": c.filtered,
                            **({"mask": c.mask} if c.mask else {})} for i, c in enumerate(self.candidates)],
            "settings": self.config.to_dict(),
            "region": {"box": list(self.region.box), "work_size": list(self.region.work_size)},
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "notes": self.notes,
        }

    def save(self, folder: str | Path, extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """Write `folder/01.png, 02.png, ...` (best first), each with its parameters inside (`blended.pnginfo`:
        A1111's infotext and this candidate's record), and `folder/result.json` (`to_json`, the files, and `extra`);
        return what result.json holds. result.json is written last, atomically: a folder that has it
        is complete. Numbered PNGs of an earlier, larger result are removed."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "result.json").unlink(missing_ok=True)
        for i, (name, cand) in enumerate(zip(self.files, self.candidates)):
            cand.image.save(folder / name, pnginfo=png_info(self, i))  # A1111's `parameters` and our record
        for stale in folder.glob("[0-9][0-9].png"):
            if stale.name not in self.files:
                stale.unlink()
        info = {**self.to_json(), "files": self.files, **(extra or {})}
        tmp = folder / f".result.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(info, indent=2, default=list))
        os.replace(tmp, folder / "result.json")
        return info
