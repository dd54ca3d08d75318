"""Real training, N steps per loader: images/s, share of step time waiting for data, GPU
utilisation, time to first batch and compile time.

    python -m benchmarks.end_to_end                         # CPU: synthetic data, width 16, 128px, 20 steps
    python -m benchmarks.end_to_end --data DIR --steps 150 --width 32 --size 256 --batch 16 --compile
    python -m benchmarks.end_to_end --loaders torch --steps 8 --width 4 --depth 2 --size 32 --batch 2   # smoke

For each loader (`torch` = the plain DataLoader with --workers processes, `dali` = DALI with --workers
threads, "mixed" decode on a GPU, `cache` = the device cache, when the config knows `cache`), the
engine's own `Trainer` trains a fresh model for --steps steps of one epoch (standard augmentation:
flip, rotation 10, zoom 0.75-1.25, jitter 0.3), into a temporary run folder, with the engine's
defaults for precision and torch.compile unless --precision/--compile say otherwise.

Reported per loader (median over --reps runs, every run in the JSON):
- images/s: the engine's figure, after its 5 warm-up steps, synchronised (telemetry.EpochMeter);
- data_wait_share: the engine's share of the epoch's wall time spent in `next(loader)`;
  data_wait_share_steady: the same after the --warm-steps first steps;
- gpu_util: mean of the engine's pynvml sampler over the epoch (n/a on CPU);
- time_to_first_batch_s: a fresh loader of the same kind, from construction to its first batch on the
  device (synchronised), measured apart from training (includes worker start-up, DALI pipeline
  build, the cache's fill);
- compile_s: with compile on, the wall time of the first --warm-steps steps minus as many steady
  steps (the median step period after them); step periods are read between successive batch
  requests, which the loop makes once per step.
Results: benchmarks/results/end_to_end-<cpu|gpu>.json (or --json).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    command_line,
    device_kind,
    exit_with,
    finish_record,
    fmt,
    median,
    new_parser,
    new_record,
    pick_device,
    print_header,
    print_table,
    result_file,
    sync,
)
from benchmarks.loader import AUGMENTS, Spec, make_loader
from cityseg.config import Config, DataConfig, ModelConfig, TrainConfig
from cityseg.training.loop import Trainer

LOADERS = ("torch", "dali", "cache")


@contextmanager
def batch_requests() -> Iterator[list[tuple[float, float]]]:
    """(asked, received) times of every batch the engine's Trainer requests while inside: the loop asks
    once per step, so successive requests are one step period apart. Wraps `Trainer.next_batch` for
    the duration only, so `train(cfg)` runs exactly as the CLI runs it."""
    calls: list[tuple[float, float]] = []
    original = Trainer.next_batch

    def timed(self, *args: Any, **kwargs: Any):
        t = time.perf_counter()
        batch = original(self, *args, **kwargs)
        calls.append((t, time.perf_counter()))
        return batch

    Trainer.next_batch = timed
    try:
        yield calls
    finally:
        Trainer.next_batch = original


def make_config(kind: str, data_dir: Path, args: argparse.Namespace, out: Path) -> Config:
    data = DataConfig(data_dir=str(data_dir), image_size=args.size, batch_size=args.batch, loader=kind,
                      workers=args.workers, threads=max(1, args.workers), skip_validate=True,
                      augment=AUGMENTS["standard"])  # --workers: the plain loader's processes, DALI's threads
    return Config(
        data=data,
        model=ModelConfig(width=args.width, depth=args.depth),
        train=TrainConfig(epochs=1, max_steps=args.steps, device=str(args.device), precision=args.precision,
                          compile=args.compile,
                          warmup_steps=max(1, args.steps // 5), out=str(out), seed=args.seed),
    )


def train_once(cfg: Config, warm: int) -> dict[str, Any]:
    """One run of the engine's `train(cfg)`; step periods and waits from its batch requests."""
    from rich.console import Console

    from cityseg.training import train

    t0 = time.perf_counter()
    with batch_requests() as calls:
        summary = train(cfg, Console(quiet=True))
    total_s = time.perf_counter() - t0
    starts = [c[0] for c in calls]
    waits = [c[1] - c[0] for c in calls]
    periods = [b - a for a, b in zip(starts, starts[1:], strict=False)]  # one per step
    steady = periods[warm:] or periods
    step_s = statistics.median(steady) if steady else None
    overhead = max(0.0, sum(periods[:warm]) - len(periods[:warm]) * step_s) if step_s else None
    steady_wait = sum(waits[warm + 1 :]) / sum(steady) if periods[warm:] else None
    setup_s = starts[0] - t0 if starts else None
    final = summary["final"]
    # The engine times images/s after its 5 warm-up steps; a shorter run only has the plain rate.
    warm_excluded = summary["images_per_s"] is not None
    result = {
        "images_per_s": summary["images_per_s"] if warm_excluded else final["images_per_s"],
        "images_per_s_warmup_excluded": warm_excluded,
        "data_wait_share": final["data_wait_share"],
        "data_wait_share_steady": steady_wait,
        "gpu_util": final.get("gpu_util"),
        "gpu_mem_gib": final.get("gpu_mem_gib"),
        "steps": summary["steps"],
        "precision": summary["precision"],
        "compile": summary["compile"],
        "loader": summary["loader"],
        "setup_s": setup_s,  # train() called -> first batch asked: validation, palette, loaders, model
        "run_s": total_s,  # the whole train() call, validation and run-folder plots included
        "first_batch_wait_s": waits[0] if waits else None,
        "steady_step_s": step_s,
        "warm_steps_s": periods[:warm],
        "compile_s": overhead if summary["compile"] else None,
        "warmup_overhead_s": overhead,
    }
    return result


def time_to_first_batch(kind: str, files: list[Path], args: argparse.Namespace, device: torch.device,
                        dtype: torch.dtype) -> float:
    """A fresh loader, from construction to its first batch on the device."""
    from cityseg.palette import cityscapes_palette

    spec = Spec({"torch": "torch", "dali": "dali-gpu" if device.type == "cuda" else "dali-cpu",
                 "cache": "cache"}[kind], args.workers)  # fmt: skip
    palette = cityscapes_palette()
    loader_args = argparse.Namespace(image_size=args.size, batch_size=args.batch, prefetch=2, seed=args.seed)
    sync(device)
    t0 = time.perf_counter()
    with make_loader(spec, files, palette, AUGMENTS["standard"], loader_args, device, dtype) as loader:
        image, _ = next(iter(loader))
        image = image.to(device)
        sync(device)
        seconds = time.perf_counter() - t0
    return seconds


def available(kind: str) -> str | None:
    from cityseg.data.contract import dali_available

    if kind == "dali" and not dali_available():
        return "nvidia.dali is not importable"
    return None


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return median(values)


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = new_parser("end_to_end", __doc__, prog)
    p.add_argument("--data", type=Path, default=None, help="Kaggle pair folder; default: synthetic pairs in a temp dir")
    p.add_argument("--loaders", default=",".join(LOADERS), help="comma list of: " + ", ".join(LOADERS))
    p.add_argument("--steps", type=int, default=20, help="training steps per run (one epoch at most)")
    p.add_argument("--warm-steps", type=int, default=5, help="first steps kept out of the steady figures")
    p.add_argument("--reps", type=int, default=1, help="training runs per loader")
    p.add_argument("--width", type=int, default=None, help="U-Net width (default 32 GPU, 16 CPU)")
    p.add_argument("--depth", type=int, default=4, help="U-Net levels (image side must divide by 2**depth)")
    p.add_argument("--size", type=int, default=None, help="image side (default 256 GPU, 128 CPU)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 16 GPU, 8 CPU)")
    p.add_argument("--workers", type=int, default=None, help="loader workers / DALI threads (default min(8, cores))")
    p.add_argument("--precision", default="auto", help="auto | bf16-mixed | 16-mixed | 32 (engine default: auto)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile (engine default: on for GPU, off for CPU)")
    p.add_argument("--device", default="auto", help="auto (the GPU if there is one) | cpu | cuda[:N]")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order, augmentation and weights")
    return p


def run(argv: Sequence[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    args = parser(prog).parse_args(argv)
    device = pick_device(args.device)
    args.device = device
    gpu = device.type == "cuda"
    args.width = args.width or (32 if gpu else 16)
    args.size = args.size or (256 if gpu else 128)
    args.batch = args.batch or (16 if gpu else 8)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    args.workers = args.workers if args.workers is not None else min(8, cores)
    kinds = [k.strip() for k in args.loaders.split(",") if k.strip()]
    if bad := [k for k in kinds if k not in LOADERS]:
        raise SystemExit(f"--loaders: unknown {bad}; expected {', '.join(LOADERS)}")
    if args.steps <= args.warm_steps:
        raise SystemExit(f"--steps {args.steps} must exceed --warm-steps {args.warm_steps}")

    with tempfile.TemporaryDirectory(prefix="e2e-bench-") as tmp:
        tmp_path = Path(tmp)
        if args.data is None:
            from cityseg.data.synth import write_dataset

            data_dir = write_dataset(tmp_path / "data", n_train=args.steps * args.batch, n_val=args.batch,
                                     seed=args.seed, size=args.size, workers=min(cores, 16))  # fmt: skip
            source = f"synthetic ({args.steps * args.batch} train / {args.batch} val pairs, {args.size}px)"
        else:
            data_dir, source = args.data, str(args.data)
        from cityseg.data.pairs import list_split

        files = list_split(data_dir, "train")
        per_epoch = len(files) // args.batch
        if args.steps > per_epoch:
            raise SystemExit(f"--steps {args.steps} > {per_epoch} steps in one epoch of {data_dir}: lower it")
        config = {"data": source, "n_train": len(files)} | {
            k: getattr(args, k) for k in ("steps", "warm_steps", "reps", "width", "depth", "size", "batch", "workers",
                                          "precision", "compile", "seed")} | {"loaders": kinds, "augment": "standard"}
        out = result_file(args, "end_to_end", device_kind(device))
        record = new_record("end_to_end", device, command_line("end_to_end", argv), config)
        print_header(record)
        from cityseg.runtime import resolve_runtime

        dtype = resolve_runtime(device, args.precision).batch_dtype
        for kind in kinds:
            why = available(kind)
            if why is not None:
                record["notes"].append(f"{kind} skipped: {why}")
                print(f"{kind} skipped: {why}")
                continue
            print(f"  {kind:6s} ...", end=" ", flush=True)
            ttfb = time_to_first_batch(kind, files, args, device, dtype)
            runs = [train_once(make_config(kind, data_dir, args, tmp_path / f"run-{kind}-{r}"), args.warm_steps)
                    for r in range(args.reps)]  # fmt: skip
            rates = [r["images_per_s"] for r in runs]
            row = {
                "loader": kind,
                "runs_on": "gpu" if gpu and kind in ("dali", "cache") else "cpu",
                "reps": rates,
                "median": median(rates),
                "unit": "images/s",
                "data_wait_share": median_of(runs, "data_wait_share"),
                "data_wait_share_steady": median_of(runs, "data_wait_share_steady"),
                "gpu_util": median_of(runs, "gpu_util"),
                "time_to_first_batch_s": ttfb,
                "compile_s": median_of(runs, "compile_s"),
                "steady_step_s": median_of(runs, "steady_step_s"),
                "precision": runs[0]["precision"],
                "compile": runs[0]["compile"],
                "runs": runs,
            }
            record["results"].append(row)
            finish_record(record, out, done=False)
            print(f"{fmt(row['median'])} images/s  data wait {fmt(row['data_wait_share'], '.2f')}  "
                  f"first batch {fmt(row['time_to_first_batch_s'], '.2f')} s  compile {fmt(row['compile_s'])} s")
        base = next((r["median"] for r in record["results"] if r["loader"] == "torch"), None)
        for r in record["results"]:
            r["ratio_vs_torch"] = r["median"] / base if base else None
    print_table(record["results"], [("loader", "loader", ""), ("median", "images/s", ".1f"),
                                    ("ratio_vs_torch", "x torch", ".2f"), ("data_wait_share", "data wait", ".2f"),
                                    ("gpu_util", "GPU util %", ".0f"), ("time_to_first_batch_s", "1st batch s", ".2f"),
                                    ("compile_s", "compile s", ".1f")],
                title=f"{args.steps} steps, width {args.width}, batch {args.batch}, {args.size}px, "
                      f"{args.workers} workers, on {record['device']}")  # fmt: skip
    finish_record(record, out)
    return record


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    run(argv, prog)
    return 0


if __name__ == "__main__":
    exit_with(main)
