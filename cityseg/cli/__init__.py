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

from typing import Annotated

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


def main() -> None:  # console entry point
    app(prog_name="cityseg-fast")


__all__ = ["app", "main"]
