"""Run the installed `cityseg-fast` console script as a user does: a separate process, a hard timeout,
and a check that the process exits (within the timeout) and leaves none of the processes it started.

    done = run_cli(["train", "--data", DIR, "--smoke"], timeout=120)
    assert done.returncode == 0, done.output

A command that does not return is a failure naming the command, never a hung test run: on timeout
the whole process session is killed. The command runs in a session of its own, so its DataLoader
workers, torchrun ranks and their children can all be found (by session id) and waited for.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

# The console script pip installed beside this interpreter: what a user's shell runs.
CLI = Path(sys.executable).parent / "cityseg-fast"
# How long a finished command's children may outlive it: a bound on waiting for a leftover, not a
# threshold a correct run comes near (a command ends its children before it exits, so none is left).
# The exit itself is waited for, within the command's hard timeout: a wall-clock limit between the last
# output line and the exit failed correct runs on a loaded machine ("took 10 s to exit").
EXIT_GRACE_S = 60.0
# torchrun's launcher polls its ranks every few seconds and then closes its rendezvous store: on a
# loaded 2-core machine it exits 11-13 s after the ranks' last line (measured).
TORCHRUN_EXIT_GRACE_S = 30.0


@dataclass(frozen=True)
class Finished:
    command: str
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes whose session id is `sid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, session, ...
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


class CliProcess:
    """A started `cityseg-fast ARGS` process whose output is collected line by line."""

    def __init__(self, args: list[str | os.PathLike], *, cwd: Path | None = None,
                 env: dict[str, str] | None = None, program: list[str] | None = None) -> None:
        """`program`: run `program ARGS` instead (e.g. torchrun's launcher), under the same checks."""
        if program is None and not CLI.is_file():
            pytest.fail(f"{CLI} is missing: the tests need the package installed (pip install -e '.[test]')")
        argv = [*(program or [str(CLI)]), *map(str, args)]
        self.command = " ".join(["cityseg-fast"] if program is None else program) + " " + " ".join(map(str, args))
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env={**os.environ, **(env or {})}, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )
        self.last_output = time.monotonic()
        self.exited_at: float | None = None  # when it exited, seen by a thread: a later finish() is not late
        self.waiter = threading.Thread(target=self._wait, daemon=True)
        self.waiter.start()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(s, out), daemon=True)
                        for s, out in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr))]
        for reader in self.readers:
            reader.start()

    def _wait(self) -> None:
        self.proc.wait()
        self.exited_at = time.monotonic()

    def _read(self, stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)
            self.last_output = time.monotonic()

    def tail(self, n: int = 15) -> str:
        return "".join((self.stdout + self.stderr)[-n:])

    def wait_for(self, path: Path, timeout: float = 120.0) -> None:
        """Wait until `path` exists, failing if the process ends first or the time runs out."""
        t0 = time.monotonic()
        while not path.exists():
            if self.proc.poll() is not None:
                pytest.fail(f"`{self.command}` exited ({self.proc.returncode}) before {path} appeared:\n{self.tail()}")
            if time.monotonic() - t0 > timeout:
                self.kill_all()
                pytest.fail(f"{path} did not appear within {timeout:.0f} s of `{self.command}`:\n{self.tail()}")
            time.sleep(0.05)

    def wait_for_output(self, text: str, timeout: float = 120.0) -> None:
        """Wait until a line of output contains `text`."""
        t0 = time.monotonic()
        while not any(text in line for line in self.stdout + self.stderr):
            if self.proc.poll() is not None:
                pytest.fail(f"`{self.command}` exited ({self.proc.returncode}) before printing {text!r}:\n"
                            f"{self.tail()}")
            if time.monotonic() - t0 > timeout:
                self.kill_all()
                pytest.fail(f"`{self.command}` printed no {text!r} within {timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.02)

    def signal(self, signum: int, group: bool = False) -> None:
        """Send `signum` to the command (`group`: to its whole process group, as a terminal's Ctrl-C
        or Slurm's scancel does, DataLoader workers included)."""
        if group:
            os.killpg(self.proc.pid, signum)
        else:
            self.proc.send_signal(signum)

    def kill_all(self) -> None:
        for pid in [self.proc.pid, *session_members(self.proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()

    def finish(self, timeout: float, grace: float = EXIT_GRACE_S) -> Finished:
        """Wait for the exit (at most `timeout` s in all: past it the command hung), then for every
        child to be gone (waiting at most `grace` s after the exit for a leftover)."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            pytest.fail(f"`{self.command}` did not exit within {timeout:.0f} s (hung); last output:\n{self.tail()}")
        self.waiter.join(timeout=5)
        for reader in self.readers:
            reader.join(timeout=5)
        deadline = (self.exited_at or time.monotonic()) + grace
        left = session_members(self.proc.pid)
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = session_members(self.proc.pid)
        if left:
            self.kill_all()
            pytest.fail(f"`{self.command}` left processes {left} running {grace:.0f} s after it exited:\n"
                        f"{self.tail()}")
        return Finished(self.command, self.proc.returncode, "".join(self.stdout), "".join(self.stderr))


def run_cli(args: list[str | os.PathLike], *, timeout: float = 180.0, cwd: Path | None = None,
            env: dict[str, str] | None = None, grace: float = EXIT_GRACE_S) -> Finished:
    """Run `cityseg-fast ARGS` to its end (see `CliProcess.finish`)."""
    return CliProcess(args, cwd=cwd, env=env).finish(timeout, grace)


def torchrun(args: list[str | os.PathLike], *, launcher: list[str] | None = None, timeout: float = 600.0,
             env: dict[str, str] | None = None) -> Finished:
    """`python -m torch.distributed.run LAUNCHER -m cityseg ARGS` to its end, with `run_cli`'s hard
    timeout and leftover-process check (the ranks and their loader workers included)."""
    program = [sys.executable, "-m", "torch.distributed.run", *(launcher or ["--standalone", "--nproc-per-node=2"]),
               "-m", "cityseg"]
    return CliProcess(args, env=env, program=program, cwd=Path(__file__).resolve().parents[1]).finish(
        timeout, grace=TORCHRUN_EXIT_GRACE_S)


def run_in_process(args: list[str | os.PathLike]) -> Finished:
    """`cityseg-fast ARGS` inside this process (typer's CliRunner, the same app and error handling):
    for the many inputs of a command whose behaviour as a process `run_cli` already proves with one
    of them. Exit status, stdout and stderr as `run_cli` gives them; an exception that escapes the app
    is appended to stderr as its traceback, so `assert_one_line` fails on it as on a process's."""
    import traceback

    from typer.testing import CliRunner

    from cityseg.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return Finished("cityseg-fast " + " ".join(map(str, args)), result.exit_code, result.stdout, stderr)


def assert_one_line(done: Finished, *fragments: str, code: int = 2) -> None:
    """Exit `code`, exactly one `error:` line holding every fragment, no traceback."""
    assert done.returncode == code, done.output
    assert "Traceback" not in done.output, done.output
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, done.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
