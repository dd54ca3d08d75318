"""Checkpoint writes, off the training thread: a host copy of the state goes to a background writer
(cityseg/checkpoint.py's `CheckpointWriter`: temp file, then rename), and the time that held training
up counts as checkpoint_s. One rank writes: every rank holds the same weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cityseg.checkpoint import CheckpointWriter, weights_only_state
from cityseg.training.setup import TrainingError
from cityseg.training.timing import RunTimes


class CheckpointSaver:
    def __init__(self, state: Callable[[], dict[str, Any]], is_main: bool, times: RunTimes) -> None:
        self.state, self.is_main, self.times = state, is_main, times
        self.writer = CheckpointWriter(self.write_error)

    def save(self, path: Path, weights_only: bool = False) -> None:
        """Hand a host copy of the state to the background writer (the previous write of `path` is
        waited for first): the device waits only for that copy. `weights_only`: what best.pt needs."""
        if not self.is_main:  # every rank holds the same weights; one writer
            return
        with self.times.counting("checkpoint_s"):
            state = self.state()
            self.writer.submit(weights_only_state(state) if weights_only else state, path)

    def finish(self) -> None:
        """Wait for every write: on disk when this returns, or a TrainingError says why not."""
        with self.times.counting("checkpoint_s"):
            self.writer.join()

    @staticmethod
    def write_error(path: Path, e: BaseException) -> TrainingError:
        """torch.save reports a full disk as a RuntimeError ("unexpected pos"), the OS as an OSError."""
        lines = str(e).splitlines()
        strerror = getattr(e, "strerror", None)  # the OS names its reason; torch.save's own error does not
        reason = strerror or f"{lines[0][:160] if lines else type(e).__name__}; disk full?"
        return TrainingError(f"{path}: could not write checkpoint ({reason}); the previous checkpoint is kept")
