"""Fault injection for process tests, with this folder on PYTHONPATH, in this process and any it starts:

- $CITYSEG_TEST_FULL_DISK: every file whose name contains it opens as usual but each write to it
  fails as a full disk does (ENOSPC, and no file name in the error: the OS does not give one).
- $CITYSEG_TEST_SIGNAL=SIGNAL:TARGET:WHERE:PART:N sends SIGNAL (SIGTERM, SIGINT, SIGHUP) to TARGET
  (`parent`: the command, the session leader; `group`: its whole process group, loader workers
  included, as Slurm and a closed terminal do) when a process of kind WHERE (`main`, `worker`: a
  loader worker) opens a file whose path contains PART for the Nth time: a signal placed at a moment
  of the run (a train image read: training; a val image: validation; `.last.pt.`: a checkpoint
  write), not after a guessed sleep. It fires once in all: $CITYSEG_TEST_SIGNAL_MARK is created
  then, holding time.monotonic() (system-wide on Linux: the test measures the time to the exit).
  Several moments joined by `+` (SIGNAL:TARGET:WHERE:PART:N+WHERE:PART:N) send one signal each, in
  the order the run reaches them (a second Ctrl-C while the first is honoured); the k-th (k > 0)
  marks $CITYSEG_TEST_SIGNAL_MARK.k.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import signal
import sys
import time

MARK = os.environ.get("CITYSEG_TEST_FULL_DISK", "")
_open = io.open


class FullDisk:
    """A file object whose writes fail; everything else is the real file's."""

    def __init__(self, file) -> None:  # noqa: ANN001 - any file object
        self._file = file

    def write(self, data) -> int:  # noqa: ANN001
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def writelines(self, lines) -> None:  # noqa: ANN001
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._file, name)

    def __enter__(self) -> FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def __iter__(self):  # noqa: ANN204
        return iter(self._file)


def full_disk_open(file, mode="r", *args, **kwargs):  # noqa: ANN001, ANN201
    opened = _open(file, mode, *args, **kwargs)
    writing = any(c in mode for c in "wax+")
    if MARK and writing and isinstance(file, (str, bytes, os.PathLike)) and MARK in os.fsdecode(file):
        return FullDisk(opened)
    return opened


if MARK:
    builtins.open = io.open = full_disk_open


SIGNAL_AT = os.environ.get("CITYSEG_TEST_SIGNAL", "")
SIGNAL_MARK = os.environ.get("CITYSEG_TEST_SIGNAL_MARK", "")
_opens: dict[int, int] = {}  # trigger -> opens counted in this process
_inside = False


def _triggers() -> tuple[str, str, list[tuple[str, str, int]]]:
    name, target, rest = SIGNAL_AT.split(":", 2)
    moments = []
    for moment in rest.split("+"):
        where, part, nth = moment.split(":")
        moments.append((where, part, int(nth)))
    return name, target, moments


def _signal_on_open(event: str, args: tuple) -> None:
    global _inside
    if event != "open" or _inside or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    name, target, moments = _triggers()
    is_main = os.getpid() == os.getsid(0)  # the command runs in a session of its own (tests/cli_process.py)
    for k, (where, part, nth) in enumerate(moments):
        if (where == "main") != is_main or part not in os.fsdecode(args[0]):
            continue
        _opens[k] = _opens.get(k, 0) + 1
        if _opens[k] != nth:
            continue
        _inside = True  # the mark's own open must not count
        try:
            fd = os.open(SIGNAL_MARK + (f".{k}" if k else ""), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:  # another process fired first
            continue
        finally:
            _inside = False
        os.write(fd, repr(time.monotonic()).encode())
        os.close(fd)
        signum = getattr(signal, name)
        if target == "group":
            os.killpg(os.getpgid(0), signum)
        else:
            os.kill(os.getsid(0), signum)


if SIGNAL_AT and SIGNAL_MARK:
    sys.addaudithook(_signal_on_open)
