"""What the demo model's training scripts (tools/) share: timestamped log lines, the learning-rate schedule,
parameter counts, images as tensors."""

from __future__ import annotations

import math
import time

import numpy as np
import torch


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def nparams(m) -> int:
    return sum(p.numel() for p in m.parameters())


def to_tensor(images_u8: np.ndarray) -> torch.Tensor:
    """uint8 (N,H,W,3) -> float (N,3,H,W) in [-1, 1]."""
    return torch.from_numpy(images_u8).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def lr_at(progress: float, step: int, peak: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then a cosine from `peak` down to a tenth of it at `progress` 1."""
    w = min(1.0, (step + 1) / warmup)
    return peak * w * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
