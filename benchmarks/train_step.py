"""Step time of the U-Net training step (forward under autocast, cross-entropy, backward, grad clip,
AdamW) for widths 32 and 64, in four variants that each add one thing to the previous one:

    python benchmarks/train_step.py                    # GPU: batch 16, 256px; CPU: batch 4, 128px
    python benchmarks/train_step.py --batch 16 --size 256 --widths 32,64 --json OUT.json
    python benchmarks/train_step.py --quick            # tiny sizes, eager compile backend: a smoke test

Variants: `fp32` (NCHW, eager), `channels_last` (eager), `channels_last+bf16` (torch.autocast bf16),
`channels_last+bf16+compile` (torch.compile of the model, as `cityseg-fast train` does on a GPU).
The step is the engine's (`cityseg.training.setup.build_optimizer`: fused AdamW on GPU; clip at 1.0); inputs
are one fixed random batch already on the device (bf16 for the bf16 variants on a GPU, as the loaders
deliver it), targets random class ids.

Timing: the first --warmup steps are timed one by one (compilation, cuDNN autotuning, allocator
growth) and kept out of the median; then --reps repetitions of --steps steps, each synchronised
(`torch.cuda.synchronize`) before and after, give ms/step. `compile_s` = time of the warm-up steps
minus as many median steps: the one-off cost of compiling until the step time is steady, reported
apart from the step time. On a CPU without native bf16 (AVX512-BF16/AMX; `cpu_bf16_native` in the
JSON) bf16 autocast is emulated and slower than fp32: the GPU figures are the ones that matter.
Results: benchmarks/results/train_step-<cpu|gpu>.json (or --json).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    command_line,
    cpu_bf16_native,
    default_json,
    finish_record,
    median,
    new_record,
    pick_device,
    print_header,
    print_table,
    repeat,
)

VARIANTS: dict[str, dict[str, bool]] = {
    "fp32": {"channels_last": False, "amp": False, "compile": False},
    "channels_last": {"channels_last": True, "amp": False, "compile": False},
    "channels_last+bf16": {"channels_last": True, "amp": True, "compile": False},
    "channels_last+bf16+compile": {"channels_last": True, "amp": True, "compile": True},
}
NUM_CLASSES = 19


def make_step(width: int, depth: int, variant: dict[str, bool], batch: int, size: int, device: torch.device,
              backend: str, seed: int) -> Callable[[], None]:
    """A closure running one full training step on a fixed batch, as the engine's loop does."""
    from cityseg.config import TrainConfig
    from cityseg.model import UNet
    from cityseg.training.setup import build_optimizer

    torch.manual_seed(seed)
    fmt = torch.channels_last if variant["channels_last"] else torch.contiguous_format
    model = UNet(num_classes=NUM_CLASSES, width=width, depth=depth).to(device, memory_format=fmt).train()
    step_model = torch.compile(model, backend=backend) if variant["compile"] else model
    optimizer = build_optimizer(model, TrainConfig(), device)
    loss_fn = nn.CrossEntropyLoss(ignore_index=255)
    dtype = torch.bfloat16 if variant["amp"] and device.type == "cuda" else torch.float32
    image = torch.randn(batch, 3, size, size, device=device).to(dtype=dtype, memory_format=fmt)
    target = torch.randint(0, NUM_CLASSES, (batch, size, size), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant["amp"]):
            loss = loss_fn(step_model(image), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step


def measure(width: int, name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    variant = VARIANTS[name]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step = make_step(width, args.depth, variant, args.batch, args.size, device, args.compile_backend, args.seed)

    def rep() -> None:
        for _ in range(args.steps):
            step()

    first, reps = repeat(step, device, warmup=args.warmup, reps=0)
    _, rep_s = repeat(rep, device, warmup=0, reps=args.reps)
    ms = [s / args.steps * 1e3 for s in rep_s]
    med = median(ms)
    overhead = max(0.0, sum(first) - len(first) * med / 1e3)
    if variant["compile"]:
        torch._dynamo.reset()  # the next width compiles from scratch, not against this model's guards
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "width": width,
        "depth": args.depth,
        "variant": name,
        **variant,
        "batch": args.batch,
        "size": args.size,
        "first_steps_s": first,  # the warm-up steps, one by one
        "compile_s": overhead if variant["compile"] else None,
        "warmup_overhead_s": overhead,  # the same quantity for eager variants (cuDNN autotuning, allocator)
        "reps": ms,
        "median": med,
        "unit": "ms/step",
        "images_per_s": args.batch / (med / 1e3),
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def parse_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="32,64", help="comma list of U-Net base widths")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch", type=int, default=None, help="default 16 on GPU, 4 on CPU")
    p.add_argument("--size", type=int, default=None, help="image side; default 256 on GPU, 128 on CPU")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of: " + ", ".join(VARIANTS))
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10 GPU, 3 CPU)")
    p.add_argument("--steps", type=int, default=None, help="steps per repetition (default 20 GPU, 1 CPU)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (the median is reported)")
    p.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: a smoke test)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="width 4, depth 2, 32px, batch 2, 1 rep, eager backend")
    p.add_argument("--json", type=Path, default=None, help="default benchmarks/results/train_step-<cpu|gpu>.json")
    return p


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    if args.quick:
        args.widths, args.depth, args.compile_backend = "4", 2, "eager"
        args.size, args.batch, args.warmup, args.steps, args.reps = 32, 2, 1, 1, 1
    args.batch = args.batch or (16 if gpu else 4)
    args.size = args.size or (256 if gpu else 128)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 3)
    args.steps = args.steps or (20 if gpu else 1)
    widths = [int(w) for w in parse_list(args.widths)]
    names = parse_list(args.variants)
    if bad := [n for n in names if n not in VARIANTS]:
        raise SystemExit(f"--variants: unknown {bad}; expected {', '.join(VARIANTS)}")
    # Off by default, as in the engine; on, cuDNN times its kernels during the warm-up for these fixed shapes.
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    keys = ("depth", "batch", "size", "warmup", "steps", "reps", "compile_backend", "cudnn_benchmark", "seed")
    config = {k: getattr(args, k) for k in keys} | {"widths": widths, "variants": names, "optimizer": "AdamW",
                                                    "fused_adamw": gpu, "grad_clip": 1.0}  # fmt: skip
    out = args.json or default_json("train_step", device)
    record = new_record("train_step", device, command_line("train_step.py", argv), config)
    print_header(record)
    if not gpu and not cpu_bf16_native() and any(VARIANTS[n]["amp"] for n in names):
        record["notes"].append("this CPU has no native bf16 (oneDNN): bf16 autocast is emulated, slower than fp32")
        print(record["notes"][-1])
    for width in widths:
        for name in names:
            print(f"  width {width:3d} {name:28s} ...", end=" ", flush=True)
            row = measure(width, name, args, device)
            record["results"].append(row)
            finish_record(record, out, done=False)
            extra = f"  compile {row['compile_s']:.1f} s" if row["compile_s"] is not None else ""
            print(f"{row['median']:9.2f} ms/step  {row['images_per_s']:8.1f} images/s{extra}")
    base = {r["width"]: r["median"] for r in record["results"] if r["variant"] == "fp32"}
    for r in record["results"]:
        r["speedup_vs_fp32"] = base[r["width"]] / r["median"] if r["width"] in base else None
    print_table(record["results"], [("width", "width", ""), ("variant", "variant", ""), ("median", "ms/step", ".2f"),
                                    ("images_per_s", "images/s", ".1f"), ("speedup_vs_fp32", "x fp32", ".2f"),
                                    ("compile_s", "compile s", ".1f")],
                title=f"batch {args.batch}, {args.size}px, depth {args.depth}, on {record['device']} "
                      f"(median of {args.reps} x {args.steps} steps)")  # fmt: skip
    finish_record(record, out)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
