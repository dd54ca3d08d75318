"""One validation layer for every number a user types: each option's allowed range lives here, and
every command checks its options against it before doing anything else.

    check_options({"rotate": 200.0, "log_every": 0})   # OptionError: --rotate 200: expected ...

A value outside its range is a one-line `OptionError` naming the option, the value and what is
allowed, instead of a division by zero, a feature silently switched off by NaN, or an error from
deep inside torch that names no option.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cityseg.config import Config, get_value
from cityseg.errors import OptionError


@dataclass(frozen=True)
class Number:
    """A finite number in [lo, hi] (either end may be open-ended); `whole` for integers."""

    lo: float | None = None
    hi: float | None = None
    whole: bool = False
    above_lo: bool = False  # lo itself excluded (e.g. a learning rate must be > 0)

    def problem(self, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "expected a number"
        if not math.isfinite(value):
            return "expected a finite number"
        if self.whole and value != int(value):
            return "expected a whole number"
        too_low = self.lo is not None and (value <= self.lo if self.above_lo else value < self.lo)
        too_high = self.hi is not None and value > self.hi
        return self.expectation() if too_low or too_high else None

    def expectation(self) -> str:
        kind = "a whole number" if self.whole else "a number"
        lo = None if self.lo is None else f"{self.lo:g}"
        hi = None if self.hi is None else f"{self.hi:g}"
        if lo is not None and hi is not None:
            return f"expected {kind} from {lo} to {hi}" + (f" (above {lo})" if self.above_lo else "")
        if lo is not None:
            return f"expected {kind} {'above' if self.above_lo else 'of at least'} {lo}"
        return f"expected {kind} of at most {hi}"


def count(lo: int = 0, hi: int | None = None) -> Number:
    return Number(lo, hi, whole=True)


SEED_MAX = 2**32 - 1  # numpy's and DALI's seed range; larger seeds overflow torch generators

# Option (parameter) name -> allowed values. The same name means the same thing in every command.
RULES: dict[str, Number] = {
    "epochs": count(1, 100_000),
    "batch_size": count(1, 65_536),
    "lr": Number(0, 10, above_lo=True),
    "width": count(1, 512),
    "depth": count(1, 8),
    "image_size": count(16, 8192),
    "workers": count(0, 256),
    "prefetch": count(1, 64),
    "hflip": Number(0, 1),
    "rotate": Number(0, 180),
    "jitter": Number(0, 1),
    "hue": Number(0, 0.5),
    "max_color_dist": Number(0, 442, above_lo=True),  # 442 > sqrt(3) * 255: every colour is near
    "weight_decay": Number(0, 10),
    "warmup_steps": count(0),
    "grad_clip": Number(0),
    "patience": count(0),
    "seed": count(0, SEED_MAX),
    "nproc": count(1, 1024),
    "max_steps": count(0),
    "log_every": count(1),
    "steps": count(1, 100_000),
    "sample": count(0),
    "train_pairs": count(1, 1_000_000),
    "val_pairs": count(1, 1_000_000),
    "pair_size": count(16, 4096),
}

# `--workers` where it counts threads, of which there must be one.
THREADS = {"workers": count(1, 256)}

# Parameters whose flag is not `--` + the name with dashes.
FLAGS = {"json_out": "--json", "fmt": "--format", "train_pairs": "--train", "val_pairs": "--val",
         "pair_size": "--size", "set_values": "--set"}


def flag(name: str) -> str:
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def check_options(values: Mapping[str, Any], rules: Mapping[str, Number] = RULES) -> None:
    """Raise OptionError for the first value outside its rule; None (unset) passes."""
    for name, value in values.items():
        rule = rules.get(name)
        if rule is None or value is None:
            continue
        problem = rule.problem(value)
        if problem:
            raise OptionError(f"{flag(name)} {value}: {problem}")


def parse_duration(text: str) -> float:
    """`--time-budget 20m` -> 1200.0: a number of seconds, or with s / m / h."""
    units = {"s": 1, "m": 60, "h": 3600}
    value, unit = (text[:-1], text[-1]) if text and text[-1].lower() in units else (text, "s")
    try:
        seconds = float(value) * units[unit.lower()]
    except ValueError:
        raise OptionError(f"--time-budget {text}: expected seconds or a number with s, m or h (e.g. 20m)") from None
    if not (math.isfinite(seconds) and seconds > 0):
        raise OptionError(f"--time-budget {text}: expected a positive duration (e.g. 20m)")
    return seconds


def parse_scale(text: str) -> tuple[float, float]:
    """`--scale LO,HI` -> (lo, hi) with 0 < lo <= hi <= 4."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise OptionError(f"--scale {text}: expected two numbers LO,HI such as 0.75,1.25") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi <= 4):
        raise OptionError(f"--scale {text}: expected 0 < LO <= HI <= 4")
    return lo, hi


# Option -> the config key(s) it sets. `jitter` sets three keys; `scale` is parsed from "LO,HI".
OPTION_KEYS: dict[str, str | tuple[str, ...]] = {
    "data": "data.data_dir", "image_size": "data.image_size", "batch_size": "data.batch_size",
    "loader": "data.loader", "cache": "data.cache", "workers": "data.workers", "prefetch": "data.prefetch",
    "palette": "data.palette", "max_color_dist": "data.max_color_dist", "skip_validate": "data.skip_validate",
    "skip_bad": "data.skip_bad", "hflip": "data.augment.hflip", "rotate": "data.augment.rotate_deg",
    "scale": "data.augment.scale",
    "jitter": ("data.augment.brightness", "data.augment.contrast", "data.augment.saturation"),
    "hue": "data.augment.hue", "width": "model.width", "depth": "model.depth", "upsample": "model.upsample",
    "epochs": "train.epochs", "lr": "train.lr", "weight_decay": "train.weight_decay",
    "warmup_steps": "train.warmup_steps", "grad_clip": "train.grad_clip", "class_weights": "train.class_weights",
    "device": "train.device", "precision": "train.precision", "amp": "train.precision",
    "compile": "train.compile", "compile_mode": "train.compile_mode", "sync_bn": "train.sync_bn",
    "seed": "train.seed", "patience": "train.patience", "log_every": "train.log_every",
    "max_steps": "train.max_steps", "out": "train.out", "time_budget": "train.time_budget_s",
    "target_acc": "train.target_acc", "schedule": "train.schedule", "loss": "train.loss", "ema": "train.ema",
    "norm": "model.norm", "tensorboard": "train.tensorboard", "init_from": "train.init_from",
}
# Config keys checked with the rule of the option that sets them (a config file's values too).
KEY_OPTIONS: dict[str, str] = {key: option for option, keys in OPTION_KEYS.items() if option in RULES
                               for key in (keys if isinstance(keys, tuple) else (keys,))}
KEY_OPTIONS.update({"data.synth_train": "train_pairs", "data.synth_val": "val_pairs", "data.synth_seed": "seed"})
KEY_RULES: dict[str, Number] = {"train.min_lr_ratio": Number(0, 1), "data.hw_decoder_load": Number(0, 1),
                                 "train.ema": Number(0, 0.99999), "train.time_budget_s": Number(0, 1e7, above_lo=True),
                                 "train.target_acc": Number(0, 1, above_lo=True)}
CHOICES: dict[str, tuple[str, ...]] = {
    "data.loader": ("auto", "torch", "dali", "cache"),
    "data.cache": ("none", "device"),
    "model.upsample": ("transpose", "bilinear"),
    "train.class_weights": ("none", "inverse-sqrt-freq"),
    "train.precision": ("auto", "bf16-mixed", "16-mixed", "32"),
    "train.schedule": ("cosine", "onecycle"),
    "train.clock": ("wall", "cpu"),
    "train.loss": ("ce", "ce+dice"),
    "model.norm": ("batch", "group"),
}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_config(cfg: Config) -> None:
    """Every value of a resolved config within its range and choices, and the sizes consistent:
    one OptionError naming the option (and the config key) before anything is built."""
    for key, option in KEY_OPTIONS.items():
        value = get_value(cfg, key)
        problem = None if value is None else RULES[option].problem(value)
        if problem:
            raise OptionError(f"{flag(option)} ({key}) {value}: {problem}")
    for key, rule in KEY_RULES.items():
        problem = None if get_value(cfg, key) is None else rule.problem(get_value(cfg, key))
        if problem:
            raise OptionError(f"{key} {get_value(cfg, key)}: {problem}")
    for key, choices in CHOICES.items():
        value = get_value(cfg, key)
        if value not in choices:
            raise OptionError(f"{key} {value!r}: expected one of {', '.join(choices)}")
    mode = cfg.train.compile_mode
    if mode is not None and mode not in COMPILE_MODES:
        raise OptionError(f"--compile-mode {mode}: expected one of {', '.join(COMPILE_MODES)}")
    device = cfg.train.device
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdecimal()):
        raise OptionError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
    lo, hi = cfg.data.augment.scale
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi <= 4):
        raise OptionError(f"--scale {lo:g},{hi:g}: expected 0 < LO <= HI <= 4")
    size, depth = cfg.data.image_size, cfg.model.depth
    if size % 2**depth:
        lower, upper = size // 2**depth * 2**depth, (size // 2**depth + 1) * 2**depth
        nearest = f"{lower} or {upper}" if lower else f"{upper}"
        raise OptionError(f"--image-size {size}: a U-Net of --depth {depth} needs a multiple of 2**{depth} = "
                          f"{2**depth} (nearest: {nearest})")
