"""Learning-rate schedules over the run's progress: linear warm-up over steps, then cosine (or
one-cycle) down to `min_ratio` of the peak. Progress is steps / all epochs' steps, or, with a time
budget, training seconds / the budget, so a budgeted run ends annealed when its time is up.

    clock = TrainClock()                      # the loop adds each step's seconds
    sched = ProgressLR(optimizer, warmup=100, min_ratio=0.01, total_steps=8 * 371)
    sched = ProgressLR(optimizer, warmup=100, min_ratio=0.01, budget_s=1200, clock=clock)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cityseg.config import SETTINGS

SHAPES = SETTINGS["train.schedule"].choices
ONECYCLE_RISE = 0.3  # share of the run spent rising to the peak (Smith's pct_start)
ONECYCLE_START = 1 / 25  # one-cycle starts at peak / 25 (PyTorch's div_factor)


@dataclass
class TrainClock:
    """Training time so far in seconds (validation excluded); saved in checkpoints and resumed."""

    seconds: float = 0.0


def cpu_seconds() -> float:
    """This process's CPU time over its intra-op threads: wall seconds on a quiet machine, and what
    the process really got on a shared one."""
    return time.process_time() / max(1, torch.get_num_threads())


def tick_function(kind: str) -> Callable[[], float]:
    return cpu_seconds if kind == "cpu" else time.perf_counter


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up over `warmup` steps, then cosine decay to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def onecycle(progress: float, min_ratio: float) -> float:
    """One-cycle: cosine rise from peak/25 to the peak over the first 30 %, cosine fall to `min_ratio`."""
    p = min(1.0, max(0.0, progress))
    if p < ONECYCLE_RISE:
        return ONECYCLE_START + (1 - ONECYCLE_START) * 0.5 * (1 - math.cos(math.pi * p / ONECYCLE_RISE))
    fall = (p - ONECYCLE_RISE) / (1 - ONECYCLE_RISE)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * fall))


class ProgressLR:
    """Sets every param group's lr to base_lr * factor(progress) at each `step()` (and at start).

    By steps (`total_steps`) the cosine shape is exactly `warmup_cosine`; by time (`budget_s` with a
    `clock`), the warm-up stays in steps and the decay follows clock.seconds / budget_s. Its
    state_dict carries `last_epoch` (the step count) like torch's LambdaLR, whose checkpoints load."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, warmup: int, min_ratio: float, shape: str = "cosine",
                 total_steps: int | None = None, budget_s: float | None = None, clock: TrainClock | None = None
                 ) -> None:
        if shape not in SHAPES:
            raise ValueError(f"schedule {shape!r}: expected one of {SHAPES}")
        if (total_steps is None) == (budget_s is None) or (budget_s is not None and clock is None):
            raise ValueError("give total_steps, or budget_s with a clock")
        self.optimizer, self.warmup, self.min_ratio, self.shape = optimizer, max(1, warmup), min_ratio, shape
        self.total_steps, self.budget_s, self.clock = total_steps, budget_s, clock
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.last_epoch = 0
        self._apply()

    def progress(self) -> float:
        if self.budget_s is not None:
            return min(1.0, self.clock.seconds / self.budget_s)
        return min(1.0, self.last_epoch / max(1, self.total_steps))

    def factor(self) -> float:
        if self.shape == "onecycle":
            return onecycle(self.progress(), self.min_ratio)
        if self.budget_s is None:
            return warmup_cosine(self.last_epoch, self.warmup, self.total_steps, self.min_ratio)
        ramp = min(1.0, (self.last_epoch + 1) / self.warmup)
        return ramp * (self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * self.progress())))

    def _apply(self) -> None:
        f = self.factor()
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * f

    def step(self) -> None:
        self.last_epoch += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_epoch = int(state["last_epoch"])
        self.base_lrs = list(state["base_lrs"])
        self._apply()
