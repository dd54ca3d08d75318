"""The one base of every error the user can fix: a bad file, folder, option, checkpoint or an
impossible request. The CLI prints `str(error)` as a single line (no traceback) and exits 2 (1 for
`check-data`'s findings); any other exception is a bug and keeps its traceback.

This module imports nothing of the package, so every layer (kernels aside) can raise these. It also
holds what a signal raises outside the training loop (`InterruptedNow`, `signals_raise`).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator


class UserError(Exception):
    """A problem the user can fix; str(error) is one line naming the file or option and the problem."""


class OptionError(UserError):
    """A command-line option or config value outside what it may be."""


class OutputError(UserError):
    """An output path that cannot be written, or that holds something we must not overwrite."""


MAX_LINE = 1000  # characters of an error line: a megabyte-long value in a file must not flood the terminal


def capped(text: str, limit: int = MAX_LINE) -> str:
    """`text` on one line and at most about `limit` characters (its start and end kept)."""
    text = " ".join(str(text).splitlines())
    if len(text) <= limit:
        return text
    return f"{text[: limit * 3 // 4]} ... {text[-limit // 4:]} ({len(text)} characters)"


# The signals that stop a command the way Ctrl-C does: a terminal's Ctrl-C, `kill`/Slurm/Kubernetes/
# systemd, and a closed terminal or dropped SSH session.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class InterruptedNow(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP that ends the command at once: at start-up, during the warm-up, at
    the end of a run, in a command without a loop to stop, or a second signal. Inside the training
    loop the first signal is a flag instead (last.pt is saved); a checkpoint save defers them until
    its file is whole."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        """130 for Ctrl-C (SIGINT), 128 + the number for the others (143 for SIGTERM, 129 for SIGHUP),
        as a shell reports."""
        return 128 + self.signum


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise `InterruptedNow` in the main thread while the block runs
    (SIGTERM and SIGHUP would otherwise kill the process without a word); the previous handlers come
    back after."""

    def handler(signum, frame):  # noqa: ARG001
        quiet_if_terminal_gone(signum)
        raise InterruptedNow(signum)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def quiet_if_terminal_gone(signum: int) -> None:
    """After SIGHUP (the terminal closed, the SSH session dropped) a write to that terminal fails
    (EIO) and would turn an orderly stop into a traceback: stdout and stderr that were the terminal
    now go to /dev/null. Output redirected to a file or a pipe keeps going there."""
    if signum != signal.SIGHUP:
        return
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            if os.isatty(fd):
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, fd)
                os.close(null)
