"""Progress of a loop of steps: a live Rich bar in a terminal, plain lines everywhere else.

Under Slurm, `| tee`, CI or a notebook's captured output a live bar shows nothing until it ends, so
when the console is not a terminal every `log` step prints one line (what torchvision's
`MetricLogger` does):

    epoch 2/8 step 140/371  loss 0.812  14.2 img/s  wait 3%  gpu n/a  eta 0:00:16
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from types import TracebackType

from rich.console import Console, RenderableType
from rich.constrain import Constrain
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def format_eta(seconds: float | None) -> str:
    return "?" if seconds is None else str(timedelta(seconds=round(max(0.0, seconds))))


# Start-up stages (synthetic data, lookup table, file checks, warm-up) are said on the console of the
# command that runs (`startup_console`); the library, quiet unless asked, says nothing.
_STARTUP: list[Console] = []


@contextmanager
def startup_console(console: Console) -> Iterator[None]:
    """While inside, `say` and `stage` print on `console` (a command's, or a verbose library run's)."""
    _STARTUP.append(console)
    try:
        yield
    finally:
        _STARTUP.remove(console)


def say(text: str) -> None:
    """One "start-up: ..." line, so a user never waits in silence for work done once before training."""
    if _STARTUP:
        _STARTUP[-1].print(f"start-up: {text}", markup=False, highlight=False, soft_wrap=True)


@contextmanager
def stage(what: str, expect: str = "") -> Iterator[None]:
    """Say what starts (and how long it should take), then how long it took."""
    say(f"{what}{f' ({expect})' if expect else ''} ...")
    t = time.perf_counter()
    yield
    say(f"{what}: done in {time.perf_counter() - t:.1f} s")


class Counter:
    """A count said every `every` seconds (at most) with its ETA: `count.add(n)` as items finish."""

    def __init__(self, what: str, total: int, every: float = 5.0) -> None:
        self.what, self.total, self.every = what, total, every
        self.done, self.t0 = 0, time.perf_counter()
        self.last = self.t0

    def add(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            eta = (self.total - self.done) * (now - self.t0) / self.done
            say(f"{self.what}: {self.done:,}/{self.total:,}, eta {format_eta(eta)}")


# Columns a live bar leaves free at the right: a terminal echoes Ctrl-C as "^C" where the cursor is,
# at the end of the bar's line; on a full-width line that wraps, the bar's next redraw lands one line
# lower, and the bar shows twice.
ECHO_ROOM = 3


class _NarrowProgress(Progress):
    def get_renderable(self) -> RenderableType:
        renderable = super().get_renderable()
        live = getattr(self, "live", None)  # None while Progress.__init__ builds its Live
        return renderable if live is None else Constrain(renderable, width=max(20, live.console.width - ECHO_ROOM))


class StepProgress:
    """`with StepProgress(console, "epoch 1/8", total=371, done=0) as bar: bar.step(done, status, log)`."""

    def __init__(self, console: Console, title: str, total: int, done: int = 0, own_eta: bool = True) -> None:
        """`own_eta=False`: the caller puts the one ETA that matters in `status` (training shows the
        run's, not the epoch's: two disagreeing ETAs on one line left users guessing)."""
        self.console, self.title, self.total, self.own_eta = console, title, total, own_eta
        self.start_done, self.t0 = done, time.perf_counter()
        self.bar: Progress | None = None
        if console.is_terminal:
            self.bar = _NarrowProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"), *([TimeRemainingColumn()] if own_eta else []), console=console,
                transient=False,
            )
            self.task = self.bar.add_task(escape(title), total=total, completed=done, status="")

    def __enter__(self) -> StepProgress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.bar is not None:
            self.bar.stop()

    def eta(self, done: int) -> float | None:
        """Seconds left at this call's pace (steps done since this bar started)."""
        steps = done - self.start_done
        if steps <= 0:
            return None
        return (self.total - done) * (time.perf_counter() - self.t0) / steps

    def step(self, done: int, status: str, log: bool = False) -> None:
        """`done` steps of `total` are done; `status` (e.g. loss and images/s) is shown live in a
        terminal, and printed as a plain line on `log` steps otherwise."""
        if self.bar is not None:
            self.bar.update(self.task, completed=done, status=status)
        elif log:
            eta = f"  eta {format_eta(self.eta(done))}" if self.own_eta else ""
            self.console.print(f"{self.title} step {done}/{self.total}  {status}{eta}",
                               markup=False, highlight=False, soft_wrap=True)
