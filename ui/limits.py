"""Deployment limits, read from environment variables (defaults suit one shared GPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Mapping, Optional


@dataclass(frozen=True)
class Limits:
    """What one deployment accepts; each field has an environment variable ``BLENDED_<FIELD>``."""

    max_upload_mb: int = 20  # largest uploaded file (gradio's max_file_size)
    max_pixels: int = 16_000_000  # largest image, width x height (about 4900 x 3300)
    max_candidates: int = 8  # most images one edit may generate
    max_steps: int = 100  # most denoising steps (and decoder fine-tuning steps) of one edit
    max_resolution: int = 1024  # largest `resolution` an edit may ask (shorter side, pixels, of the region worked at)
    concurrency: int = 1  # edits running at once (they share the model and the accelerator)
    max_queue: int = 20  # edits waiting beyond that; further requests are turned away
    max_models: int = 2  # models kept loaded for all sessions (blended/models/cache.py), the server's own included
    link_days: int = 7  # days the files of results and shared links are kept (gradio's delete_cache)
    max_sessions: int = 200  # sessions whose state the server keeps, least recently used dropped (gradio's state_session_capacity; docs/hosting.md)
    decode: str = ""  # what decodes every session's candidates unless a visitor changes it: full or tiny; "" = each model's own default (full). A CPU Space starts with tiny (app.py)

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> "Limits":
        """Read ``BLENDED_MAX_UPLOAD_MB``, ``BLENDED_MAX_PIXELS``, ... ; unset ones keep their defaults."""
        env = os.environ if env is None else env
        values = {}
        for f in fields(cls):
            name = "BLENDED_" + f.name.upper()
            raw = env.get(name, "").strip()
            if not raw:
                continue
            if f.type in (str, "str"):
                if raw not in ("full", "tiny"):
                    raise ValueError(f"{name} must be full or tiny, got '{raw}'")
                values[f.name] = raw
                continue
            try:
                value = int(raw.replace("_", ""))
            except ValueError:
                raise ValueError(f"{name} must be a whole number, got '{raw}'") from None
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
            values[f.name] = value
        return cls(**values)
