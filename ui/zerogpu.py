"""`@spaces.GPU` on Hugging Face ZeroGPU Spaces, a no-op everywhere else."""

from __future__ import annotations

import os
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


def on_zerogpu() -> bool:
    """True on a ZeroGPU Space (it sets SPACES_ZERO_GPU) where the `spaces` package is importable."""
    if os.environ.get("SPACES_ZERO_GPU", "").strip().lower() in ("", "0", "false", "no"):
        return False
    try:
        import spaces  # noqa: F401
    except ImportError:
        return False
    return True


def gpu(duration: int = 120) -> Callable[[F], F]:
    """Decorator: hold a ZeroGPU device for at most `duration` seconds per call; identity elsewhere."""

    def wrap(fn: F) -> F:
        if not on_zerogpu():
            return fn
        import spaces

        return spaces.GPU(duration=duration)(fn)

    return wrap
