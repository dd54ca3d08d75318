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


def main() -> NoReturn:  # console entry point
    try:
        app(prog_name="cityseg-fast")
        code: object = 0
    except SystemExit as e:  # typer ends every command this way
        code = e.code
    exit_now(code)


def exit_now(code: object) -> NoReturn:
    """End the command as the interpreter would, minus its teardown: the other threads are joined, the
    atexit handlers run (logging, multiprocessing's children) and the streams flushed, then the process
    exits at once. Tearing down torch, matplotlib and TensorBoard's modules took 3-8 s after the last
    line of a finished run (measured on 2 loaded cores), with every file already written and closed."""
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    if code is not None and not isinstance(code, int):  # SystemExit("message"): printed, status 1
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more can be said
            stream.flush()
    os._exit(code or 0)


__all__ = ["app", "main"]
