"""Signals (SIGINT, SIGTERM, SIGHUP) during training: `graceful_interrupts` turns them into a flag,
`Signals` is the loop's view of it. The step in flight finishes (a validation or a wait for the next
batch is cut at once), last.pt is saved with the record not yet scored, and `--resume` scores it
first: a scheduler's SIGKILL, 30 s after its SIGTERM, finds nothing left to lose."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from cityseg.distributed import DistInfo, any_rank
from cityseg.errors import STOP_SIGNALS, InterruptedNow, quiet_if_terminal_gone

EXIT_INTERRUPTED = 130


class Interrupted(Exception):
    """Ctrl-C / SIGTERM / SIGHUP: the step finished, last.pt is saved."""

    def __init__(self, run_dir: Path, signum: int) -> None:
        self.run_dir, self.signum = run_dir, signum
        super().__init__(f"interrupted; resume with: cityseg-fast train --resume {run_dir}")


class ValidationStopped(Exception):
    """A signal arrived during validation: it is abandoned (`--resume` scores the record)."""


class WaitCut(Exception):
    """A signal arrived while the loop waited for the next training batch: the epoch ends there."""


def new_flag() -> dict[str, Any]:
    return {"signum": None, "immediate": False, "cut": None}


class Signals:
    """The flag of `graceful_interrupts`, as the loop reads it. Under DDP every rank must stop at the
    same step: a vote (`requested`, a collective) decides, and nothing is cut mid-way."""

    def __init__(self, flag: dict[str, Any], dist: DistInfo, device: torch.device) -> None:
        self.flag, self.dist, self.device = flag, dist, device

    @property
    def signum(self) -> int | None:
        """The signal this rank received, if any."""
        return self.flag["signum"]

    def requested(self) -> bool:
        """Ctrl-C/SIGTERM/SIGHUP seen by any rank; every rank must call this at the same step."""
        return any_rank(self.signum is not None, self.dist, self.device)

    @contextmanager
    def at_once(self) -> Iterator[None]:
        """In the block (the warm-up: nothing new to save, and one compile may take minutes) a signal
        stops at once; one that came before it stops before it."""
        if self.signum is not None:
            raise InterruptedNow(self.signum)
        self.flag["immediate"] = True
        try:
            yield
        finally:
            self.flag["immediate"] = False

    @contextmanager
    def cut_by(self, cut: type[Exception]) -> Iterator[None]:
        """In the block a signal raises `cut` at once, one process only."""
        if self.dist.enabled:
            yield
            return
        if self.signum is not None:
            raise cut
        self.flag["cut"] = cut
        try:
            yield
        finally:
            self.flag["cut"] = None

    def cut_from_now(self, cut: type[Exception]) -> None:
        """One process: from now on a signal raises `cut` at once, until `uncut`."""
        if not self.dist.enabled:
            self.flag["cut"] = cut

    def uncut(self) -> None:
        self.flag["cut"] = None


def children_ending(signum: int, frame: Any) -> None:  # noqa: ARG001
    """SIGCHLD after a stop: loader workers ending are expected (their exit is reaped by their owner)."""


@contextmanager
def graceful_interrupts() -> Iterator[dict[str, Any]]:
    """Turn SIGINT/SIGTERM/SIGHUP into a flag the loop checks after each step and each validation
    batch, so the step in flight finishes and last.pt is saved instead of dying mid-update. While
    `flag["immediate"]` is set (the warm-up: nothing new to save, and a compile may take minutes)
    a signal stops at once, as a second one always does. While `flag["cut"]` holds an exception
    class (a wait for the next batch, a validation: nothing there needs finishing) the signal
    raises it at once: a loader whose workers the same signal ended would keep the loop waiting
    seconds for them."""
    flag = new_flag()

    def handler(signum, frame):  # noqa: ARG001
        quiet_if_terminal_gone(signum)
        if flag["signum"] is not None or flag["immediate"]:  # a second Ctrl-C means now
            raise InterruptedNow(signum)
        flag["signum"] = signum
        # From now on a loader worker ending (the same signal reached it) is expected, not a failure:
        # torch's SIGCHLD check would raise it in the middle of saving last.pt. A Python no-op rather
        # than SIG_DFL: a SIGCHLD already pending when the handler changes then finds a handler to run
        # (with SIG_DFL, CPython prints "Signal 17 ignored due to race condition" with a traceback).
        signal.signal(signal.SIGCHLD, children_ending)
        if flag["cut"] is not None:
            raise flag["cut"]()

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    previous[signal.SIGCHLD] = signal.getsignal(signal.SIGCHLD)  # torch's, when a loader started
    try:
        yield flag
    finally:
        for s, h in previous.items():
            if h is not None:  # None: installed outside Python, left alone
                signal.signal(s, h)
