"""The `cityseg-fast` command line.

    cityseg-fast train                      # synthetic city data, CPU-sized preset, ~5 min on 2 cores
    cityseg-fast train --data DIR           # Kaggle pairs: DIR/train/*.jpg, DIR/val/*.jpg
    cityseg-fast check-data DIR
    cityseg-fast synth --out DIR --train 2975 --val 500
    cityseg-fast eval --ckpt runs/X/checkpoints/best.pt --data DIR
    cityseg-fast predict --ckpt runs/X/checkpoints/best.pt photos/ --out predictions/
    cityseg-fast export --ckpt runs/X/checkpoints/best.pt --format onnx --out unet.onnx
    cityseg-fast profile --steps 20 [train options]
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cityseg.bench import bench_app
from cityseg.checkpoint import CheckpointError
from cityseg.cli_use import export_cmd, predict_cmd
from cityseg.config import AugmentConfig, Config, DataConfig, ModelConfig, TrainConfig
from cityseg.data.pairs import PairError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Fast U-Net training for Cityscapes-style street-scene segmentation (DALI + Triton + PyTorch).",
)
console = Console()
err_console = Console(stderr=True)

# Used for what the user leaves unset when training on the built-in synthetic data on a CPU: small
# enough to finish in about five minutes on 2 cores and still reach >= 80 % val pixel accuracy.
CPU_SYNTH_PRESET = {"image_size": 128, "width": 16, "batch_size": 16, "epochs": 4, "lr": 3e-3,
                    "synth_train": 1000, "synth_val": 100}
# For everything else (real data, or any GPU): the design defaults.
FULL_PRESET = {"image_size": 256, "width": 32, "batch_size": 16, "epochs": 10, "lr": 3e-3,
               "synth_train": 2000, "synth_val": 200}


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error and exit: bad input is the user's to fix, not a traceback."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def pick(value, key: str, preset: dict):
    return preset[key] if value is None else value


def parse_scale(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        fail(f"--scale {text}: expected two numbers LO,HI such as 0.75,1.25")
    if not 0 < lo <= hi:
        fail(f"--scale {text}: expected 0 < LO <= HI")
    return lo, hi


@app.command()
def train(
    data: Annotated[Path | None, typer.Option(help="Dataset folder with train/ and val/ Kaggle pairs "
                                              "(512x256 JPEG: photo | colour mask). Default: a cached "
                                              "synthetic city set, generated on first use.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs to train (default 10; 4 for the CPU synthetic "
                                               "preset). With --resume: raise the budget of that run.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per step (default 16).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak AdamW learning rate (default 3e-3).")] = None,
    width: Annotated[int | None, typer.Option(help="U-Net base width, doubled per stage (default 32; 16 "
                                              "for the CPU synthetic preset).")] = None,
    depth: Annotated[int, typer.Option(help="U-Net downsamplings; image size must divide by 2**depth.")] = 4,
    upsample: Annotated[str, typer.Option(help="Decoder upsampling: transpose | bilinear.")] = "transpose",
    image_size: Annotated[int | None, typer.Option(help="Train/val size in pixels (square; default 256, "
                                                   "128 for the CPU synthetic preset).")] = None,
    loader: Annotated[str, typer.Option(help="auto | torch | dali | cache. auto: DALI on a GPU, the plain "
                                        "PyTorch loader otherwise; cache: decode the split once into device "
                                        "memory and augment there (same as --cache device).")] = "auto",
    cache: Annotated[str, typer.Option(help="none | device: decode the split once into GPU (or CPU) memory "
                                       "and augment there in batched ops; refused if it will not fit.")] = "none",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    workers: Annotated[int, typer.Option(help="Loader worker processes (torch) or threads (DALI).")] = 2,
    prefetch: Annotated[int, typer.Option(help="Batches prefetched per worker / DALI queue depth.")] = 2,
    amp: Annotated[bool | None, typer.Option("--amp/--no-amp", help="bf16 autocast. Default: on for GPU, "
                                             "and for CPUs with native bf16.")] = None,
    compile: Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model. "
                                                 "Default: on for GPU, off for CPU.")] = None,
    hflip: Annotated[float, typer.Option(help="Horizontal flip probability.")] = 0.5,
    rotate: Annotated[float, typer.Option(help="Random rotation range in degrees (±).")] = 0.0,
    scale: Annotated[str, typer.Option(help="Random zoom range LO,HI, then a crop back to size.")] = "1,1",
    jitter: Annotated[float, typer.Option(help="Colour jitter strength for brightness, contrast and "
                                          "saturation (photo only).")] = 0.0,
    hue: Annotated[float, typer.Option(help="Random hue shift range in turns (photo only).")] = 0.0,
    palette: Annotated[str, typer.Option(help="Mask colours -> classes: cityscapes | kmeans:K.")] = "cityscapes",
    max_color_dist: Annotated[float | None, typer.Option(help="Mask pixels farther than this (RGB "
                                                         "distance) from every class colour are ignored.")] = None,
    class_weights: Annotated[str, typer.Option(help="none | inverse-sqrt-freq.")] = "none",
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (not on norms/biases).")] = 1e-4,
    warmup_steps: Annotated[int, typer.Option(help="Linear LR warm-up steps before cosine decay.")] = 100,
    grad_clip: Annotated[float, typer.Option(help="Max gradient norm; 0 disables.")] = 1.0,
    patience: Annotated[int, typer.Option(help="Early stop after N epochs without a better val mIoU; "
                                          "0 = never.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed for weights, shuffling and augmentation.")] = 0,
    skip_validate: Annotated[bool, typer.Option(help="Skip checking every file before training.")] = False,
    skip_bad: Annotated[bool, typer.Option(help="Train on the valid files, leaving bad ones out (and "
                                           "saying how many), instead of stopping at the first.")] = False,
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/<date-time>).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the run in this folder from "
                                                "checkpoints/last.pt, with its saved config.")] = None,
    smoke: Annotated[bool, typer.Option(help="A few steps end to end on a tiny synthetic set: checks the "
                                        "install and writes a complete run folder.")] = False,
    nproc: Annotated[int, typer.Option(help="Processes (GPUs) on this machine: launches torchrun with DDP "
                                       "(NCCL on GPU, gloo on CPU). Multi-node: call torchrun yourself.")] = 1,
    sync_bn: Annotated[bool, typer.Option(help="DDP on GPUs: synchronise BatchNorm statistics across ranks.")] = False,
    max_steps: Annotated[int, typer.Option(help="Stop after this many steps in total, saving a resumable "
                                           "last.pt (0 = all epochs).")] = 0,
    log_every: Annotated[int, typer.Option(help="Steps between loss readouts (each syncs the GPU).")] = 20,
) -> None:
    """Train a U-Net and write a run folder (config, metrics, checkpoints, curves, samples)."""
    if nproc > 1:
        launch_torchrun(nproc)
    console.quiet = os.environ.get("RANK", "0") != "0"  # under torchrun, rank 0 speaks for all
    cfg = resumed_config(resume, epochs) if resume is not None else config_from_options(locals())
    print_config(cfg)
    summary = run_or_fail(cfg)
    from cityseg.telemetry import fmt

    final = summary["final"]
    console.print(
        f"[bold green]done[/]: val pixel acc {final['pixel_acc']:.4f}, mIoU {fmt(final['miou'], '.4f')}, "
        f"{fmt(summary['images_per_s'])} img/s, run folder {Path(summary['run_dir'])}"
    )


def config_from_options(o: dict) -> Config:
    """The train command's options -> Config, with the machine's preset for what was left unset."""
    on_cpu = o["device"] == "cpu" or (o["device"] == "auto" and not _cuda_available())
    preset = CPU_SYNTH_PRESET if o["data"] is None and on_cpu else FULL_PRESET
    if o["smoke"]:
        preset = {**preset, "image_size": 64, "width": 8, "batch_size": 4, "epochs": 1,
                  "synth_train": 16, "synth_val": 8}
    jitter = o["jitter"]
    return Config(
        data=DataConfig(
            data_dir=None if o["data"] is None else str(o["data"]),
            image_size=pick(o["image_size"], "image_size", preset),
            batch_size=pick(o["batch_size"], "batch_size", preset),
            loader=o["loader"], cache=o["cache"], workers=o["workers"], prefetch=o["prefetch"],
            palette=o["palette"], max_color_dist=o["max_color_dist"], skip_validate=o["skip_validate"],
            skip_bad=o["skip_bad"],
            augment=AugmentConfig(hflip=o["hflip"], rotate_deg=o["rotate"], scale=parse_scale(o["scale"]),
                                  brightness=jitter, contrast=jitter, saturation=jitter, hue=o["hue"]),
            synth_train=preset["synth_train"], synth_val=preset["synth_val"],
        ),
        model=ModelConfig(width=pick(o["width"], "width", preset), depth=o["depth"], upsample=o["upsample"]),
        train=TrainConfig(
            epochs=pick(o["epochs"], "epochs", preset), lr=pick(o["lr"], "lr", preset),
            weight_decay=o["weight_decay"], warmup_steps=o["warmup_steps"], grad_clip=o["grad_clip"],
            class_weights=o["class_weights"], device=o["device"], amp=o["amp"], compile=o["compile"],
            sync_bn=o["sync_bn"], seed=o["seed"], patience=o["patience"], log_every=o["log_every"],
            max_steps=o["max_steps"] or (6 if o["smoke"] else 0), out=None if o["out"] is None else str(o["out"]),
        ),
    )


def run_or_fail(cfg: Config, on_step=None) -> dict:
    """Train; turn every expected failure into a one-line message and the right exit status."""
    from cityseg.engine import EXIT_INTERRUPTED, Interrupted, TrainingError
    from cityseg.engine import train as run_training

    try:
        return run_training(cfg, console, on_step=on_step)
    except KeyboardInterrupt:  # before training started: nothing to save
        err_console.print("interrupted before training started")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Interrupted as e:
        err_console.print(str(e), soft_wrap=True)
        raise typer.Exit(EXIT_INTERRUPTED if e.signum == signal.SIGINT else 128 + e.signum) from None
    except (PairError, TrainingError, CheckpointError, ValueError) as e:
        fail(str(e))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def profile(
    ctx: typer.Context,
    steps: Annotated[int, typer.Option(help="Training steps recorded (after 1 skipped and 2 warm-up steps).")] = 10,
    out: Annotated[Path, typer.Option(help="Folder for trace.json, top_ops.txt, gpu_timeline.png and the run.")]
    = Path("profile"),
) -> None:
    """Profile training steps with torch.profiler. Any `train` option may follow, e.g.
    `cityseg-fast profile --steps 20 --data DIR --batch-size 32`."""
    from cityseg.profiling import profile_training

    train_command = typer.main.get_command(app).get_command(ctx, "train")
    try:
        options = train_command.make_context("train", list(ctx.args)).params
    except typer.TyperException as e:  # an unknown or malformed train option
        fail(f"profile: {e.format_message() if hasattr(e, 'format_message') else e}")
    options["out"] = out / "run"
    cfg = config_from_options(options)
    profile_training(cfg, steps, out, console, run_or_fail)


def launch_torchrun(nproc: int) -> None:
    """Re-run this very command under torchrun with `nproc` processes (and no --nproc)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            args.append(arg)
    launch = ["--standalone", f"--nproc-per-node={nproc}", "-m", "cityseg", *args]
    console.print(f"launching: torchrun {' '.join(launch)}", highlight=False, soft_wrap=True)
    try:
        run(get_args_parser().parse_args(launch))
    except ChildFailedError as e:  # the workers printed their own one-line errors
        codes = [f.exitcode for f in e.failures.values() if f.exitcode > 0]
        raise typer.Exit(codes[0] if codes else 1) from None
    raise typer.Exit(0)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resumed_config(run_dir: Path, epochs: int | None) -> Config:
    from cityseg.checkpoint import load_checkpoint

    try:
        state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    except CheckpointError as e:
        fail(str(e))
    cfg = Config.from_dict(state["config"])
    train_cfg = replace(cfg.train, resume=str(run_dir), epochs=epochs or cfg.train.epochs, max_steps=0)
    return replace(cfg, train=train_cfg)


def print_config(cfg: Config) -> None:
    table = Table(title="config", show_header=False, box=None, pad_edge=False)
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            table.add_row(f"{section}.{key}", str(value))
    console.print(table)


@app.command("check-data")
def check_data(
    data: Annotated[Path, typer.Argument(help="Dataset folder holding train/ and val/.")],
    workers: Annotated[int, typer.Option(help="Threads decoding files.")] = 4,
    sample: Annotated[int, typer.Option(help="Files per split whose mask colours are measured.")] = 50,
    max_color_dist: Annotated[float, typer.Option(help="Distance counted as 'near a palette colour'.")] = 30.0,
) -> None:
    """Validate every pair file of train/ and val/, print a summary, exit 1 listing every bad file."""
    from cityseg.data.check import check_dataset

    try:
        report = check_dataset(data, workers=workers, sample=sample, max_dist=max_color_dist)
    except PairError as e:
        fail(str(e), code=1)
    console.print(report.table())
    if report.bad:
        for error in report.bad:
            err_console.print(str(error), highlight=False, soft_wrap=True, markup=False)
        err_console.print(f"{len(report.bad)} bad file(s)")
        raise typer.Exit(1)
    console.print("[bold green]ok[/]: every file is a valid pair")


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Output folder (gets train/ and val/).")],
    train: Annotated[int, typer.Option("--train", help="Number of train pairs.")] = 2975,
    val: Annotated[int, typer.Option("--val", help="Number of val pairs.")] = 500,
    seed: Annotated[int, typer.Option(help="Seed: the same seed writes byte-identical files.")] = 0,
    size: Annotated[int, typer.Option(help="Height of a pair (width is twice this).")] = 256,
    workers: Annotated[int, typer.Option(help="Processes writing pairs.")] = 1,
) -> None:
    """Write a synthetic Cityscapes-like dataset in the Kaggle pair format."""
    import time

    from cityseg.data.synth import write_dataset

    t = time.perf_counter()
    write_dataset(out, train, val, seed, size=size, workers=workers)
    seconds = time.perf_counter() - t
    console.print(f"wrote {train} train + {val} val pairs to {out} in {seconds:.1f} s "
                  f"({(train + val) / seconds:.0f} pairs/s)")


@app.command("eval")
def evaluate_cmd(
    ckpt: Annotated[Path, typer.Option(help="Checkpoint (best.pt or last.pt of a run).")],
    data: Annotated[Path | None, typer.Option(help="Dataset folder; default: the one the run trained on.")] = None,
    split: Annotated[str, typer.Option(help="Split to score: val or train.")] = "val",
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 16,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    workers: Annotated[int, typer.Option(help="Loader workers.")] = 2,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the metrics and confusion matrix here "
                                                  "as JSON, and its heat map beside it as PNG.")] = None,
    tta: Annotated[str, typer.Option(help="Test-time augmentation: none | flip (2x the compute).")] = "none",
) -> None:
    """Score a checkpoint on a split: pixel accuracy, mIoU and the per-class IoU table."""
    from cityseg.engine import TrainingError
    from cityseg.evaluate import evaluate_checkpoint

    try:
        result = evaluate_checkpoint(ckpt, data, split=split, batch_size=batch_size, device=device,
                                     workers=workers, json_out=json_out, console=console, tta=tta)
    except (PairError, TrainingError, CheckpointError, ValueError) as e:
        fail(str(e))
    console.print(f"pixel acc {result['pixel_acc']:.4f}  mIoU {result['miou']:.4f}")


app.command("predict")(predict_cmd)
app.command("export")(export_cmd)
app.add_typer(bench_app, name="bench")


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="cityseg-fast")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
