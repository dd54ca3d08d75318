"""The training clock that the time budget, the LR schedule and --target-acc read: training seconds,
validation, checkpoints and warm-up excluded. One process: its own measured time. Under DDP it must
be the same number on every rank (else ranks would use different learning rates or stop at
different steps, and diverge or hang): between log steps it advances by the step time agreed at the
last one, and each log step sets it to the slowest rank's time."""

from __future__ import annotations

from collections.abc import Callable

import torch

from cityseg.distributed import DistInfo, max_over_ranks
from cityseg.training.schedule import TrainClock


class SyncedClock:
    def __init__(self, clock: TrainClock, tick: Callable[[], float], dist: DistInfo, device: torch.device) -> None:
        self.clock, self.tick, self.dist, self.device = clock, tick, dist, device
        self.real_seconds = self.synced_seconds = 0.0  # this rank's measured training time; its last agreed value
        self.step_estimate, self.steps_since_sync = 0.0, 0
        self.last = 0.0  # the tick the running step started at

    def resume(self, seconds: float) -> None:
        self.clock.seconds = self.real_seconds = self.synced_seconds = seconds

    def start(self) -> None:
        """Training (re)starts now: what passed since the last step is not training."""
        self.last = self.tick()

    def step_done(self, log_step: bool) -> None:
        """A step ended: its time is added, and on the clock (agreed between ranks on log steps)."""
        now = self.tick()
        self.real_seconds += now - self.last
        self.last = now
        if not self.dist.enabled:
            self.clock.seconds = self.real_seconds
            return
        self.steps_since_sync += 1
        if not log_step:
            self.clock.seconds += self.step_estimate
            return
        synced = max_over_ranks(self.real_seconds, self.dist, self.device)
        self.step_estimate = max(0.0, synced - self.synced_seconds) / self.steps_since_sync
        self.clock.seconds = self.synced_seconds = synced
        self.steps_since_sync = 0
