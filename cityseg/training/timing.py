"""Where a run's wall time went (summary.json's timing fields), cumulative over resumed sessions.

startup_s: process start to the first batch ready (warm-up excluded); warmup_s: compile and capture;
train_s: training steps (data waits included); val_s: validation; checkpoint_s: the time checkpoints
held training up (host copy, waiting on the writer); other_s: the rest (reports, TensorBoard, samples).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# The parts of the wall time that `timing()` reports (other_s is the rest), cumulative over resumed sessions.
TIMED = ("startup_s", "warmup_s", "train_s", "val_s", "checkpoint_s")


class RunTimes:
    def __init__(self, started_at: float | None = None, time_zero: str = "process start") -> None:
        # This session's zero on the perf_counter clock: the process start (training/__init__.py)
        self.t0 = time.perf_counter() if started_at is None else started_at
        self.time_zero = time_zero  # what t0 is, for the summary
        self.times = dict.fromkeys(TIMED, 0.0)  # this session's
        self.times_before = dict.fromkeys(TIMED, 0.0)  # earlier sessions'
        self.elapsed_before = 0.0  # run time of earlier sessions of a resumed run
        self.first_batch_at: float | None = None  # this session's first batch ready: the first step starts

    def load(self, state: dict[str, Any]) -> None:
        """Earlier sessions' times, from a checkpoint."""
        self.elapsed_before = state["elapsed_s"]
        self.times_before = {k: float(state.get("timing", {}).get(k, 0.0)) for k in TIMED}

    def add(self, part: str, seconds: float) -> None:
        self.times[part] += seconds

    @contextmanager
    def counting(self, part: str) -> Iterator[None]:
        """The block's wall time counts as `part` (also when it raises)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.times[part] += time.perf_counter() - t

    def first_batch(self) -> float:
        """This session's first batch is ready: start-up ends (workers and pipelines starting up are
        start-up, not training). Returns the moment."""
        self.first_batch_at = now = time.perf_counter()
        self.times["startup_s"] += now - self.t0 - self.times["warmup_s"]
        return now

    def elapsed(self) -> float:
        """Run time from the process start, earlier sessions of a resumed run included."""
        return self.elapsed_before + time.perf_counter() - self.t0

    def timing(self) -> dict[str, float]:
        """The parts (module docstring), other_s and elapsed_s: the parts add up to elapsed_s."""
        parts = {k: self.times_before[k] + self.times[k] for k in TIMED}
        if self.first_batch_at is None:  # still starting up
            parts["startup_s"] += time.perf_counter() - self.t0 - self.times["warmup_s"]
        elapsed = self.elapsed()
        return {**parts, "other_s": elapsed - sum(parts.values()), "elapsed_s": elapsed}
