"""Shared pieces of the benchmarks: SD-architecture models at reduced widths, timing, memory, tables."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def sd_components(width: float = 0.25, size: int = 512, seed: int = 0, tokenizer_dir: Path = Path("/tmp/blended-bench-tok")) -> dict:
    """The SD 1.5 graph (UNet 4 levels, 2 layers per block, cross attention at 3 levels; the SD VAE;
    a CLIP text encoder) with channel widths scaled by `width`, random weights with a fixed seed; the
    UNet's native resolution is `size` pixels (the engine edits at about that area)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tiny import clip_tokenizer

    torch.manual_seed(seed)
    ch = [max(32, int(c * width) // 32 * 32) for c in (320, 640, 1280, 1280)]
    text_dim = max(64, int(768 * width) // 64 * 64)
    unet = UNet2DConditionModel(sample_size=size // 8, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=ch, cross_attention_dim=text_dim, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3).eval()
    vch = [max(32, int(c * width) // 32 * 32) for c in (128, 256, 512, 512)]
    vae = AutoencoderKL(block_out_channels=vch, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                        sample_size=512, scaling_factor=0.18215).eval()
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=text_dim, intermediate_size=4 * text_dim,
                                      num_hidden_layers=max(2, int(12 * width)), num_attention_heads=max(1, text_dim // 64),
                                      max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                                      pad_token_id=49407)).eval()
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    return dict(vae=vae, text_encoder=te, tokenizer=clip_tokenizer(tokenizer_dir), unet=unet, scheduler=sched)


def params(module: torch.nn.Module) -> float:
    """Parameters in millions."""
    return sum(p.numel() for p in module.parameters()) / 1e6


class PeakRSS:
    """Peak resident memory of this process during a `with` block, sampled every 5 ms (MiB above the start)."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.start = self.peak = self.proc.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.mib = (self.peak - self.start) / 2**20


class CallCounter:
    """Counts forward calls of a module (e.g. UNet evaluations per edit)."""

    def __init__(self, module: torch.nn.Module):
        self.n = 0
        module.register_forward_pre_hook(lambda *a: setattr(self, "n", self.n + 1))


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table."""
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def scene(w: int, h: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], -1) + rng.normal(0, 8, (h, w, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def centre_mask(w: int, h: int, frac: float = 0.4):
    from PIL import Image

    a = np.zeros((h, w), np.uint8)
    a[int(h * (0.5 - frac / 2)):int(h * (0.5 + frac / 2)), int(w * (0.5 - frac / 2)):int(w * (0.5 + frac / 2))] = 255
    return Image.fromarray(a)


def write_doc(name: str, text: str) -> Path:
    """Write docs/bench/<name>.md."""
    out = ROOT / "docs" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.md"
    path.write_text(text)
    return path


def plot(path: Path, series: dict[str, tuple[list, list]], xlabel: str, ylabel: str, title: str) -> Path:
    """A line chart (PNG) of {label: (xs, ys)}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
