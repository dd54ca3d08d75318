"""Synthetic pair generation speed on one core: render + JPEG encode + write, as `write_split` does.

    python -m benchmarks.synth_speed --n 500 --reps 5

Pins itself to one CPU core, renders a burn-in batch first (texture tiles, buffers, imports), then
times `--reps` repetitions of `--n` pairs written to a temporary folder and reports the median in
pairs/s twice: by wall clock, and by the process's CPU time (user + system). On a shared machine the
wall-clock rate also measures the neighbours; the CPU-time rate is what one core of our own delivers.
A separate pass splits a pair's CPU time into render / encode / write. Pairs are written where the
dataset really goes, under the synthetic-data cache ($CITYSEG_CACHE or ~/.cache/cityseg), in a
temporary folder removed afterwards (--out-dir to change it: creating a file costs anywhere from
0.05 to 0.8 ms of kernel time depending on the file system and how busy the machine is).
Results go to benchmarks/results/synth_speed-cpu.json (or --json).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import PIL

from benchmarks.common import exit_with, new_parser, result_file
from cityseg.data import synth
from cityseg.data.synth import render as synth_render
from cityseg.report import cpu_model


def pin_one_core() -> int | None:
    """Run on a single core so the number means 'per core'; returns the core, None if unsupported."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return core


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have used since boot (from /proc/stat), None where unavailable."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def timed_rep(n: int, seed: int, size: int, out_dir: Path) -> tuple[float, float]:
    """(wall, CPU) seconds to write n pairs through the public write path into a fresh folder."""
    with tempfile.TemporaryDirectory(prefix="synth-bench-", dir=out_dir) as tmp:
        w0, c0 = time.perf_counter(), time.process_time()
        synth.write_split(Path(tmp), "train", n, seed, size, workers=1)
        return time.perf_counter() - w0, time.process_time() - c0


def stage_split(n: int, seed: int, size: int, out_dir: Path) -> dict[str, float]:
    """CPU milliseconds per pair spent rendering, encoding and writing (a separate pass through the
    same steps as `write_split`, which skips the public functions' round trip through arrays)."""
    totals = {"render_ms": 0.0, "encode_ms": 0.0, "write_ms": 0.0}
    clock = time.process_time
    with tempfile.TemporaryDirectory(prefix="synth-bench-", dir=out_dir) as tmp:
        for i in range(1, n + 1):
            t0 = clock()
            image = synth_render._pair_image(synth_render._render(synth.pair_rng(seed, "val", i), size))
            t1 = clock()
            data = synth_render._jpeg(image, synth.JPEG_QUALITY)
            t2 = clock()
            (Path(tmp) / f"{i}.jpg").write_bytes(data)
            t3 = clock()
            totals["render_ms"] += t1 - t0
            totals["encode_ms"] += t2 - t1
            totals["write_ms"] += t3 - t2
    return {k: round(v / n * 1e3, 4) for k, v in totals.items()}


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    p = new_parser("synth_speed", __doc__, prog)
    p.add_argument("--n", type=int, default=500, help="pairs per repetition")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (the median is reported)")
    p.add_argument("--burn-in", type=int, default=50, help="pairs rendered before timing")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=None, help="where the timed pairs are written (default: cache)")
    args = p.parse_args(argv)
    out = result_file(args, "synth_speed", "cpu")
    out_dir = args.out_dir or synth.default_cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)

    core = pin_one_core()
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(),
            "platform": platform.platform(),
            "pinned_core": core,
            "cpus_visible": os.cpu_count(),
            "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "pillow": PIL.__version__},
        "config": {
            "n": args.n,
            "reps": args.reps,
            "burn_in": args.burn_in,
            "size": args.size,
            "seed": args.seed,
            "jpeg_quality": synth.JPEG_QUALITY,
            "generator_version": synth.GENERATOR_VERSION,
            "out_dir": str(out_dir),
        },
    }
    print(
        f"cpu: {info['machine']['cpu']} (pinned to core {core}) | python {info['versions']['python']}, "
        f"numpy {np.__version__}, pillow {PIL.__version__}"
    )

    timed_rep(args.burn_in, args.seed + 1, args.size, out_dir)
    reps = []
    for k in range(args.reps):
        busy0 = busy_cpu_seconds()
        wall, cpu = timed_rep(args.n, args.seed + 100 + k, args.size, out_dir)
        busy1 = busy_cpu_seconds()
        # CPUs kept busy by other processes meanwhile: on a shared machine they slow us down too.
        others = None if busy0 is None or busy1 is None else round(max(busy1 - busy0 - cpu, 0.0) / wall, 2)
        reps.append({
            "wall_s": round(wall, 4),
            "cpu_s": round(cpu, 4),
            "pairs_per_s_wall": round(args.n / wall, 1),
            "pairs_per_s_cpu": round(args.n / cpu, 1),
            "other_processes_cpus": others,
        })  # fmt: skip
    median_wall = statistics.median(r["pairs_per_s_wall"] for r in reps)
    median_cpu = statistics.median(r["pairs_per_s_cpu"] for r in reps)
    stages = stage_split(min(args.n, 200), args.seed, args.size, out_dir)

    print(f"\n{'rep':>4} {'wall s':>8} {'cpu s':>8} {'pairs/s wall':>13} {'pairs/s cpu':>12} {'others':>7}")
    for k, r in enumerate(reps):
        rates = f"{r['pairs_per_s_wall']:>13.1f} {r['pairs_per_s_cpu']:>12.1f} {r['other_processes_cpus']!s:>7}"
        print(f"{k:>4} {r['wall_s']:>8.3f} {r['cpu_s']:>8.3f} {rates}")
    print(
        f"\nmedian: {median_cpu:.1f} pairs/s per core of CPU time, {median_wall:.1f} pairs/s wall clock "
        f"({args.n} pairs x {args.reps} reps, {args.size}px)"
    )
    print("CPU per pair: " + ", ".join(f"{k[:-3]} {v:.2f} ms" for k, v in stages.items()))

    result = {
        **info,
        "repetitions": reps,
        "median_pairs_per_s_cpu": median_cpu,
        "median_pairs_per_s_wall": median_wall,
        "stages_cpu_ms_per_pair": stages,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    exit_with(main)
