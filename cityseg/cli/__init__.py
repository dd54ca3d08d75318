"""The `cityseg-fast` command line (a typer app; `python -m cityseg` runs the same, as torchrun needs).

    cityseg-fast train                      # synthetic city data, CPU-sized preset, ~5 min on 2 cores
    cityseg-fast train --data DIR           # Kaggle pairs: DIR/train/*.jpg, DIR/val/*.jpg
    cityseg-fast check-data DIR
    cityseg-fast synth --out DIR --train 2975 --val 500
    cityseg-fast eval --ckpt runs/X/checkpoints/best.pt --data DIR
    cityseg-fast predict --ckpt runs/X/checkpoints/best.pt photos/ --out predictions/
    cityseg-fast export --ckpt runs/X/checkpoints/best.pt --format onnx --out unet.onnx
    cityseg-fast profile --steps 20 [train options]
    cityseg-fast bench loader --data DIR

One module per group of commands; each imports torch only inside the command that runs, so `--help`
and option errors answer at once.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from typing import Annotated, NoReturn

import typer

from cityseg.cli import data, train, use  # noqa: F401 - importing a command module registers its commands
from cityseg.cli.bench import bench_app
from cityseg.cli.common import app, console

app.add_typer(bench_app, name="bench")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"cityseg-fast {version('cityseg-fast')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Fast U-Net training for Cityscapes-style street-scene segmentation (DALI + Triton + PyTorch)."""


SIGNAL_EXITS = (129, 130, 143)  # 128 + SIGHUP, SIGINT, SIGTERM: what a command stopped by a signal returns


def main() -> NoReturn:  # console entry point
    try:
        app(prog_name="cityseg-fast")
        code: object = 0
    except SystemExit as e:  # typer ends every command this way
        code = e.code
    if code in SIGNAL_EXITS:
        exit_at_once(code)
    exit_now(code)


def exit_now(code: object) -> NoReturn:
    """End the command as the interpreter would, minus its teardown: threading's shutdown (its exit hooks
    wake idle thread-pool workers, e.g. inductor's compile pool, then every other non-daemon thread is
    joined: joining them without the hooks waits forever on an idle pool), the atexit handlers
    (logging, multiprocessing's children) and the streams flushed, then the process exits at once.
    Tearing down torch, matplotlib and TensorBoard's modules took 3-8 s after the last line of a
    finished run (measured on 2 loaded cores), with every file already written and closed."""
    threading._shutdown()  # what Py_FinalizeEx does first
    atexit._run_exitfuncs()
    if code is not None and not isinstance(code, int):  # SystemExit("message"): printed, status 1
        print(code, file=sys.stderr)
        code = 1
    flush_output()
    os._exit(code or 0)


def exit_at_once(code: int) -> NoReturn:
    """End a command that a signal stopped without waiting on threads or exit handlers: everything is on
    disk and the loader workers are gone by now, and torch's exit handlers alone take seconds on a
    loaded machine, seconds that a scheduler's SIGKILL (30 s after its SIGTERM) does not give. Child
    processes still alive (a pool a command did not end) are ended and waited for, and the output is
    flushed."""
    import multiprocessing

    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout=2)
    flush_output()
    os._exit(code)


def flush_output() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe, a terminal gone after SIGHUP
            stream.flush()


__all__ = ["app", "main"]
