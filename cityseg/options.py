"""One validation layer for every number a user types: each option's allowed range lives here, and
every command checks its options against it before doing anything else.

    check_options({"rotate": 200.0, "log_every": 0})   # OptionError: --rotate 200: expected ...

A value outside its range is a one-line `OptionError` naming the option, the value and what is
allowed, instead of a division by zero, a feature silently switched off by NaN, or an error from
deep inside torch that names no option.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cityseg.config import Config, get_value
from cityseg.errors import OptionError, capped


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


@dataclass(frozen=True)
class NumberOrAuto(Number):
    """A Number, or the word `auto` (the run picks the value for its device)."""

    def problem(self, value: Any) -> str | None:
        if value == "auto":
            return None
        return self.expectation() if isinstance(value, str) else super().problem(value)

    def expectation(self) -> str:
        return super().expectation() + " or auto"


def parse_batch_size(text: str | None) -> int | str | None:
    """`--batch-size 32` -> 32, `--batch-size auto` -> "auto"; anything else is an OptionError."""
    if text is None or text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise OptionError(f"--batch-size {text}: {RULES['batch_size'].expectation()}") from None


SEED_MAX = 2**32 - 1  # numpy's and DALI's seed range; larger seeds overflow torch generators

# Option (parameter) name -> allowed values. The same name means the same thing in every command.
RULES: dict[str, Number] = {
    "epochs": count(1, 100_000),
    "batch_size": NumberOrAuto(1, 65_536, whole=True),
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

PALETTE_MAX = 64  # centres and classes of a palette: the Triton kernel unrolls its loop over centres

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


VAL_EVERY_HELP = "auto, N (epochs), Nsteps, or a training time such as 30s / 2m"


def parse_val_every(text: str) -> tuple[str, float]:
    """`--val-every` -> (unit, amount): `auto` -> ("auto", 0); `2` -> ("epochs", 2); `300steps` ->
    ("steps", 300); `30s` / `2m` / `1h` -> ("seconds", 30 / 120 / 3600) of training time."""
    t = str(text).strip().lower()
    if t == "auto":
        return "auto", 0.0
    units = {"steps": ("steps", 1), "step": ("steps", 1), "epochs": ("epochs", 1), "epoch": ("epochs", 1),
             "s": ("seconds", 1), "m": ("seconds", 60), "h": ("seconds", 3600)}
    suffix = next((u for u in sorted(units, key=len, reverse=True) if t.endswith(u)), "")
    unit, scale = units.get(suffix, ("epochs", 1))
    number = t[: len(t) - len(suffix)].strip()
    try:
        amount = float(number) * scale
    except ValueError:
        amount = float("nan")
    whole = unit == "seconds" or amount == int(amount) if math.isfinite(amount) else False
    if not (math.isfinite(amount) and amount > 0 and whole):
        raise OptionError(f"--val-every {text}: expected {VAL_EVERY_HELP}")
    return unit, amount


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
    "val_every": "train.val_every",
}
# Config keys checked with the rule of the option that sets them (a config file's values too).
KEY_OPTIONS: dict[str, str] = {key: option for option, keys in OPTION_KEYS.items() if option in RULES
                               for key in (keys if isinstance(keys, tuple) else (keys,))}
KEY_OPTIONS.update({"data.synth_train": "train_pairs", "data.synth_val": "val_pairs", "data.synth_seed": "seed"})
KEY_RULES: dict[str, Number] = {"train.min_lr_ratio": Number(0, 1), "data.hw_decoder_load": Number(0, 1),
                                 "train.ema": Number(0, 0.99999), "train.time_budget_s": Number(0, 1e7, above_lo=True),
                                 "train.target_acc": Number(0, 1, above_lo=True),
                                 "model.num_classes": count(1, PALETTE_MAX)}
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


def check_config(cfg: Config, *, read_files: bool = True) -> None:
    """Every value of a resolved config within its range and choices, and the sizes consistent:
    one OptionError naming the option (and the config key) before anything is built. The same
    check applies to a config read from a checkpoint (`read_files=False`: its palette travels inside)."""
    check_palette_spec(cfg.data.palette)
    if read_files and cfg.data.palette.endswith(".json") and cfg.train.resume is None:
        read_palette_file(Path(cfg.data.palette))  # resume takes the palette saved in last.pt
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
    parse_val_every(cfg.train.val_every)
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


# -- palettes: `--palette` and the palette JSON file, a checkpoint's palette alike -------------------

MAX_PALETTE_FILE = 1 << 20  # bytes: a palette of 64 centres is a few kB


def check_palette_spec(spec: str) -> None:
    """`--palette` is cityscapes, kmeans:K (K in 2..PALETTE_MAX) or a .json file name."""
    if spec == "cityscapes" or spec.endswith(".json"):
        return
    if spec.startswith("kmeans:"):
        k = spec.removeprefix("kmeans:")
        if not (k.isascii() and k.isdigit()) or not 2 <= int(k) <= PALETTE_MAX:
            raise OptionError(f"--palette {capped(spec, 100)}: expected kmeans:K with K a whole number from 2 to "
                              f"{PALETTE_MAX}")
        return
    raise OptionError(f"--palette {capped(spec, 100)}: expected cityscapes, kmeans:K (K from 2 to {PALETTE_MAX}) "
                      "or a palette .json file (e.g. a run's palette.json)")


def read_palette_file(path: Path) -> dict[str, Any]:
    """The checked content of a palette JSON file (see `palette_problem`), or one OptionError naming it."""
    text = read_small_text(path, "--palette", MAX_PALETTE_FILE)
    try:
        data = json.loads(text)
    except ValueError as e:
        raise OptionError(f"--palette {path}: not valid JSON ({capped(str(e), 200)})") from None
    problem = palette_problem(data)
    if problem:
        raise OptionError(f"--palette {path}: not a usable palette: {problem}")
    return data


def read_small_text(path: Path, option: str, limit: int) -> str:
    """A regular UTF-8 text file of at most `limit` bytes, checked before reading (a FIFO would block,
    /dev/zero never ends); any problem is one OptionError naming `option` and the file."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise OptionError(f"{option} {path}: file not found") from None
    except OSError as e:
        raise OptionError(f"{option} {path}: cannot read it ({e.strerror or e})") from None
    if stat.S_ISDIR(info.st_mode):
        raise OptionError(f"{option} {path}: is a folder, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise OptionError(f"{option} {path}: not a regular file (a pipe or a device); give a file")
    if info.st_size > limit:
        raise OptionError(f"{option} {path}: {info.st_size:,} bytes, more than the {limit:,} such a file may have")
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise OptionError(f"{option} {path}: cannot read it ({e.strerror or e})") from None
    if len(raw) > limit:  # grew since the stat
        raise OptionError(f"{option} {path}: more than the {limit:,} bytes such a file may have")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OptionError(f"{option} {path}: not UTF-8 text (byte {e.start})") from None


def _plain(value: Any) -> Any:
    """Tensors and arrays (a checkpoint's palette) as lists, like a JSON file's."""
    return value.tolist() if hasattr(value, "tolist") else value


def _rgb_rows(rows: Any, what: str) -> str | None:
    if not isinstance(rows, list) or not rows:
        return f"{what}: expected a non-empty list of [R, G, B]"
    for row in rows:
        if not isinstance(row, list) or len(row) != 3:
            return f"{what}: expected [R, G, B] triples, got {capped(repr(row), 60)}"
        for v in row:
            problem = count(0, 255).problem(v)
            if problem:
                return f"{what}: {capped(repr(v), 40)}: {problem.replace('expected', 'expected colour values as')}"
    return None


def palette_problem(data: Any) -> str | None:
    """What is wrong with a palette's content (a JSON file's, or a checkpoint's state), else None:
    1..PALETTE_MAX centres as whole RGB values, one class id (or 255, void) per centre, one name and
    one colour per class, max_dist empty or a distance as `--max-color-dist` allows."""
    if not isinstance(data, dict):
        return f"expected an object with centers, classes, names and colors, got a {type(data).__name__}"
    missing = sorted({"centers", "classes", "names", "colors"} - data.keys())
    if missing:
        return f"missing {', '.join(missing)}"
    centers, classes, names, colors = (_plain(data[k]) for k in ("centers", "classes", "names", "colors"))
    problem = _rgb_rows(centers, "centers") or _rgb_rows(colors, "colors")
    if problem:
        return problem
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and len(n) <= 100 for n in names):
        return "names: expected a non-empty list of class names (at most 100 characters each)"
    if len(centers) > PALETTE_MAX or len(names) > PALETTE_MAX:
        return f"{len(centers)} centres and {len(names)} classes: at most {PALETTE_MAX} of each"
    if len(colors) != len(names):
        return f"{len(names)} names but {len(colors)} colours"
    if not isinstance(classes, list) or len(classes) != len(centers):
        return f"classes: expected one class id per centre ({len(centers)})"
    for c in classes:
        if isinstance(c, bool) or not isinstance(c, int) or not (0 <= c < len(names) or c == 255):
            return f"classes: {capped(repr(c), 40)}: expected a class id from 0 to {len(names) - 1}, or 255 (void)"
    max_dist = _plain(data.get("max_dist"))
    problem = None if max_dist is None else RULES["max_color_dist"].problem(max_dist)
    if problem:
        return f"max_dist {capped(repr(max_dist), 40)}: {problem}"
    return None


# -- config files: `train --config FILE` ---------------------------------------------------------------

MAX_CONFIG_FILE = 1 << 20  # bytes: a full config is about 2 kB
MAX_CONFIG_DEPTH = 8  # sections: data.augment.hflip is 3 deep
MAX_YAML_ALIASES = 20  # a "billion laughs" file is a few hundred bytes of aliases of aliases; configs need few
CONFIG_SUFFIXES = (".toml", ".yaml", ".yml", ".json")


def read_config_file(path: Path) -> dict[str, Any]:
    """A TOML, YAML or JSON file (a run's config.json too) as {config key: value}; the suffix, kind and
    size are checked before reading, the text must be UTF-8, YAML is read safely with few aliases.
    The run folder (`train.out`) and `train.resume` are command-line choices and not taken from a file;
    `data.data_dir` is relative to the file. Any problem is one OptionError naming the file."""
    from cityseg.config import flatten

    suffix = path.suffix.lower()
    if suffix not in CONFIG_SUFFIXES:
        raise OptionError(f"--config {path}: expected a .toml, .yaml/.yml or .json file")
    text = read_small_text(path, "--config", MAX_CONFIG_FILE)
    try:
        tree = _parse_config(text, suffix)
    except OptionError as e:
        raise OptionError(f"--config {path}: {e}") from None
    except RecursionError:
        raise OptionError(f"--config {path}: nested too deeply (at most {MAX_CONFIG_DEPTH} levels)") from None
    except Exception as e:  # noqa: BLE001 - every parser's syntax error becomes one line
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise OptionError(f"--config {path}: not valid {suffix[1:].upper()} ({capped(first, 200)})") from None
    if not isinstance(tree, dict):
        raise OptionError(f"--config {path}: expected sections such as [train] or keys such as train.lr")
    if _depth(tree) > MAX_CONFIG_DEPTH:
        raise OptionError(f"--config {path}: nested too deeply (at most {MAX_CONFIG_DEPTH} levels)")
    values = flatten(tree)
    for key in ("train.out", "train.resume"):
        values.pop(key, None)
    data_dir = values.get("data.data_dir")
    if isinstance(data_dir, str):  # relative to the file, like a path in it; another type is refused later
        values["data.data_dir"] = str((path.parent / data_dir).absolute())
    return values


def _parse_config(text: str, suffix: str) -> Any:
    if suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI
            import tomli as tomllib
        return tomllib.loads(text)
    if suffix == ".json":
        return json.loads(text)
    import yaml

    loader = _alias_limited_loader(yaml)(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _alias_limited_loader(yaml: Any) -> type:
    """yaml.SafeLoader (plain types only, never `!!python` objects) that refuses a document with
    more than MAX_YAML_ALIASES aliases: a few hundred bytes of nested aliases expand to gigabytes."""

    class AliasLimitedLoader(yaml.SafeLoader):
        aliases = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                self.aliases += 1
                if self.aliases > MAX_YAML_ALIASES:
                    raise OptionError(f"more than {MAX_YAML_ALIASES} YAML aliases (*name): refused")
            return super().compose_node(parent, index)

    return AliasLimitedLoader


def _depth(tree: Any) -> int:
    """Nesting depth of dicts and lists, counted without recursion (a deep file must not crash this)."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_CONFIG_DEPTH:
            return deepest
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest
