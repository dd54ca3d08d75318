"""`cityseg-fast bench ...`: the scripts of benchmarks/ from the command line, run in this process.

    cityseg-fast bench loader --data DIR [--json OUT.json]   # images/s per loader, ratios to the plain one
    cityseg-fast bench kernel [--json OUT.json]              # mask -> class ids: Triton / lookup table / torch
    cityseg-fast bench train [--json OUT.json]               # U-Net step time: fp32, channels-last, bf16, compile
    cityseg-fast bench e2e --data DIR [--json OUT.json]      # N steps of real training per loader
    cityseg-fast bench accuracy --data DIR --budget 20m      # time to accuracy of named recipes
    cityseg-fast bench all --data DIR [--json OUT_DIR]       # all four, then the report
    cityseg-fast bench report                                # benchmarks/results/*.json -> REPORT.md + PNG

Results default to benchmarks/results/<name>-<cpu|gpu>.json. Options after the listed ones go to the
script unchanged (`python benchmarks/loader.py --help` lists them all). The benchmarks live in the
source checkout beside this package (an editable install), not in the installed wheel.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from cityseg.outputs import new_output_file, user_path

ROOT = Path(__file__).resolve().parents[2]
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}

bench_app = typer.Typer(
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    help="Benchmarks: loaders, mask kernel, train step, end to end; JSON under benchmarks/results/.",
)


def _script(name: str):
    """The module benchmarks.<name> of the source checkout (not on sys.path when installed)."""
    if not (ROOT / "benchmarks" / "common.py").is_file():
        typer.echo(f"error: no benchmarks/ folder beside {Path(__file__).parent}: bench needs the source "
                   "checkout (pip install -e .)", err=True)  # fmt: skip
        raise typer.Exit(2)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import importlib

    return importlib.import_module(f"benchmarks.{name}")


def _opt(flag: str, value) -> list[str]:
    return [] if value is None else [flag, str(value)]


def _run(name: str, argv: list[str]) -> None:
    typer.echo("$ python benchmarks/" + name + ".py " + " ".join(argv))
    _script(name).run(argv)


DataOpt = Annotated[Path | None, typer.Option(help="Kaggle pair folder (DIR/train, DIR/val); default: synthetic "
                                              "pairs generated in a temp folder.")]  # fmt: skip
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Result file (default "
                                              "benchmarks/results/<name>-<cpu|gpu>.json).")]  # fmt: skip


@bench_app.command(context_settings=PASS_THROUGH)
def loader(
    ctx: typer.Context,
    data: DataOpt = None,
    json_out: JsonOpt = None,
    n: Annotated[int, typer.Option(help="Images per epoch (the first N train files).")] = 256,
    augment: Annotated[str, typer.Option(help="Comma list of: standard, none.")] = "standard",
    workers: Annotated[str | None, typer.Option(help="Plain-loader worker counts, e.g. 0,2,4,8 "
                                                "(default 0, 1, 2, ... cores).")] = None,  # fmt: skip
    reps: Annotated[int, typer.Option(help="Timed epochs per loader (median reported).")] = 5,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 32,
) -> None:
    """Images/s of each loader (plain with 0..N workers, DALI CPU/GPU, device cache) on the same files."""
    argv = [*_opt("--data", data), *_opt("--json", json_out), "--n", str(n), "--augment", augment,
            *_opt("--workers", workers), "--reps", str(reps), "--batch-size", str(batch_size), *ctx.args]  # fmt: skip
    _run("loader", argv)


def kernel_json(json_out: Path | None, cpu_only: bool, overwrite: bool) -> Path:
    """Where `bench kernel` writes: --json resolved against the user's folder (not the checkout the
    script runs from), as a new file unless --overwrite. Without --json: the checkout's
    benchmarks/results/ when run from inside the checkout (its published figures, meant to be
    refreshed), else mask_kernel-<cpu|gpu>.json in the current folder."""
    if json_out is None:
        import torch

        name = f"mask_kernel-{'gpu' if torch.cuda.is_available() and not cpu_only else 'cpu'}.json"
        cwd = Path.cwd().resolve()
        if cwd == ROOT or ROOT in cwd.parents:
            return ROOT / "benchmarks" / "results" / name
        json_out = Path(name)
    return new_output_file(user_path(json_out), "benchmark result", overwrite=overwrite)


@bench_app.command(context_settings=PASS_THROUGH)
def kernel(
    ctx: typer.Context,
    json_out: JsonOpt = None,
    full: Annotated[bool, typer.Option(help="Also batch 256.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the result file if it exists.")] = False,
) -> None:
    """Mask -> class ids: Triton vs torch on a GPU; lookup table vs reference vs cdist on a CPU."""
    _script("common")  # the checkout must be there
    out = kernel_json(json_out, "--cpu" in ctx.args, overwrite)
    # mask_kernel.py reads sys.argv itself: run it as its own process, in the user's folder.
    argv = ["--json", str(out), *(["--full"] if full else []), *ctx.args]
    typer.echo("$ python benchmarks/mask_kernel.py " + " ".join(argv))
    rc = subprocess.call([sys.executable, str(ROOT / "benchmarks" / "mask_kernel.py"), *argv], cwd=os.getcwd())
    if rc:
        raise typer.Exit(rc)


@bench_app.command(context_settings=PASS_THROUGH)
def train(
    ctx: typer.Context,
    json_out: JsonOpt = None,
    widths: Annotated[str, typer.Option(help="Comma list of U-Net widths.")] = "32,64",
    batch: Annotated[int | None, typer.Option(help="Batch size (default 16 GPU, 4 CPU).")] = None,
    size: Annotated[int | None, typer.Option(help="Image side (default 256 GPU, 128 CPU).")] = None,
    quick: Annotated[bool, typer.Option(help="Tiny sizes and the eager compile backend: a smoke test.")] = False,
) -> None:
    """The training step (product recipe): images/s, ms/step, TFLOP/s over batch x width x compile mode."""
    argv = [*_opt("--json", json_out), "--widths", widths, *_opt("--batch", batch), *_opt("--size", size),
            *(["--quick"] if quick else []), *ctx.args]  # fmt: skip
    _run("train_step", argv)


@bench_app.command(context_settings=PASS_THROUGH)
def e2e(
    ctx: typer.Context,
    data: DataOpt = None,
    json_out: JsonOpt = None,
    steps: Annotated[int, typer.Option(help="Training steps per loader.")] = 20,
    loaders: Annotated[str, typer.Option(help="Comma list of: torch, dali, cache.")] = "torch,dali,cache",
) -> None:
    """N steps of real training per loader: images/s, data wait, GPU util, first batch, compile time."""
    argv = [*_opt("--data", data), *_opt("--json", json_out), "--steps", str(steps), "--loaders", loaders, *ctx.args]
    _run("end_to_end", argv)


@bench_app.command(context_settings=PASS_THROUGH)
def accuracy(
    ctx: typer.Context,
    data: Annotated[Path, typer.Option(help="Kaggle pair folder (DIR/train, DIR/val).")],
    json_out: JsonOpt = None,
    budget: Annotated[str, typer.Option(help="Training time per recipe: seconds, or with s/m/h.")] = "20m",
    recipes: Annotated[str, typer.Option(help="Comma list of recipe names (`python benchmarks/accuracy.py "
                                         "--list`).")] = "baseline,improved",  # fmt: skip
    clock: Annotated[str, typer.Option(help="wall | cpu: what a training second is (cpu: fair on a shared "
                                       "machine).")] = "wall",  # fmt: skip
) -> None:
    """Time to accuracy: named recipes under one training budget; val pixel acc and mIoU against seconds."""
    argv = ["--data", str(data), *_opt("--json", json_out), "--budget", budget, "--recipes", recipes, "--clock", clock,
            *ctx.args]  # fmt: skip
    _run("accuracy", argv)


@bench_app.command()
def report(
    results: Annotated[Path | None, typer.Option(help="Folder of result JSON files (default "
                                                 "benchmarks/results).")] = None,  # fmt: skip
    out: Annotated[Path | None, typer.Option(help="Markdown output (default RESULTS/REPORT.md).")] = None,
) -> None:
    """Every result JSON -> one markdown report (CPU and GPU apart) and a bar chart of loader images/s."""
    _script("report").main([*_opt("--results", results), *_opt("--out", out)])


@bench_app.command("all")
def run_all(
    data: DataOpt = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Folder for the result files (default "
                                                  "benchmarks/results).")] = None,  # fmt: skip
) -> None:
    """loader, kernel, train, e2e with their defaults, then the report of the result folder."""
    common = _script("common")
    import torch

    kind = common.device_kind(common.pick_device())
    folder = user_path(json_out) if json_out else common.RESULTS  # the subprocess below runs elsewhere
    folder.mkdir(parents=True, exist_ok=True)
    _run("loader", [*_opt("--data", data), "--json", str(folder / f"loader-{kind}.json")])
    kernel_json = folder / f"mask_kernel-{'gpu' if torch.cuda.is_available() else 'cpu'}.json"
    rc = subprocess.call([sys.executable, str(ROOT / "benchmarks" / "mask_kernel.py"), "--json", str(kernel_json)],
                         cwd=ROOT)  # fmt: skip
    if rc:
        raise typer.Exit(rc)
    _run("train_step", ["--json", str(folder / f"train_step-{kind}.json")])
    _run("end_to_end", [*_opt("--data", data), "--json", str(folder / f"end_to_end-{kind}.json")])
    _script("report").main(["--results", str(folder)])
