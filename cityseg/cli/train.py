"""`cityseg-fast train` and `cityseg-fast profile`: options -> Config -> the training engine.

    cityseg-fast train                      # synthetic city data, CPU-sized preset, ~5 min on 2 cores
    cityseg-fast train --data DIR           # Kaggle pairs: DIR/train/*.jpg, DIR/val/*.jpg
    cityseg-fast train --config run.toml --lr 1e-3
    cityseg-fast train --resume runs/X --epochs 20
    cityseg-fast profile --steps 20 --data DIR

Every train option defaults to "unset": the config is the dataclasses' defaults, then the presets
(`cityseg.config.PRESETS`), then `--config FILE`, then the options the user typed, each mapped to its
config key by OPTION_KEYS. Nothing here imports torch: `--help` answers at once.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from cityseg.cli.choices import (
    Cache,
    ClassWeights,
    CompileMode,
    Loader,
    Loss,
    Norm,
    Precision,
    Schedule,
    Upsample,
)
from cityseg.cli.common import app, console, err_console, fail, given_options
from cityseg.config import AMP_TO_PRECISION, PRESETS, Config, flatten, get_value, train_config, with_overrides
from cityseg.errors import OptionError
from cityseg.options import (
    OPTION_KEYS,
    check_config,
    check_options,
    flag,
    parse_batch_size,
    parse_duration,
    parse_scale,
    read_config_file,
)

DEFAULTS = Config()
CPU = PRESETS["cpu-synthetic"]


DATA, MODEL, TRAIN, SPEED, OUTPUT, AUG = "Data", "Model", "Training", "Speed", "Output", "Augmentation"

# What `--resume` applies: how long to go on and how to run, never what the run is (that is in last.pt).
RESUME_APPLIES = {"epochs", "max_steps", "time_budget", "target_acc", "device", "workers", "prefetch", "precision",
                  "amp", "compile", "compile_mode", "log_every", "skip_validate", "tensorboard", "val_every"}
# Options that are not config values.
COMMAND_ONLY = {"resume", "config", "print_config", "smoke", "nproc"}


def _d(key: str) -> Any:
    return get_value(DEFAULTS, key)


def config_values(given: dict[str, Any]) -> dict[str, Any]:
    """The typed options as {config key: value} (enums to strings, paths made absolute)."""
    values: dict[str, Any] = {}
    for name, value in given.items():
        if name in COMMAND_ONLY:
            continue
        if isinstance(value, Enum):
            value = value.value
        if name == "scale":
            value = parse_scale(value)
        if name == "time_budget":
            value = parse_duration(value)
        if name == "amp":  # the older switch: --amp is bf16-mixed, --no-amp is 32
            value = AMP_TO_PRECISION[value]
        if name in ("data", "out", "init_from"):  # absolute: eval and --resume from elsewhere find the same place
            value = str(Path(value).absolute())
        keys = OPTION_KEYS[name]
        for key in (keys if isinstance(keys, tuple) else (keys,)):
            values[key] = value
    return values


def resolve_config(given: dict[str, Any]) -> Config:
    """The run's Config from the typed options (see the module docstring); --resume starts from the
    config saved in the run's last.pt and applies only RESUME_APPLIES, refusing the rest."""
    resume = given.get("resume")
    if resume is not None:
        return resumed_config(Path(resume).absolute(), given)
    layers = []
    if given.get("init_from") is not None:  # the architecture of the checkpoint, unless flags change it
        layers.append(("--init-from", checkpoint_architecture(Path(given["init_from"]))))
    if given.get("config") is not None:
        layers.append((str(given["config"]), read_config_file(Path(given["config"]))))
    layers.append(("command line", config_values(given)))
    device = {k: v for _, values in layers for k, v in values.items()}.get("train.device", "auto")
    on_cpu = device == "cpu" or (device == "auto" and not cuda_available())
    return train_config(layers, on_cpu=on_cpu, smoke=bool(given.get("smoke")))


def checkpoint_architecture(path: Path) -> dict[str, Any]:
    from cityseg.checkpoint import load_checkpoint, read_config

    model = read_config(load_checkpoint(path), path).model
    return {f"model.{k}": v for k, v in asdict(model).items() if k != "num_classes"}


def resumed_config(run: Path, given: dict[str, Any]) -> Config:
    refused = sorted(flag(n) for n in given if n not in RESUME_APPLIES | COMMAND_ONLY)
    if given.get("config") is not None:
        refused.insert(0, "--config")
    if refused:
        allowed = ", ".join(sorted(flag(n) for n in RESUME_APPLIES))
        raise OptionError(f"--resume {run}: {', '.join(refused)} would change the run it continues (its settings "
                          f"are in its last.pt); with --resume only {allowed} apply. To start a new run from "
                          f"its weights: --init-from {run / 'checkpoints' / 'last.pt'}")
    from cityseg.checkpoint import read_config, read_training_checkpoint
    from cityseg.outputs import check_not_in_use

    check_not_in_use(run)
    last = run / "checkpoints" / "last.pt"
    cfg = read_config(read_training_checkpoint(last), last)
    overrides = config_values({k: v for k, v in given.items() if k in RESUME_APPLIES})
    overrides.setdefault("train.max_steps", 0)  # the stop of the session that saved it is not this one's
    overrides["train.resume"] = str(run)
    applied = [flag(n) for n in given if n in RESUME_APPLIES]
    if applied:
        console.print(f"resume: applying {', '.join(applied)}; everything else as saved in {last}")
    return with_overrides(cfg, overrides, "--resume")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def print_config(cfg: Config) -> None:
    table = Table(title="config", show_header=False, box=None, pad_edge=False)
    for key, value in flatten(cfg.to_dict()).items():
        table.add_row(key, Text(str(value)))
    console.print(table)


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def train(
    ctx: typer.Context,
    data: Annotated[Path | None, typer.Option(rich_help_panel=DATA, help=(
        "Dataset folder with train/ and val/ Kaggle pairs (512x256 JPEG: photo | colour mask), or the unpacked "
        "Kaggle archive above it. Default: a cached synthetic city set, generated on first use."))] = None,
    image_size: Annotated[int | None, typer.Option(rich_help_panel=DATA, help=(
        f"Train/val size in pixels, square (default {_d('data.image_size')}; {CPU['data.image_size']} in the CPU "
        "synthetic preset). A multiple of 2**depth."))] = None,
    batch_size: Annotated[str | None, typer.Option(rich_help_panel=DATA, callback=parse_batch_size, help=(
        "Images per step, or auto (default): on a CUDA GPU the largest batch from 16 to 256 that fits 80 % of "
        "its memory, found once and cached, with lr and warm-up scaled from batch 16; 16 on a CPU."))] = None,
    loader: Annotated[Loader | None, typer.Option(rich_help_panel=SPEED, help=(
        "auto: DALI on a GPU, the plain PyTorch loader otherwise; cache: decode the split once into device "
        "memory and augment there."))] = None,
    cache: Annotated[Cache | None, typer.Option(rich_help_panel=SPEED, help=(
        "device: the same as --loader cache (kept for older commands)."))] = None,
    workers: Annotated[int | None, typer.Option(rich_help_panel=SPEED, help=(
        f"Loader worker processes (torch) or threads (DALI) (default {_d('data.workers')})."))] = None,
    prefetch: Annotated[int | None, typer.Option(rich_help_panel=SPEED, help=(
        f"Batches prefetched per worker / DALI queue depth (default {_d('data.prefetch')})."))] = None,
    palette: Annotated[str | None, typer.Option(rich_help_panel=DATA, help=(
        "Mask colours -> classes: cityscapes (default) | kmeans:K | a saved palette .json."))] = None,
    max_color_dist: Annotated[float | None, typer.Option(rich_help_panel=DATA, help=(
        "Mask pixels farther than this (RGB distance) from every class colour are ignored (default: none)."
    ))] = None,
    skip_validate: Annotated[bool, typer.Option("--skip-validate", rich_help_panel=DATA, help=(
        "Skip decoding every file before training (mask colours are still checked on a sample); the loader "
        "reports a bad file when it meets it."))] = False,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", rich_help_panel=DATA, help=(
        "Train on the valid files, leaving bad ones out (and saying how many), instead of stopping at the first."
    ))] = False,
    hflip: Annotated[float | None, typer.Option(rich_help_panel=AUG, help=(
        f"Horizontal flip probability (default {_d('data.augment.hflip')})."))] = None,
    rotate: Annotated[float | None, typer.Option(rich_help_panel=AUG, help=(
        "Random rotation range in degrees, ± (default 0)."))] = None,
    scale: Annotated[str | None, typer.Option(rich_help_panel=AUG, help=(
        "Random zoom range LO,HI, then a crop back to size (default 1,1)."))] = None,
    jitter: Annotated[float | None, typer.Option(rich_help_panel=AUG, help=(
        "Colour jitter strength for brightness, contrast and saturation, photo only (default 0)."))] = None,
    hue: Annotated[float | None, typer.Option(rich_help_panel=AUG, help=(
        "Random hue shift range in turns, photo only (default 0, at most 0.5)."))] = None,
    width: Annotated[int | None, typer.Option(rich_help_panel=MODEL, help=(
        f"U-Net base width, doubled per stage (default {_d('model.width')}; {CPU['model.width']} in the CPU "
        "synthetic preset)."))] = None,
    depth: Annotated[int | None, typer.Option(rich_help_panel=MODEL, help=(
        f"U-Net downsamplings (default {_d('model.depth')})."))] = None,
    upsample: Annotated[Upsample | None, typer.Option(rich_help_panel=MODEL, help=(
        "Decoder upsampling: a learned transposed conv, or bilinear + 1x1 conv (default bilinear with --data, "
        "the measured recipe; transpose for the synthetic data)."))] = None,
    norm: Annotated[Norm | None, typer.Option(rich_help_panel=MODEL, help=(
        "Normalisation layers: BatchNorm (default) or GroupNorm with 8 groups (independent of the batch size)."
    ))] = None,
    epochs: Annotated[int | None, typer.Option(rich_help_panel=TRAIN, help=(
        f"Epochs to train (default {_d('train.epochs')}; {CPU['train.epochs']} in the CPU synthetic preset). "
        "With --resume: the new budget of that run."))] = None,
    lr: Annotated[float | None, typer.Option(rich_help_panel=TRAIN, help=(
        f"Peak AdamW learning rate (default {_d('train.lr'):g})."))] = None,
    weight_decay: Annotated[float | None, typer.Option(rich_help_panel=TRAIN, help=(
        f"AdamW weight decay, not on norms and biases (default {_d('train.weight_decay'):g})."))] = None,
    warmup_steps: Annotated[int | None, typer.Option(rich_help_panel=TRAIN, help=(
        f"Linear LR warm-up steps before the cosine decay (default {_d('train.warmup_steps')})."))] = None,
    grad_clip: Annotated[float | None, typer.Option(rich_help_panel=TRAIN, help=(
        f"Max gradient norm; 0 disables (default {_d('train.grad_clip')})."))] = None,
    class_weights: Annotated[ClassWeights | None, typer.Option(rich_help_panel=TRAIN, help=(
        "Loss weights per class (default none)."))] = None,
    time_budget: Annotated[str | None, typer.Option(rich_help_panel=TRAIN, help=(
        "Train for this much time (e.g. 1200, 20m, 1.5h; validation not counted): the learning rate decays over "
        "it and the run ends annealed when it is spent, with a normal best.pt/last.pt. --epochs, if given, may "
        "end it sooner."))] = None,
    target_acc: Annotated[float | None, typer.Option(rich_help_panel=TRAIN, help=(
        "Stop once val pixel accuracy reaches this (e.g. 0.90); summary.json records when."))] = None,
    schedule: Annotated[Schedule | None, typer.Option(rich_help_panel=TRAIN, help=(
        "LR shape: warm-up + cosine (default) or one-cycle."))] = None,
    loss: Annotated[Loss | None, typer.Option(rich_help_panel=TRAIN, help=(
        "ce, or ce+dice: cross-entropy plus soft Dice over the classes present (default ce+dice with --data, the "
        "measured recipe; ce for the synthetic data)."))] = None,
    ema: Annotated[float | None, typer.Option(rich_help_panel=TRAIN, help=(
        "Decay of an exponential moving average of the weights (e.g. 0.999): validated and saved in place of "
        "the raw weights; 0 = off (default)."))] = None,
    val_every: Annotated[str | None, typer.Option(rich_help_panel=TRAIN, help=(
        "Validate, and write best.pt / last.pt, every N epochs (2), steps (300steps) or seconds of training (30s, "
        "2m), at the end of the epoch where it falls due. Default auto: as often as keeps validation and "
        "checkpoints under 10 % of the wall time (every epoch when epochs are long). The end of the run and "
        "Ctrl-C always validate."))] = None,
    patience: Annotated[int | None, typer.Option(rich_help_panel=TRAIN, help=(
        "Early stop after N epochs without a better val mIoU; 0 = never (default)."))] = None,
    seed: Annotated[int | None, typer.Option(rich_help_panel=TRAIN, help=(
        "Seed for weights, shuffling and augmentation (default 0)."))] = None,
    max_steps: Annotated[int | None, typer.Option(rich_help_panel=TRAIN, help=(
        "Stop after this many steps in total, saving a resumable last.pt (0 = all epochs, default)."))] = None,
    device: Annotated[str | None, typer.Option(rich_help_panel=SPEED, help=(
        "auto (default) | cpu | cuda | cuda:N."))] = None,
    precision: Annotated[Precision | None, typer.Option(rich_help_panel=SPEED, help=(
        "auto (default): bf16 autocast where the device has native bf16 (Ampere+ GPUs, AMX/AVX512-BF16 CPUs), "
        "fp16 + gradient scaling on older GPUs, fp32 on other CPUs."))] = None,
    amp: Annotated[bool | None, typer.Option("--amp/--no-amp", rich_help_panel=SPEED, help=(
        "Older switch: --amp = --precision bf16-mixed, --no-amp = --precision 32."))] = None,
    compile: Annotated[bool | None, typer.Option("--compile/--no-compile", rich_help_panel=SPEED, help=(
        "torch.compile the model. Default: on for GPUs that Triton supports (compute capability >= 7.0), "
        "off for CPU."))] = None,
    compile_mode: Annotated[CompileMode | None, typer.Option(rich_help_panel=SPEED, help=(
        "torch.compile mode (default: torch's default)."))] = None,
    nproc: Annotated[int, typer.Option(rich_help_panel=SPEED, help=(
        "Processes (GPUs) on this machine: launches torchrun with DDP (NCCL on GPU, gloo on CPU). "
        "Several machines: call torchrun yourself (see README)."))] = 1,
    sync_bn: Annotated[bool, typer.Option("--sync-bn", rich_help_panel=SPEED, help=(
        "DDP on GPUs: synchronise BatchNorm statistics across ranks."))] = False,
    out: Annotated[Path | None, typer.Option(rich_help_panel=OUTPUT, help=(
        "Run folder: new, or empty (default runs/<date-time>)."))] = None,
    init_from: Annotated[Path | None, typer.Option(rich_help_panel=OUTPUT, help=(
        "Start a new run from this checkpoint's weights (fine-tuning): new optimiser, schedule and run folder; "
        "its architecture unless flags change it; another class count re-initialises only the head."))] = None,
    resume: Annotated[Path | None, typer.Option(rich_help_panel=OUTPUT, help=(
        "Continue the run in this folder from checkpoints/last.pt, with its saved config; only --epochs, "
        "--max-steps and how-to-run options (--device, --workers, ...) may be given with it."))] = None,
    tensorboard: Annotated[bool | None, typer.Option("--tensorboard/--no-tensorboard", rich_help_panel=OUTPUT, help=(
        "TensorBoard event files in the run folder (default on): tensorboard --logdir runs/"))] = None,
    log_every: Annotated[int | None, typer.Option(rich_help_panel=OUTPUT, help=(
        f"Steps between loss readouts and progress lines (default {_d('train.log_every')}; each syncs the GPU)."
    ))] = None,
    config: Annotated[Path | None, typer.Option(rich_help_panel=OUTPUT, help=(
        "Read options from a TOML, YAML or JSON file (sections [data], [model], [train] with config keys, "
        "as in a run's config.json); options typed on the command line override it."))] = None,
    print_config_only: Annotated[bool, typer.Option("--print-config", rich_help_panel=OUTPUT, help=(
        "Print the resolved config and exit."))] = False,
    smoke: Annotated[bool, typer.Option("--smoke", rich_help_panel=OUTPUT, help=(
        "A few steps end to end on a tiny set: checks the install and writes a complete run folder."))] = False,
) -> None:
    """Train a U-Net and write a run folder (config, metrics, checkpoints, curves, samples)."""
    given = given_options(ctx)
    given.pop("print_config_only", None)
    check_options(given)
    if nproc > 1:
        launch_torchrun(nproc)
    console.quiet = os.environ.get("RANK", "0") != "0"  # under torchrun, rank 0 speaks for all
    cfg = resolve_config(given)
    check_config(cfg)
    print_config(cfg)
    if print_config_only:
        return
    summary = run_training(cfg)
    from cityseg.telemetry import fmt

    final = summary["final"]
    console.print(Text.assemble(
        ("done", "bold green"),
        f": val pixel acc {final['pixel_acc']:.4f}, mIoU {fmt(final['miou'], '.4f')}, "
        f"{fmt(summary['images_per_s'])} img/s in steps ({fmt(summary['wall_images_per_s'])} img/s of wall time), "
        f"run folder {summary['run_dir']}"), soft_wrap=True)
    console.print(
        "time: " + "  ".join(f"{k[:-2]} {summary[k]:.1f}s" for k in
                             ("startup_s", "warmup_s", "train_s", "val_s", "checkpoint_s", "other_s", "elapsed_s"))
        + f"  (from the {summary['time_zero']})", soft_wrap=True)


def run_training(cfg: Config, on_step=None) -> dict:
    """Train; a signal ends the process with 130 (SIGINT) or 128 + its number, after saving."""
    import signal

    from cityseg.errors import InterruptedNow
    from cityseg.training import EXIT_INTERRUPTED, Interrupted
    from cityseg.training import train as run

    try:
        return run(cfg, console, on_step=on_step)
    except KeyboardInterrupt as e:  # before training started, or a second signal: nothing more to save
        err_console.print("interrupted")
        raise typer.Exit(e.exit_code if isinstance(e, InterruptedNow) else EXIT_INTERRUPTED) from None
    except Interrupted as e:
        err_console.print(str(e), soft_wrap=True)
        raise typer.Exit(EXIT_INTERRUPTED if e.signum == signal.SIGINT else 128 + e.signum) from None


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
    console.print(f"launching: torchrun {' '.join(launch)}", soft_wrap=True)
    try:
        run(get_args_parser().parse_args(launch))
    except ChildFailedError as e:  # the workers printed their own one-line errors
        codes = [f.exitcode for f in e.failures.values() if f.exitcode > 0]
        raise typer.Exit(codes[0] if codes else 1) from None
    raise typer.Exit(0)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def profile(
    ctx: typer.Context,
    steps: Annotated[int, typer.Option(help="Training steps recorded (after 1 skipped and 2 warm-up steps).")] = 10,
    out: Annotated[Path, typer.Option(help="Folder for trace.json, top_ops.txt, gpu_timeline.png and the run "
                                      "(OUT/run: a new run folder).")] = Path("profile"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace trace.json, top_ops.txt and "
                                            "gpu_timeline.png if OUT holds them.")] = False,
) -> None:
    """Profile training steps with torch.profiler. Any `train` option may follow, e.g.
    `cityseg-fast profile --steps 20 --data DIR --batch-size 32`."""
    check_options({"steps": steps})
    train_command = typer.main.get_command(app).get_command(ctx, "train")
    try:
        train_ctx = train_command.make_context("train", list(ctx.args))
    except typer.TyperException as e:  # an unknown or malformed train option
        fail(f"profile: {e.format_message() if hasattr(e, 'format_message') else e}")
    given = given_options(train_ctx)
    if "resume" in given or "out" in given:
        fail("profile: --resume and --out are not train options here (the run goes to OUT/run)")
    check_options(given)
    cfg = resolve_config({**given, "out": out / "run"})
    check_config(cfg)
    from cityseg.profiling import profile_training

    profile_training(cfg, steps, out, console, run_training, overwrite=overwrite)

