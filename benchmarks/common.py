"""What every benchmark shares: the environment record (date, device, versions, machine load), timing
with warm-up and device synchronisation, medians, the JSON layout and the printed table.

JSON layout of every result file (`benchmarks/results/<name>-<cpu|gpu>.json`):

    {"benchmark": str, "schema": 1, "date": ISO-8601, "device": str, "device_kind": "cpu" | "gpu",
     "machine": {...}, "versions": {...}, "command": str, "config": {...},
     "results": [{..., "reps": [float, ...], "median": float, "unit": str}, ...], "notes": [str, ...],
     "complete": bool}

`reps` holds every timed repetition (warm-up excluded); `median` is their median.

Every benchmark runs as `python -m benchmarks.NAME ARGS` from the checkout's root, or as
`cityseg-fast bench SUBCOMMAND ARGS` (the same ARGS, passed through unchanged to the module's `main`).
`new_parser` and `result_file` give them all the same command line for the result file and the same
output policy (cityseg/outputs.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from cityseg.errors import UserError
from cityseg.outputs import new_output_files, user_path
from cityseg.report import cpu_model, device_name
from cityseg.runtime import capabilities, resolve_device
from cityseg.telemetry import synchronize

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SCHEMA = 1
RESULT_KEYS = ("benchmark", "schema", "date", "device", "device_kind", "machine", "versions", "command", "config",
               "results", "notes", "complete")  # fmt: skip


def device_kind(device: torch.device) -> str:
    return "gpu" if device.type == "cuda" else "cpu"


def pick_device(name: str = "auto") -> torch.device:
    """auto -> cuda when visible, else cpu; a bare `cuda` gets its index (tensors report cuda:0)."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


sync = synchronize  # wait for the device's queued work: a GPU timer without it measures only launches


def load_average() -> list[float] | None:
    # The CPU may be shared: the load says how much of it other processes took during the run.
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def cpu_bf16_native() -> bool:
    """Whether oneDNN has native bf16 on this CPU (AVX512-BF16 / AMX); without it bf16 is emulated."""
    return capabilities(torch.device("cpu")).bf16


def machine() -> dict[str, Any]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": cores,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "load_average_start": load_average(),
        "cpu_bf16_native": cpu_bf16_native(),
    }


def versions() -> dict[str, str | None]:
    from cityseg.report import versions as core_versions

    found = core_versions()
    for name, module in (("numpy", "numpy"), ("pillow", "PIL")):
        try:
            found[name] = str(__import__(module).__version__)
        except ImportError:
            found[name] = None
    found["cuda"] = torch.version.cuda
    found["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None
    return found


describe_device = device_name


def command_line(name: str, argv: Sequence[str] | None) -> str:
    """The exact command that reproduces this run (from the checkout's root)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["python", "-m", f"benchmarks.{name}", *args])


class BenchParser(argparse.ArgumentParser):
    """argparse whose --help looks like the rest of `cityseg-fast --help` (typer's rich panels): the usage
    line, the summary, then one "Options" panel where every option shows its help and its default."""

    def format_help(self) -> str:
        from rich.console import Console
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column(style="yellow", no_wrap=True)
        table.add_column()
        for action in (a for a in self._actions if a.help != argparse.SUPPRESS):
            cells = (", ".join(action.option_strings) or action.dest, option_value(action), option_help(action))
            table.add_row(*map(Text, cells))  # Text: "[default: 4]" is help, not rich markup
        out = io.StringIO()
        # Colour only on a terminal; the width of the terminal, or typer's 80 columns in a pipe.
        console = Console(file=out, width=shutil.get_terminal_size((80, 24)).columns, force_terminal=False,
                          color_system="auto" if sys.stdout.isatty() else None, highlight=False)
        console.print(self.format_usage().rstrip(), markup=False)
        console.print(self.description or "", markup=False)
        console.print(Panel(table, title="Options", title_align="left", border_style="dim"))
        return out.getvalue()


def option_value(action: argparse.Action) -> str:
    """What follows the flag: its choices or a metavar in capitals, nothing for a switch."""
    if action.nargs == 0:
        return ""
    if action.choices:
        return "{" + ",".join(map(str, action.choices)) + "}"
    return action.metavar or action.dest.upper()


def option_help(action: argparse.Action) -> str:
    """The option's help text with its default appended when it has one worth showing."""
    text = action.help or ""
    if action.default is not None and action.default is not False and action.default != argparse.SUPPRESS \
            and "default" not in text:
        text += f" [default: {action.default}]"
    return text


def new_parser(name: str, doc: str, prog: str | None = None, *, result: bool = True) -> argparse.ArgumentParser:
    """The command line of benchmark `name`, described by its docstring `doc`: its usage names the
    command that ran it (`prog`: `cityseg-fast bench X` passes its own, else `python -m
    benchmarks.NAME`); with `result`, the options of its result file, the same for every benchmark
    (see `result_file`)."""
    summary = " ".join(doc.split("\n\n")[0].split())  # the docstring's first paragraph, not its first line
    p = BenchParser(prog=prog or f"python -m benchmarks.{name}", description=summary)
    if result:
        p.add_argument("--json", type=Path, default=None,
                       help=f"result file, relative to the current folder (default: {name}-<cpu|gpu>.json in "
                            "benchmarks/results/ when run inside the checkout, else in the current folder)")
        p.add_argument("--overwrite", action="store_true", help="replace the result file if it exists")
    return p


def default_folder() -> Path:
    """Where results go without --json: the checkout's benchmarks/results/ when run from inside the
    checkout (its published figures, meant to be refreshed), else the current folder (never the
    checkout of an installed cityseg-fast run from elsewhere)."""
    here = Path.cwd().resolve()
    return RESULTS if here == ROOT or ROOT in here.parents else here


def result_file(args: argparse.Namespace, name: str, kind: str, also: Sequence[str] = ()) -> Path:
    """Where benchmark `name` writes on a `kind` (cpu | gpu) device: --json as the user meant it
    (relative to their folder), a new file unless --overwrite, as is every file of `also` (suffixes
    of files written beside it, e.g. ".png"). Without --json: NAME-KIND.json in `default_folder()`,
    replaced there only in the checkout's benchmarks/results/. Called before the benchmark starts,
    so a file in the way stops it before it spends its time."""
    default = f"{name}-{kind}.json"
    if args.json is None and default_folder() == RESULTS:
        return RESULTS / default
    path = user_path(args.json or default)
    new_output_files([path, *(path.with_suffix(s) for s in also)], "benchmark result", overwrite=args.overwrite)
    return path


def exit_with(main: Callable[[], int]) -> None:
    """`python -m benchmarks.NAME`: run `main`; a problem the user can fix (a result file in the way)
    is one `error:` line and exit 2, as under `cityseg-fast bench`."""
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)


def new_record(benchmark: str, device: torch.device, command: str, config: dict[str, Any]) -> dict[str, Any]:
    """The JSON skeleton, stamped at the start of the run (versions and device logged up front)."""
    return {
        "benchmark": benchmark,
        "schema": SCHEMA,
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": describe_device(device),
        "device_kind": device_kind(device),
        "machine": machine(),
        "versions": versions(),
        "command": command,
        "config": config,
        "results": [],
        "notes": [],
    }


def finish_record(record: dict[str, Any], path: Path, *, done: bool = True) -> Path:
    """Write the JSON (strict: NaN/inf become null). Scripts also call it with done=False after each
    result, so a run cut short by a timeout (the GPU suite's) still leaves what it measured."""
    from cityseg.report import write_json

    record["complete"] = done
    if done:
        record["machine"]["load_average_end"] = load_average()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)
    if done:
        print(f"wrote {path}")
    return path


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call, synchronised before and after so queued GPU work is inside the window."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def repeat(fn: Callable[[], Any], device: torch.device, *, warmup: int, reps: int) -> tuple[list[float], list[float]]:
    """(warm-up seconds, timed seconds): `warmup` untimed-for-the-median calls (compilation, autotuning,
    worker start-up, caches), then `reps` synchronised repetitions."""
    warm = [timed(fn, device) for _ in range(warmup)]
    return warm, [timed(fn, device) for _ in range(reps)]


def fmt(value: Any, spec: str = ".1f") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:{spec}}"
    return str(value)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]], title: str = "") -> None:
    """A plain aligned table; `columns` = (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]] + [[fmt(r.get(k), spec) for k, _, spec in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    if title:
        print(f"\n{title}")
    for j, row in enumerate(cells):
        padded = (c.rjust(w) if j and i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        print("  ".join(padded))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def print_header(record: dict[str, Any]) -> None:
    v = record["versions"]
    shown = ", ".join(f"{k} {v[k]}" for k in ("python", "torch", "torchvision", "dali", "triton") if v.get(k))
    load = record["machine"]["load_average_start"]
    print(f"{record['benchmark']}: {record['device']} | {shown} | load {load} | {record['date']}", flush=True)
