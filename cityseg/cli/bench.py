"""`cityseg-fast bench NAME ARGS...`: the benchmarks of benchmarks/, run in this process.

Every argument after NAME goes unchanged to the benchmark module's own command line, so
`cityseg-fast bench loader ARGS` is `python -m benchmarks.loader ARGS` run from the checkout's root,
and `cityseg-fast bench loader --help` is that module's help. No option is declared here: each
benchmark owns its options, their defaults and where its results go (benchmarks/common.py).

    cityseg-fast bench loader --data DIR [--json OUT.json]   # images/s per loader, ratios to the plain one
    cityseg-fast bench kernel [--json OUT.json]              # mask -> class ids: Triton / lookup table / torch
    cityseg-fast bench train [--json OUT.json]               # U-Net step time: batch x width x compile mode
    cityseg-fast bench e2e --data DIR [--json OUT.json]      # N steps of real training per loader
    cityseg-fast bench accuracy --data DIR --budget 20m      # time to accuracy of named recipes
    cityseg-fast bench all --data DIR [--json OUT_DIR]       # loader, kernel, train, e2e, then the report
    cityseg-fast bench report                                # benchmarks/results/*.json -> REPORT.md + PNG

The benchmarks live in the source checkout beside this package (an editable install), not in the
installed wheel.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import typer

ROOT = Path(__file__).resolve().parents[2]
# Every argument reaches the module as typed, --help included (the module's argparse answers it).
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}

# Subcommand -> (module of benchmarks/, its line in `cityseg-fast bench --help`).
BENCHMARKS = {
    "loader": ("loader", "Images/s of each loader (plain with 0..N workers, DALI CPU/GPU, device cache) on the "
                         "same files."),
    "kernel": ("mask_kernel", "Mask -> class ids: Triton vs torch on a GPU; lookup table vs reference vs cdist on "
                              "a CPU."),
    "train": ("train_step", "The training step (product recipe): images/s, ms/step, TFLOP/s over batch x width x "
                            "compile mode."),
    "e2e": ("end_to_end", "N steps of real training per loader: images/s, data wait, GPU util, first batch, "
                          "compile time."),
    "accuracy": ("accuracy", "Time to accuracy: named recipes under one training budget; val pixel acc and mIoU "
                             "against seconds."),
    "all": ("run_all", "loader, kernel, train, e2e with their defaults, then the report of their results."),
    "report": ("report", "Every result JSON -> one markdown report (CPU and GPU apart) and a bar chart of loader "
                         "images/s."),
}  # fmt: skip

bench_app = typer.Typer(
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    help="Benchmarks: loaders, mask kernel, train step, end to end; `bench NAME --help` lists NAME's options.",
)


def benchmark_module(module: str) -> ModuleType:
    """The module benchmarks.<module> of the source checkout (not on sys.path when installed)."""
    if not (ROOT / "benchmarks" / "common.py").is_file():
        typer.echo(f"error: no benchmarks/ folder beside {Path(__file__).parent}: bench needs the source "
                   "checkout (pip install -e .)", err=True)  # fmt: skip
        raise typer.Exit(2)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(f"benchmarks.{module}")


def _register(name: str, module: str, summary: str) -> None:
    def command(ctx: typer.Context) -> None:
        code = benchmark_module(module).main(ctx.args, prog=f"cityseg-fast bench {name}")
        if code:
            raise typer.Exit(code)

    bench_app.command(name, help=summary, context_settings=PASS_THROUGH, add_help_option=False)(command)


for _name, (_module, _summary) in BENCHMARKS.items():
    _register(_name, _module, _summary)
