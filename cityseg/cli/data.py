"""Data commands: `check-data` and `synth`.

    cityseg-fast check-data DIR
    cityseg-fast synth --out data/synth --train 2975 --val 500
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from cityseg.cli.choices import FORMAT_HELP, DataFormat
from cityseg.cli.common import app, console, err_console, fail
from cityseg.errors import UserError
from cityseg.options import SYNTH_WORKERS, check_options


@app.command("check-data")
def check_data(
    data: Annotated[Path, typer.Argument(help="Dataset folder: Kaggle pairs (train/, val/; or the unpacked "
                                         "archive above it), images/ + masks/, or leftImg8bit/ + gtFine/.")],
    threads: Annotated[int, typer.Option("--threads", "--workers", help=(
        "Threads decoding files (--workers: its older name, until the next release)."))] = 4,
    sample: Annotated[int, typer.Option(help="Files per split whose mask colours are measured.")] = 50,
    far_dist: Annotated[float, typer.Option("--far-dist", "--max-color-dist", help=(
        "Report the share of mask pixels farther than this (RGB) from every palette colour (--max-color-dist: "
        "its older name, until the next release; train's --max-color-dist ignores such pixels)."))] = 30.0,
    data_format: Annotated[DataFormat, typer.Option("--format", help=FORMAT_HELP)] = DataFormat("auto"),
) -> None:
    """Validate every sample of train/ and val/ (any layout), print a summary, exit 1 listing every bad file."""
    check_options({"sample": sample, "far_dist": far_dist})
    check_options({"threads": threads})
    from cityseg.data.check import check_dataset

    try:
        report = check_dataset(data, workers=threads, sample=sample, max_dist=far_dist, fmt=data_format.value)
    except UserError as e:  # the folder itself is unusable: exit 1, as for bad files
        fail(str(e), code=1)
    if report.note:
        console.print(report.note, soft_wrap=True)
    console.print(report.table())
    for warning in report.warnings:
        err_console.print(warning, style="yellow", soft_wrap=True)
    if report.bad:
        for error in report.bad:
            err_console.print(str(error), soft_wrap=True)
        err_console.print(f"{len(report.bad)} bad file(s)")
        raise typer.Exit(1)
    what = "pair" if report.format == "pairs" else "photo with its label"
    console.print(Text.assemble(("ok", "bold green"), f": every file is a valid {what}"))


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Output folder (gets train/ and val/): new, empty, or a set this "
                                      "command wrote before (it is rewritten).")],
    train_pairs: Annotated[int, typer.Option("--train", help="Number of train pairs.")] = 2975,
    val_pairs: Annotated[int, typer.Option("--val", help="Number of val pairs.")] = 500,
    seed: Annotated[int, typer.Option(help="Seed: the same seed writes byte-identical files.")] = 0,
    pair_size: Annotated[int, typer.Option("--size", help="Height of a pair (width is twice this).")] = 256,
    workers: Annotated[int, typer.Option(help="Processes writing pairs.")] = 1,
) -> None:
    """Write a synthetic Cityscapes-like dataset in the Kaggle pair format."""
    check_options({"train_pairs": train_pairs, "val_pairs": val_pairs, "seed": seed, "pair_size": pair_size})
    check_options({"workers": workers}, SYNTH_WORKERS)
    from cityseg.data.synth import write_dataset

    t = time.perf_counter()
    write_dataset(out, train_pairs, val_pairs, seed, size=pair_size, workers=workers)
    seconds = time.perf_counter() - t
    console.print(f"wrote {train_pairs} train + {val_pairs} val pairs to {out} in {seconds:.1f} s "
                  f"({(train_pairs + val_pairs) / seconds:.0f} pairs/s)", soft_wrap=True)
