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
# A budgeted run's warm-up ends after its steps or after this share of the budget, whichever comes
# first: 100 steps are seconds on a GPU but can be a whole short budget on a CPU (a 60 s run of 8
# steps never left warm-up, and learned nothing).
WARMUP_BUDGET_SHARE = 0.05


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


def planned_warmup(warmup_steps: int, total_steps: int) -> int:
    """Warm-up steps of a plan of `total_steps`: at most a fifth of it."""
    return min(warmup_steps, max(1, total_steps // 5))


def warmup_note(warmup_steps: int, total_steps: int | None, max_steps: int) -> str | None:
    """One line when the run's plan ends inside the LR warm-up (the lr would never reach its peak);
    `total_steps` None: a time budget, whose warm-up also ends at WARMUP_BUDGET_SHARE of it."""
    warmup = warmup_steps if total_steps is None else planned_warmup(warmup_steps, total_steps)
    if max_steps and warmup and max_steps <= warmup:
        return (f"--max-steps {max_steps} ends the run inside the {warmup}-step LR warm-up: the lr never reaches "
                "its peak (lower --warmup-steps)")
    return None


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
    """Sets every param group's lr to base_lr * factor(progress) at each `step()` (and at start), 0
    for a group marked `frozen_steps` until that many steps are done (`setup.parameter_groups`).

    By steps (`total_steps`) the cosine shape is exactly `warmup_cosine`; by time (`budget_s` with a
    `clock`), the warm-up ends after its steps or WARMUP_BUDGET_SHARE of the budget, whichever comes
    first, and the decay follows clock.seconds / budget_s. Its
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
        by_steps = (self.last_epoch + 1) / self.warmup
        by_time = self.clock.seconds / (WARMUP_BUDGET_SHARE * self.budget_s)
        ramp = min(1.0, max(by_steps, by_time))
        return ramp * (self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * self.progress())))

    def _apply(self) -> None:
        f = self.factor()
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            # A frozen group (the encoder under train.freeze_encoder) steps at lr 0: AdamW's decoupled
            # weight decay is scaled by the lr too, so its weights stay exactly as they were.
            group["lr"] = 0.0 if self.last_epoch < group.get("frozen_steps", 0) else base * f

    def step(self) -> None:
        self.last_epoch += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_epoch = int(state["last_epoch"])
        self.base_lrs = list(state["base_lrs"])
        self._apply()
