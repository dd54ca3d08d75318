"""`cityseg-fast profile`: a few training steps under torch.profiler.

    cityseg-fast profile --steps 20 --data DIR --batch-size 32
writes PROFILE_DIR/trace.json (open in chrome://tracing or Perfetto), top_ops.txt, gpu_timeline.png.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console

from cityseg.outputs import atomic_write, check_new_run_folder, new_output_files
from cityseg.report import plot_gpu_timeline
from cityseg.resolve import ResolvedRun
from cityseg.settings import MAX_EPOCHS
from cityseg.telemetry import fmt

SKIP, WARMUP = 1, 2  # first step (allocations, compile) skipped, then two warm-up steps not recorded


OUTPUTS = ("trace.json", "top_ops.txt", "gpu_timeline.png")


def profile_training(resolved: ResolvedRun, steps: int, out: Path, console: Console, run: Callable,
                     overwrite: bool = False) -> dict:
    """Train for SKIP + WARMUP + steps steps with the profiler stepping along; print the top ops.
    OUT's files are new (or `overwrite`), checked before training starts."""
    cfg = resolved.config
    cuda = cfg.train.device.startswith("cuda") or (cfg.train.device == "auto" and torch.cuda.is_available())
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    else:  # the profiler's C++ side otherwise prints "gpuGetDeviceCount failed" on every CPU run
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    total = SKIP + WARMUP + steps
    cfg = replace(cfg, train=replace(cfg.train, max_steps=total, epochs=MAX_EPOCHS))  # --max-steps ends it
    check_new_run_folder(out / "run")  # an earlier profile's run is never replaced (the engine claims it)
    new_output_files([out / name for name in OUTPUTS], "profile", overwrite=overwrite)
    schedule = torch.profiler.schedule(wait=SKIP, warmup=WARMUP, active=steps, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=schedule) as prof:
        summary = run(replace(resolved, config=cfg), on_step=prof.step)
    prof.export_chrome_trace(str(out / "trace.json"))
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=15)
    atomic_write(out / "top_ops.txt", table + "\n", "table of the top operators")
    timeline = out / "run" / "gpu_timeline.png"
    if timeline.exists():
        shutil.copy(timeline, out / "gpu_timeline.png")
    else:
        plot_gpu_timeline([], out / "gpu_timeline.png")
    final = summary["final"]
    console.print(table, highlight=False, soft_wrap=True)
    console.print(
        f"{steps} profiled steps: data-wait share {final['data_wait_share']:.1%}, "
        f"{fmt(final['images_per_s'])} img/s, GPU utilisation {fmt(final['gpu_util'], '.0f', '%')}; "
        f"trace {out / 'trace.json'}, top ops {out / 'top_ops.txt'}, GPU timeline {out / 'gpu_timeline.png'}"
    )
    return summary
