"""Images/s of the product's training step (cityseg/training/step.py `TrainStep`, the one the loop
calls), swept over batch x width x compile mode (x loss):

    python -m benchmarks.train_step                    # GPU: batches 16,64,128 x widths 32,64 x off,default,cudagraphs
    python -m benchmarks.train_step --batches 16,64 --widths 32 --compile-modes off,cudagraphs,whole --json OUT.json
    python -m benchmarks.train_step --widths 32 --batches 16 --compile-modes off --losses ce,ce+dice   # CPU: loss cost
    python -m benchmarks.train_step --quick            # tiny sizes, eager compile backend: a smoke test
    python -m benchmarks.train_step --encoders unet,tf_efficientnet_lite0 --widths 16 --batches 8 --losses ce+dice \
        --depthwise fp32,bf16 --threads 1        # CPU: our U-Net vs a timm encoder, and what fp32 depthwise buys

The step is built by the training's own functions (setup.build_models, build_optimizer, losses.build_loss_fn,
build_scheduler, TrainStep) on the recipe `--data` runs train (cityseg/config.py preset real-data:
bilinear upsampling, CE + Dice): the precision policy (`auto`: bf16 where native), channels-last,
cudnn.benchmark on, fused AdamW on CUDA, clipping at 1.0, the LR schedule stepped after each step.
Inputs are one fixed random batch on the device in the loaders' dtype and layout; 5 % of the target
pixels are ignore (255). `--encoders` adds timm backbones under the U-Net decoder (`--encoder NAME`,
random weights: the speed does not depend on them); `--depthwise fp32,bf16` times an encoder model's
depthwise convs both as training runs them (fp32 under CPU bf16 autocast, cityseg/model.py) and left in
bf16, interleaved like the losses.

Compile modes: `off` (eager), `default` (torch.compile's default mode: inductor, no CUDA graphs),
`cudagraphs` (`reduce-overhead`: what training uses on one CUDA GPU by default), `whole` (cudagraphs
plus clipping and a capturable AdamW compiled with a tensor learning rate). On a CPU, `cudagraphs`
compiles like `default` (CUDA graphs need CUDA).

Timing: compilation and warm-up stay outside: --warmup untimed steps (timed one by one, reported as
`first_steps_s` and `compile_s` = their time minus as many median steps), then --reps repetitions of
--steps steps, synchronised, give ms/step (median). With several --losses, their repetitions
interleave (ce, ce+dice, ce, ...), so a loaded machine slows both alike; `vs_ce` = the step time over
the CE step's in the same cell. FLOPs per step (forward + backward, counted by torch.utils.flop_counter
for one image on the meta device and scaled by the batch: no device memory) give achieved TFLOP/s and,
on a GPU in PEAK_TFLOPS, % of its dense bf16 peak. JSON is written after every cell.
Results: benchmarks/results/train_step-<cpu|gpu>.json.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.common import (
    command_line,
    device_kind,
    exit_with,
    finish_record,
    median,
    new_parser,
    new_record,
    pick_device,
    print_header,
    print_table,
    repeat,
    result_file,
)
from cityseg.config import PRESETS, Config, with_overrides
from cityseg.distributed import DistInfo
from cityseg.model import depthwise_in_fp32_on_cpu
from cityseg.runtime import resolve_runtime
from cityseg.training.losses import build_loss_fn
from cityseg.training.schedule import TrainClock
from cityseg.training.setup import build_models, build_optimizer, build_scheduler
from cityseg.training.step import TrainStep

# --compile-modes -> (torch.compile mode, compile the optimiser too); None = eager.
COMPILE_MODES: dict[str, tuple[str, bool] | None] = {
    "off": None,
    "default": ("default", False),
    "cudagraphs": ("reduce-overhead", False),
    "whole": ("reduce-overhead", True),
}
LOSSES = ("ce", "ce+dice")
NUM_CLASSES = 19
IGNORED_SHARE = 0.05
# Dense bf16 tensor-core peaks, TFLOP/s, from NVIDIA's datasheets (SXM parts). Issue 22 quoted ~790
# for the H200; the datasheet's 989 (the same die as the H100) is used here.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


DEPTHWISE = ("fp32", "bf16")  # an encoder's depthwise convs under CPU autocast: as trained, or left in bf16


@dataclass(frozen=True)
class Cell:
    width: int
    depth: int
    batch: int
    size: int
    encoder: str = "unet"


def product_config(cell: Cell, loss: str) -> Config:
    """What `cityseg-fast train --data DIR` trains, at this cell's sizes and with this loss."""
    cfg = with_overrides(Config(), PRESETS["real-data"], "preset real-data")
    return with_overrides(cfg, {"model.width": cell.width, "model.depth": cell.depth, "data.image_size": cell.size,
                                "data.batch_size": cell.batch, "train.loss": loss, "model.encoder": cell.encoder,
                                "model.encoder_weights": "none"}, "benchmark")  # fmt: skip


def build_step(cfg: Config, device: torch.device, compile_mode: str, backend: str, depthwise: str = "fp32"
               ) -> tuple[TrainStep, Callable[[], None]]:
    """The training's TrainStep and the schedule step that follows it in the loop."""
    how = COMPILE_MODES[compile_mode]
    rt = resolve_runtime(device, cfg.train.precision, compile=how is not None, compile_mode=how and how[0])
    compile_optimizer = bool(how and how[1])
    model, step_model = build_models(cfg.model, rt, DistInfo(), sync_bn=False)
    if depthwise == "bf16":  # undo what the model does on a CPU (fp32), before any compile traces it
        depthwise_in_fp32_on_cpu(model, enabled=False)
    optimizer = build_optimizer(model, cfg.train, device, compiled=compile_optimizer)
    scheduler = build_scheduler(optimizer, cfg.train, steps_per_epoch=1000, clock=TrainClock())
    scaler = torch.amp.GradScaler(device.type, enabled=rt.needs_grad_scaler)
    loss_fn = build_loss_fn(cfg.train.loss, None)
    step = TrainStep(step_model, model, loss_fn, optimizer, scaler, rt, cfg.train.grad_clip,
                     compile_optimizer=compile_optimizer, compile_backend=backend)
    return step, scheduler.step


def random_batch(cell: Cell, step: TrainStep, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(cell.batch, 3, cell.size, cell.size, generator=g)
    target = torch.randint(0, NUM_CLASSES, (cell.batch, cell.size, cell.size), generator=g)
    target[torch.rand(target.shape, generator=g) < IGNORED_SHARE] = 255
    device = step.rt.device
    image = image.to(device, step.rt.batch_dtype).contiguous(memory_format=torch.channels_last)
    return image, target.to(device)


def count_flops(cell: Cell, loss: str) -> float:
    """FLOPs of one step's forward and backward: counted for one image on the meta device (shapes only:
    no memory, no arithmetic, on any machine) and scaled by the batch. Every counted op (convolutions,
    matmuls) is linear in the batch, and precision or compilation change no count. The optimiser's
    elementwise work is not counted. (A full-batch fp32 pass on the device was ~64 GiB at width 64 x
    batch 128.)"""
    from torch.utils.flop_counter import FlopCounterMode

    one = Cell(cell.width, cell.depth, 1, cell.size, cell.encoder)
    cfg = product_config(one, loss)
    rt = resolve_runtime(torch.device("cpu"), "32", compile=False)
    model, _ = build_models(cfg.model, rt, DistInfo(), sync_bn=False)
    model = model.to("meta").eval()  # BatchNorm refuses one value per channel in training (uncounted either way)
    image = torch.empty(1, 3, cell.size, cell.size, device="meta").contiguous(memory_format=torch.channels_last)
    target = torch.zeros(1, cell.size, cell.size, dtype=torch.int64, device="meta")
    with FlopCounterMode(display=False) as counter:
        build_loss_fn(loss, None)(model(image), target).backward()
    return float(counter.get_total_flops()) * cell.batch


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def measure_cell(cell: Cell, compile_mode: str, losses: list[str], args: argparse.Namespace, device: torch.device,
                 flops: dict[tuple[Cell, str], float], depthwise: Sequence[str] = ("fp32",)) -> list[dict[str, Any]]:
    """One row per loss (x depthwise precision, for an encoder), their timed repetitions interleaved."""
    gpu = device.type == "cuda"
    runs = {}
    variants = [(loss, dw) for loss in losses for dw in (depthwise if cell.encoder != "unet" else [None])]
    for loss, dw in variants:
        if (cell, loss) not in flops:
            flops[cell, loss] = count_flops(cell, loss)
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
        step, schedule = build_step(product_config(cell, loss), device, compile_mode, args.compile_backend,
                                    dw or "fp32")
        image, target = random_batch(cell, step, args.seed)

        def steps(n: int, step: TrainStep = step, schedule: Callable[[], None] = schedule,
                  batch: tuple[torch.Tensor, torch.Tensor] = (image, target)) -> Callable[[], None]:
            def run() -> None:
                for _ in range(n):
                    step(*batch)
                    schedule()
            return run

        first, _ = repeat(steps(1), device, warmup=args.warmup, reps=0)
        runs[loss, dw] = {"step": step, "run": steps(args.steps), "first": first, "reps": [],
                          "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if gpu else None}
    for _ in range(args.reps):
        for r in runs.values():
            _, seconds = repeat(r["run"], device, warmup=0, reps=1)
            r["reps"].append(seconds[0] / args.steps * 1e3)
    peak = peak_tflops(device)
    rows = []
    for (loss, dw), r in runs.items():
        med = median(r["reps"])
        tflops = flops[cell, loss] / (med / 1e3) / 1e12
        rows.append({
            "width": cell.width, "depth": cell.depth, "batch": cell.batch, "size": cell.size, "loss": loss,
            "encoder": cell.encoder, "depthwise": dw,
            "compile_mode": compile_mode, "variant": " ".join(v for v in (compile_mode, loss, dw and f"dw-{dw}") if v),
            "precision": r["step"].rt.precision,
            "torch_compile_mode": r["step"].mode, "first_steps_s": r["first"],
            "compile_s": max(0.0, sum(r["first"]) - len(r["first"]) * med / 1e3) if compile_mode != "off" else None,
            "warmup_overhead_s": max(0.0, sum(r["first"]) - len(r["first"]) * med / 1e3),
            "reps": r["reps"], "median": med, "unit": "ms/step", "images_per_s": cell.batch / (med / 1e3),
            "gflop_per_step": flops[cell, loss] / 1e9, "tflops": tflops,
            "pct_peak": 100 * tflops / peak if peak else None, "peak_mem_gib": r["peak_mem_gib"],
        })  # fmt: skip
    for row in rows:  # against the same cell's CE step, and its fp32-depthwise step, of the same other variant
        ce = next((r["median"] for r in rows if r["loss"] == "ce" and r["depthwise"] == row["depthwise"]), None)
        fp32 = next((r["median"] for r in rows if r["depthwise"] == "fp32" and r["loss"] == row["loss"]), None)
        row["vs_ce"] = row["median"] / ce if ce else None
        row["vs_depthwise_fp32"] = row["median"] / fp32 if fp32 and row["depthwise"] else None
    del runs
    if compile_mode != "off":
        torch._dynamo.reset()  # the next cell compiles from scratch, not against this one's guards
    if gpu:
        torch.cuda.empty_cache()
    return rows


def precision_name(precision: str) -> str:
    """The precision as a reader says it: "32" is fp32, "bf16-mixed" stays."""
    return {"32": "fp32", "16-mixed": "fp16-mixed"}.get(precision, precision)


def parse_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = new_parser("train_step", __doc__, prog)
    p.add_argument("--widths", default="32,64", help="comma list of U-Net base widths")
    p.add_argument("--depth", type=int, default=4, help="U-Net levels (image side must divide by 2**depth)")
    p.add_argument("--batches", "--batch", default=None,
                   help="comma list of batch sizes (default 16,64,128 GPU; 16 CPU)")
    p.add_argument("--size", type=int, default=None, help="image side; default 256 on GPU, 128 on CPU")
    p.add_argument("--compile-modes", default=None,
                   help=f"comma list of {', '.join(COMPILE_MODES)} (default off,default,cudagraphs GPU; off CPU)")
    p.add_argument("--losses", default="ce,ce+dice",
                   help="comma list of ce, ce+dice (default: both, side by side: what Dice costs)")
    p.add_argument("--encoders", default="unet",
                   help="comma list of unet (ours) and timm backbones under the U-Net decoder (random weights), "
                        "e.g. unet,tf_efficientnet_lite0")
    p.add_argument("--depthwise", default="fp32",
                   help=f"comma list of {', '.join(DEPTHWISE)}: an encoder's depthwise convs under CPU bf16 "
                        "autocast as training runs them (fp32) and left in bf16, side by side")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads (torch.set_num_threads; default: torch's)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10 GPU, 3 CPU)")
    p.add_argument("--steps", type=int, default=None, help="steps per repetition (default 20 GPU, 1 CPU)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (the median is reported)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: a smoke test)")
    p.add_argument("--device", default="auto", help="auto (the GPU if there is one) | cpu | cuda[:N]")
    p.add_argument("--seed", type=int, default=0, help="seed of the random batches and weights")
    p.add_argument("--quick", action="store_true",
                   help="width 4, depth 2, 32px, batch 2, 1 rep, off and default with the eager backend, both losses")
    return p


def resolve_args(args: argparse.Namespace, gpu: bool) -> argparse.Namespace:
    if args.quick:
        args.widths, args.depth, args.compile_backend, args.losses = "4", 2, "eager", "ce,ce+dice"
        args.size, args.batches, args.warmup, args.steps, args.reps = 32, "2", 1, 1, 1
        args.compile_modes = args.compile_modes or "off,default"
    args.batches = args.batches or ("16,64,128" if gpu else "16")
    args.size = args.size or (256 if gpu else 128)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 3)
    args.steps = args.steps or (20 if gpu else 1)
    args.compile_modes = args.compile_modes or ("off,default,cudagraphs" if gpu else "off")
    return args


def run(argv: Sequence[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    args = parser(prog).parse_args(argv)
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    args = resolve_args(args, gpu)
    widths, batches = [int(w) for w in parse_list(args.widths)], [int(b) for b in parse_list(args.batches)]
    modes, losses = parse_list(args.compile_modes), parse_list(args.losses)
    encoders, depthwise = parse_list(args.encoders), parse_list(args.depthwise)
    if bad := [m for m in modes if m not in COMPILE_MODES]:
        raise SystemExit(f"--compile-modes: unknown {bad}; expected {', '.join(COMPILE_MODES)}")
    if bad := [x for x in losses if x not in LOSSES]:
        raise SystemExit(f"--losses: unknown {bad}; expected {', '.join(LOSSES)}")
    if bad := [x for x in depthwise if x not in DEPTHWISE]:
        raise SystemExit(f"--depthwise: unknown {bad}; expected {', '.join(DEPTHWISE)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True  # as training sets it: fixed shapes, fastest conv algorithms
    recipe = product_config(Cell(widths[0], args.depth, batches[0], args.size), losses[0])
    precision = resolve_runtime(device, recipe.train.precision, compile=False).precision
    keys = ("depth", "size", "warmup", "steps", "reps", "compile_backend", "seed")
    config = {k: getattr(args, k) for k in keys} | {
        "widths": widths, "batches": batches, "compile_modes": modes, "losses": losses, "encoders": encoders,
        "depthwise": depthwise, "threads": torch.get_num_threads(),
        "upsample": recipe.model.upsample, "precision": precision, "channels_last": True, "cudnn_benchmark": True,
        "optimizer": "AdamW",
        "fused_adamw": gpu, "grad_clip": recipe.train.grad_clip, "peak_tflops": peak_tflops(device)}  # fmt: skip
    out = result_file(args, "train_step", device_kind(device))
    record = new_record("train_step", device, command_line("train_step", argv), config)
    print_header(record)
    if not gpu and precision == "32":
        record["notes"].append("CPU: precision auto is fp32 here (no native bf16)")
    flops: dict[tuple[Cell, str], float] = {}
    for cell in (Cell(w, args.depth, b, args.size, e) for e in encoders for w in widths for b in batches):
        for mode in modes:
            name = "" if encoders == ["unet"] else f"{cell.encoder} "
            print(f"  {name}width {cell.width:3d} batch {cell.batch:4d} {mode:10s} ...", end=" ", flush=True)
            rows = measure_cell(cell, mode, losses, args, device, flops, depthwise)
            record["results"].extend(rows)
            finish_record(record, out, done=False)
            print("  ".join(f"{r['variant'].removeprefix(mode + ' ')} {r['median']:.2f} ms "
                            f"{r['images_per_s']:.1f} img/s" for r in rows))

    def same_but_mode(r: dict[str, Any]) -> tuple[Any, ...]:
        return r["encoder"], r["width"], r["batch"], r["loss"], r["depthwise"]

    off = {same_but_mode(r): r["median"] for r in record["results"] if r["compile_mode"] == "off"}
    for r in record["results"]:
        base = off.get(same_but_mode(r))
        r["speedup_vs_off"] = base / r["median"] if base else None
    print_table(record["results"], [
        *([("encoder", "encoder", ""), ("depthwise", "depthwise", "")] if encoders != ["unet"] else []),
        ("width", "width", ""), ("batch", "batch", ""), ("compile_mode", "compile", ""), ("loss", "loss", ""),
        ("median", "ms/step", ".2f"), ("images_per_s", "images/s", ".1f"), ("tflops", "TFLOP/s", ".3f"),
        ("pct_peak", "% peak", ".1f"), ("vs_ce", "x ce", ".3f"), ("speedup_vs_off", "x off", ".2f"),
        *([("vs_depthwise_fp32", "x fp32 dw", ".2f")] if len(depthwise) > 1 else []),
        ("compile_s", "compile s", ".1f"), ("peak_mem_gib", "peak GiB", ".2f")],
        title=f"{args.size}x{args.size} images, U-Net depth {args.depth}, precision {precision_name(precision)}, "
              f"on {record['device']} "
              f"(median of {args.reps} x {args.steps} steps)")  # fmt: skip
    finish_record(record, out)
    return record


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    run(argv, prog)
    return 0


if __name__ == "__main__":
    exit_with(main)
