"""What the benchmarks share: parameter counts, timing, memory, Markdown tables, docs/bench/, plots, test pictures."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from . import ROOT

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BEFORE_COMMIT = "12149d8"  # bench/decoder_memory.py's `before` rows measure blended/background.py as of this commit


def have_before() -> bool:
    """Whether this clone has BEFORE_COMMIT (a shallow one does not)."""
    return subprocess.run(["git", "cat-file", "-e", f"{BEFORE_COMMIT}^{{commit}}"], cwd=ROOT,
                          capture_output=True).returncode == 0


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


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of a hit rate `hits / n`."""
    if n == 0:
        return 0.0, 0.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def write_doc_sections(name: str, title: str, sections: dict[str, str]) -> Path:
    """Write docs/bench/<name>.md as `title` and named sections, keeping the sections already on disk that this
    run did not produce (each section starts with a `<!-- section: key -->` line), so that parts of a bench can
    be rerun alone."""
    import re

    path = ROOT / "docs" / "bench" / f"{name}.md"
    old = {}
    if path.exists():
        parts = re.split(r"^<!-- section: (\S+) -->\n", path.read_text(), flags=re.M)
        old = dict(zip(parts[1::2], parts[2::2]))
    merged = {**old, **sections}
    return write_doc(name, title.rstrip() + "\n\n"
                     + "".join(f"<!-- section: {k} -->\n{v.strip()}\n\n" for k, v in merged.items()))
