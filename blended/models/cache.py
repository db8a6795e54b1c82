"""Loaded models shared by many users: a bounded cache, least recently used dropped first (issue 28).

The app lets each visitor pick a model for their own session; the server keeps the loaded ones here, at most
`max_models` of them (the app: `BLENDED_MAX_MODELS`, default 2). A model is keyed by everything its load takes
(`ModelKey`: the model, its LoRAs with their weights, the VAE, the prediction type), so a LoRA is part of a
loaded model and never of another user's edit (`lora.py`). An edit holds a lease on its model (`acquire`): a
leased model is never dropped, so while every loaded model is in use the cache may hold one more than its
bound until an edit ends. Loads run one at a time (two at once would need memory for both). Thread-safe.
"""

from __future__ import annotations

import gc
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .lora import LoraSpec

DEFAULT_MAX_MODELS = 2  # the app's `BLENDED_MAX_MODELS` (ui/limits.py) sets it for a server


@dataclass(frozen=True)
class ModelKey:
    """What one load of a model takes; two equal keys give the same model."""

    model: str  # a preset, a hub id, a folder or a .safetensors file
    loras: tuple[tuple[str, float], ...] = ()  # (file, weight) per LoRA, in order
    vae: Optional[str] = None  # a VAE folder or file replacing the model's own
    prediction_type: Optional[str] = None  # an override of the scheduler's

    @classmethod
    def of(cls, loaded: Any, prediction_type: Optional[str] = None) -> "ModelKey":
        """The key of an already loaded model (`LoadedModel`): its name, LoRAs and VAE."""
        return cls(loaded.name, tuple((str(l.path), float(l.weight)) for l in loaded.loras), loaded.vae,
                   prediction_type)

    def __deepcopy__(self, memo: dict) -> "ModelKey":
        """The key itself: it is immutable, so the copy gradio makes of a `gr.State`'s first value for every new
        session shares it."""
        return self

    def load_options(self) -> dict[str, Any]:
        """The keyword arguments of `load_model` / `Editor.load` besides the model."""
        return {"loras": [LoraSpec(path, weight) for path, weight in self.loras], "vae": self.vae,
                "prediction_type": self.prediction_type}

    def label(self) -> str:
        """'name' plus its LoRAs and VAE, for a status line."""
        name = Path(self.model).name if Path(self.model).exists() else self.model
        extras = [f"LoRA {Path(p).name} x {w:g}" for p, w in self.loras]
        extras += [f"VAE {Path(self.vae).name}"] if self.vae else []
        return name + (f" ({', '.join(extras)})" if extras else "")


class Lease:
    """A loaded model held for one edit; `release()` (or leaving the `with` block) lets the cache drop it again."""

    def __init__(self, cache: "ModelCache", key: ModelKey, model: Any):
        self.cache, self.key, self.model = cache, key, model
        self._held = True

    def release(self) -> None:
        """Give the model back (once; later calls do nothing)."""
        if self._held:
            self._held = False
            self.cache._release(self.key)

    def __enter__(self) -> Any:
        return self.model

    def __exit__(self, *exc: Any) -> None:
        self.release()


class ModelCache:
    """At most `max_models` loaded models by `ModelKey`, least recently used dropped first; never one leased.

    Args:
        load: makes the model of a key (e.g. `lambda key: Editor.load(key.model, **key.load_options())`);
            raises `ModelLoadError` with one line when it cannot.
        max_models: how many loaded models to keep (the app: `BLENDED_MAX_MODELS`, ui/limits.py).
    """

    def __init__(self, load: Callable[[ModelKey], Any], max_models: int = DEFAULT_MAX_MODELS):
        if max_models < 1:
            raise ValueError("max_models must be at least 1")
        self.load, self.max_models = load, max_models
        self._entries: OrderedDict[ModelKey, Any] = OrderedDict()  # least recently used first
        self._leases: dict[ModelKey, int] = {}
        self._lock = threading.Lock()  # guards the two dicts (held briefly)
        self._loading = threading.Lock()  # one load at a time

    def put(self, key: ModelKey, model: Any) -> None:
        """Add a model loaded elsewhere (the server's first) as the most recently used."""
        with self._lock:
            self._entries[key] = model
            self._entries.move_to_end(key)
            dropped = self._trim(self.max_models)
        _free(dropped)

    def get(self, key: ModelKey, on_load: Optional[Callable[[ModelKey], None]] = None) -> Any:
        """The model of `key`, loaded first when it is not here (`on_load(key)` is called before a load)."""
        return self._fetch(key, on_load, lease=False)

    def acquire(self, key: ModelKey, on_load: Optional[Callable[[ModelKey], None]] = None) -> Lease:
        """A lease on the model of `key` (loaded first when needed): it stays loaded until the lease is released.
        `with cache.acquire(key) as model: ...`"""
        return Lease(self, key, self._fetch(key, on_load, lease=True))

    def keys(self) -> list[ModelKey]:
        """The loaded models' keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def leases(self, key: ModelKey) -> int:
        """How many leases `key` has now."""
        with self._lock:
            return self._leases.get(key, 0)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _hit(self, key: ModelKey, lease: bool) -> Any:
        """The entry of `key` marked most recently used (and leased), or None; call under `_lock`."""
        model = self._entries.get(key)
        if model is not None:
            self._entries.move_to_end(key)
            if lease:
                self._leases[key] = self._leases.get(key, 0) + 1
        return model

    def _fetch(self, key: ModelKey, on_load: Optional[Callable[[ModelKey], None]], lease: bool) -> Any:
        with self._lock:
            model = self._hit(key, lease)
        if model is not None:
            return model
        with self._loading:
            with self._lock:  # another thread may have loaded it while this one waited
                model = self._hit(key, lease)
                dropped = [] if model is not None else self._trim(self.max_models - 1)  # room before the load
            _free(dropped)
            if model is not None:
                return model
            if on_load is not None:
                on_load(key)
            model = self.load(key)
            with self._lock:
                self._entries[key] = model
                if lease:
                    self._leases[key] = self._leases.get(key, 0) + 1
                dropped = self._trim(self.max_models)
        _free(dropped)
        return model

    def _release(self, key: ModelKey) -> None:
        with self._lock:
            left = self._leases.get(key, 0) - 1
            if left > 0:
                self._leases[key] = left
            else:
                self._leases.pop(key, None)
            dropped = self._trim(self.max_models)
        _free(dropped)

    def _trim(self, size: int) -> list[Any]:
        """Drop unleased models, least recently used first, until at most `size` remain (or only leased ones
        are left); call under `_lock`. Returns what was dropped, to be freed outside the lock."""
        dropped = []
        for key in list(self._entries):
            if len(self._entries) <= max(size, 0):
                break
            if not self._leases.get(key):
                dropped.append(self._entries.pop(key))
        return dropped


def _free(dropped: list[Any]) -> None:
    """Let dropped models go: Python's garbage, then an accelerator's cached blocks."""
    if not dropped:
        return
    dropped.clear()
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
