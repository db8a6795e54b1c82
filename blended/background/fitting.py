"""The one fitting loop of `latent` and `decoder` (paper §4.2): Adam on the latents or on the decoder's weights so
that the decode of the window gives the candidate inside the mask and the source outside, with a learning-rate
schedule, early stopping on a plateau, cancellation and progress."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from ..config import DECODER_SCHEDULES
from ..errors import EditCancelled
from .window import Window

Progress = Callable[[int, int], None]  # (done, total) optimisation steps
ShouldStop = Callable[[], bool]

MIN_IMPROVEMENT = 0.1  # early stopping: a candidate is done when `patience` steps lowered its loss by less than this


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """The learning rate of Adam step `step` (0-based) of `steps`, as a share of the peak: 1 throughout for
    "constant" (the paper); "linear" and "cosine" fall from 1 at the first step towards 0 after the last, so the
    last steps refine instead of jumping around the minimum at the full rate (docs/fewstep.md measures it)."""
    if schedule == "constant":
        return 1.0
    done = step / max(steps, 1)
    if schedule == "linear":
        return 1.0 - done
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * done))
    raise ValueError(f"unknown decoder_schedule '{schedule}': use one of {', '.join(DECODER_SCHEDULES)}")


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def window_targets(window: Window, decoded: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, lam: float,
                   focus: Optional[torch.Tensor] = None):
    """Window crops of the candidates, the source and the weights of both loss terms (only where `focus` is 1,
    when given)."""
    m = window.pixels(mask)  # (1, 1, hp, wp)
    f = window.pixels(focus) if focus is not None else torch.ones_like(m)
    return window.pixels(decoded), window.pixels(source), m * f, lam * (1 - m) * f


def window_loss(out: torch.Tensor, cand: torch.Tensor, src: torch.Tensor, w_in: torch.Tensor,
                w_out: torch.Tensor) -> torch.Tensor:
    """Per-candidate loss (B,): MSE to the candidate inside the mask + λ MSE to the source outside (paper §4.2),
    both summed over the window and divided by its size."""
    return (w_in * (out - cand) ** 2 + w_out * (out - src) ** 2).mean(dim=(1, 2, 3))


def check_stop(should_stop: Optional[ShouldStop]) -> None:
    """Raise `EditCancelled` when the caller asks to stop."""
    if should_stop is not None and should_stop():
        raise EditCancelled("the edit was stopped")


class Plateau:
    """Per-candidate early stopping: done once the loss fell by less than MIN_IMPROVEMENT (relative) over the
    last `patience` steps (0 = never)."""

    def __init__(self, n: int, patience: int):
        self.patience, self.history = patience, [[] for _ in range(n)]
        self.done = [False] * n

    def update(self, losses: list[float]) -> list[int]:
        """Record one step's losses; return the candidates that just became done."""
        newly = []
        for i, loss in enumerate(losses):
            if self.done[i] or self.patience <= 0:
                continue
            h = self.history[i]
            h.append(loss)
            if len(h) > self.patience and h[-1] > (1 - MIN_IMPROVEMENT) * h[-1 - self.patience]:
                self.done[i] = True
                newly.append(i)
        return newly


class StopEach:
    """Early stopping when each candidate has parameters of its own (its latents, its decoder copy): a candidate
    whose loss plateaus keeps its parameters of that step (`snapshot(i)`, in `kept`); the fit ends when all have."""

    def __init__(self, n: int, patience: int, snapshot: Callable[[int], Any]):
        self.plateau, self.snapshot, self.kept = Plateau(n, patience), snapshot, {}

    def update(self, step: int, losses: list[float]) -> bool:
        for i in self.plateau.update(losses):
            self.kept[i] = self.snapshot(i)
        return all(self.plateau.done)


class StopShared:
    """Early stopping for one set of parameters fitted to `n` candidates in turn (`order(step)`: the candidates of
    a step): it watches the mean of each candidate's latest loss, once every candidate has one."""

    def __init__(self, n: int, patience: int, order: Callable[[int], list[int]]):
        self.plateau, self.order, self.latest = Plateau(1, patience), order, [None] * n

    def update(self, step: int, losses: list[float]) -> bool:
        for i, loss in zip(self.order(step), losses):
            self.latest[i] = loss
        return None not in self.latest and bool(self.plateau.update([sum(self.latest) / len(self.latest)]))


def fit(params: list[torch.Tensor], losses: Callable[[int], torch.Tensor], stopper, *, steps: int, lr: float,
        schedule: str = "constant", average: bool = False, progress: Optional[Progress] = None,
        should_stop: Optional[ShouldStop] = None, done: int = 0, total: Optional[int] = None) -> None:
    """Adam on `params` for up to `steps` steps (paper §4.2). Each step: `should_stop` is polled (True raises
    `EditCancelled`), `losses(step)` gives the per-candidate losses (k,) of that step, their sum (`average`: mean)
    is minimised at `lr * lr_factor(schedule, ...)`, `stopper.update(step, losses)` (`StopEach`, `StopShared`)
    says whether to end early, and `progress(done + step + 1, total)` is called (`total` defaults to `steps`)."""
    total = steps if total is None else total
    opt = torch.optim.Adam(params, lr=lr)
    with torch.enable_grad():
        for step in range(steps):
            check_stop(should_stop)
            per = losses(step)  # (k,)
            opt.zero_grad(set_to_none=True)
            (per.mean() if average else per.sum()).backward()  # a sum: each candidate's own gradient
            _set_lr(opt, lr * lr_factor(schedule, step, steps))
            opt.step()
            stop = stopper.update(step, per.tolist())
            if progress is not None:
                progress(done + step + 1, total)
            if stop:
                break
