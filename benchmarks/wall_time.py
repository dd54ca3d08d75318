"""Wall time against time in steps: how much of a real training run goes to training, with short epochs.

    python -m benchmarks.wall_time --data ../shared/data/cityscapes_pairs_sample --quick     # CPU, ~2 min
    python -m benchmarks.wall_time --data DIR --size 256 --width 32 --batch 16 --epochs 40    # a GPU

For each --val-every setting (default: `1`, validation and checkpoints after every epoch as before
issue 21, then `auto`, the default), `train(cfg)` runs as the CLI runs it (fresh run folder, the
engine's precision and compile defaults, warm-up before the clock) and reports, side by side:
- in-step img/s: images trained / seconds inside training steps (data waits included), summary.json's
  `images_per_s`;
- wall img/s: images trained / wall seconds from the first step (validation, checkpoints, reports
  included), summary.json's `wall_images_per_s`; and their ratio (the issue asks >= 0.9 with `auto`);
- the timing breakdown: start-up, warm-up, train, val, checkpoint, other (seconds), and validations.
Results: benchmarks/results/wall_time-<cpu|gpu>.json (or --json).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    result_file,
)
from cityseg.config import AugmentConfig, Config, DataConfig, ModelConfig, TrainConfig

TIMED = ("startup_s", "warmup_s", "train_s", "val_s", "checkpoint_s", "other_s", "elapsed_s")


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = new_parser("wall_time", __doc__, prog)
    p.add_argument("--data", type=Path, required=True, help="a folder of Kaggle-format pairs (train/ and val/)")
    p.add_argument("--quick", action="store_true", help="CPU-sized: 64 px, width 8, depth 3, batch 8, 12 epochs")
    p.add_argument("--val-every", default="1,auto", help="comma-separated --val-every settings to compare")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--loader", default="auto")
    p.add_argument("--reps", type=int, default=1, help="runs per setting (the median is reported)")
    p.add_argument("--device", default="auto")
    return p


def make_config(args: argparse.Namespace, val_every: str, out: Path) -> Config:
    return Config(
        data=DataConfig(data_dir=str(args.data), image_size=args.size, batch_size=args.batch, workers=args.workers,
                        loader=args.loader, augment=AugmentConfig(hflip=0.5)),
        model=ModelConfig(width=args.width, depth=args.depth),
        train=TrainConfig(epochs=args.epochs, device=str(args.device), val_every=val_every, out=str(out),
                          tensorboard=True, log_every=20),
    )


def train_once(cfg: Config) -> dict[str, Any]:
    from rich.console import Console

    from cityseg.training import train

    summary = train(cfg, console=Console(quiet=True))
    row = {k: summary[k] for k in TIMED} | {k: summary[k] for k in (
        "images_per_s", "wall_images_per_s", "images_trained", "validations", "epochs", "steps", "precision",
        "compile", "loader", "compile_cache")}
    row["wall_over_in_step"] = summary["wall_images_per_s"] / summary["images_per_s"]
    row["final_pixel_acc"] = summary["final"]["pixel_acc"]
    return row


def run(argv: Sequence[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    args = parser(prog).parse_args(argv)
    args.device = device = pick_device(args.device)
    gpu = device.type == "cuda"
    quick = args.quick or not gpu
    args.size = args.size or (64 if quick else 256)
    args.width = args.width or (8 if quick else 32)
    args.depth = args.depth or 3
    args.batch = args.batch or (8 if quick else 16)
    args.epochs = args.epochs or (12 if quick else 40)
    settings = [v.strip() for v in args.val_every.split(",") if v.strip()]
    from cityseg.data.pairs import list_split

    n_train, n_val = len(list_split(args.data, "train")), len(list_split(args.data, "val"))
    config = {"data": str(args.data), "n_train": n_train, "n_val": n_val,
              "steps_per_epoch": n_train // args.batch, "val_every": settings} | {
        k: getattr(args, k) for k in ("epochs", "size", "width", "depth", "batch", "workers", "loader", "reps")}
    out = result_file(args, "wall_time", device_kind(device))
    record = new_record("wall_time", device, command_line("wall_time", argv), config)
    print_header(record)
    with tempfile.TemporaryDirectory(prefix="wall-time-") as tmp:
        for setting in settings:
            print(f"  --val-every {setting} ...", flush=True)
            runs = [train_once(make_config(args, setting, Path(tmp) / f"run-{setting}-{r}")) for r in range(args.reps)]
            row = {"val_every": setting, "runs": runs} | {
                k: median([r[k] for r in runs]) for k in (*TIMED, "images_per_s", "wall_images_per_s",
                                                          "wall_over_in_step", "validations")}
            record["results"].append(row)
            finish_record(record, out, done=False)
    record["notes"].append("wall img/s counts from the first step (start-up and warm-up apart, in their own "
                           "columns); in-step img/s counts seconds inside training steps, data waits included")
    columns = [("val_every", "--val-every", ""), ("images_per_s", "in-step img/s", ".1f"),
               ("wall_images_per_s", "wall img/s", ".1f"), ("wall_over_in_step", "wall/in-step", ".3f"),
               ("validations", "vals", ".0f"), ("startup_s", "startup s", ".1f"), ("warmup_s", "warm-up s", ".2f"),
               ("train_s", "train s", ".1f"), ("val_s", "val s", ".2f"), ("checkpoint_s", "ckpt s", ".2f"),
               ("other_s", "other s", ".2f")]
    print_table(record["results"], columns,
                title=f"{args.epochs} epochs of {config['steps_per_epoch']} steps, width {args.width}, batch "
                      f"{args.batch}, {args.size}px, {n_val} val pairs, on {record['device']}")
    finish_record(record, out)
    return record


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    run(argv, prog)
    return 0


if __name__ == "__main__":
    exit_with(main)
