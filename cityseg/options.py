"""One validation layer for every number a user types: the run settings' ranges and choices as
declared with them (cityseg/config.py), the commands' own options' ranges here, and every command
checks its options against them before doing anything else; config files and checkpoints too.

    check_options({"rotate": 200.0, "log_every": 0})   # OptionError: --rotate 200: expected ...

A value outside its range is a one-line `OptionError` naming the option, the value and what is
allowed, instead of a division by zero, a feature silently switched off by NaN, or an error from
deep inside torch that names no option.
"""

from __future__ import annotations

import functools
import json
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cityseg.config import SETTINGS, Config, get_value
from cityseg.errors import OptionError, capped
from cityseg.settings import PALETTE_MAX, Number, count, parse_val_every, scale_problem

# Options of every command by parameter name -> allowed values; the same name means the same thing in
# every command. Those that are run settings come from the config's declarations (cityseg/config.py);
# these are the commands' own.
COMMAND_RULES: dict[str, Number] = {
    "nproc": count(1, 1024),
    "steps": count(1, 100_000),
    "sample": count(0),
    "train_pairs": SETTINGS["data.synth_train"].rule,
    "val_pairs": SETTINGS["data.synth_val"].rule,
    "pair_size": count(16, 4096),
    "far_dist": SETTINGS["data.max_color_dist"].rule,  # check-data: the same colour distance
}
# Option name -> the config key(s) its flag sets (`--jitter` sets three).
OPTION_KEYS: dict[str, tuple[str, ...]] = {s.name: (key, *s.also) for key, s in SETTINGS.items() if s.name}
RULES: dict[str, Number] = {
    **{s.name: s.rule for s in SETTINGS.values() if s.name and s.rule is not None},
    **COMMAND_RULES,
}
# Config keys with a choice list (the CLI's enums and config files' checks alike).
CHOICES: dict[str, tuple[str, ...]] = {key: s.choices for key, s in SETTINGS.items() if s.choices is not None}

# `synth --workers`: processes writing pairs, of which there must be one.
SYNTH_WORKERS = {"workers": count(1, 256)}

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


def check_config(cfg: Config, *, read_files: bool = True) -> None:
    """Every value of a resolved config within its range and choices, and the sizes consistent:
    one OptionError naming the option (and the config key) before anything is built. The same
    check applies to a config read from a checkpoint (`read_files=False`: its palette travels inside)."""
    check_palette_spec(cfg.data.palette)
    if read_files and cfg.data.palette.endswith(".json") and cfg.train.resume is None:
        read_palette_file(Path(cfg.data.palette))  # resume takes the palette saved in last.pt
    for key, setting in SETTINGS.items():
        value = get_value(cfg, key)
        problem = setting.problem(value)
        if problem:
            named = f"{setting.option} ({key})" if setting.option else key
            raise OptionError(f"{named} {capped(repr(value) if isinstance(value, str) else str(value), 200)}: "
                              f"{problem}")
    parse_val_every(cfg.train.val_every)
    device = cfg.train.device
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdecimal()):
        raise OptionError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
    lo, hi = cfg.data.augment.scale
    problem = scale_problem(lo, hi)
    if problem:
        raise OptionError(f"--scale {lo:g},{hi:g}: {problem}")
    m = cfg.model
    if m.encoder == "unet" and m.encoder_weights not in ("auto", "none"):
        raise OptionError(f"--encoder-weights {capped(m.encoder_weights, 200)}: our U-Net (--encoder unet) has no "
                          "pretrained weights: pick a timm --encoder (e.g. tf_efficientnet_lite0) or leave it unset")
    size, depth = cfg.data.image_size, cfg.model.depth
    if m.encoder == "unet" and size % 2**depth:  # an encoder's output stride: model.size_problem, at build
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
    problem = SETTINGS["data.max_color_dist"].problem(max_dist)
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
    `data.data_dir` and `train.init_from` are relative to the file. Any problem is one OptionError naming the file."""
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
    tree.pop("resolved", None)  # a run's record of how auto's values were found: the values are in the sections
    values = flatten(tree)
    for key in ("train.out", "train.resume"):
        values.pop(key, None)
    for key in ("data.data_dir", "train.init_from"):
        if isinstance(values.get(key), str):  # relative to the file, like a path in it; another type is refused later
            values[key] = str((path.parent / values[key]).absolute())
    return values


def _parse_config(text: str, suffix: str) -> Any:
    if suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI
            import tomli as tomllib
        return tomllib.loads(text)
    if suffix == ".json":
        return json.loads(text, object_pairs_hook=_unique_keys)
    return load_yaml(text)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different: a second `lr` would silently win."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise OptionError(f"duplicate key {capped(repr(key), 100)}: only one value can count")
        out[key] = value
    return out


def load_yaml(text: str) -> Any:
    """YAML as `--config` and `--set` read it: safely (plain types), with few aliases, no duplicate
    keys, and `1e-3` a number as in TOML, JSON and Python (YAML 1.1 wants `1.0e-3`)."""
    import yaml

    loader = _config_yaml_loader(yaml)(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


# YAML 1.1's float pattern, plus exponents without a dot (1e-3, 5E4): what every other reader takes.
YAML_FLOAT = r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$"""


@functools.cache
def _config_yaml_loader(yaml: Any) -> type:
    """yaml.SafeLoader (plain types only, never `!!python` objects) that refuses a document with
    more than MAX_YAML_ALIASES aliases (a few hundred bytes of nested aliases expand to gigabytes)
    and a mapping with a key twice (`train: {lr: 0.001, lr: 0.002}`, two `train:` blocks: YAML keeps
    the last without a word), and reads `1e-3` as a number."""

    class ConfigLoader(yaml.SafeLoader):
        aliases = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                self.aliases += 1
                if self.aliases > MAX_YAML_ALIASES:
                    raise OptionError(f"more than {MAX_YAML_ALIASES} YAML aliases (*name): refused")
            return super().compose_node(parent, index)

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then overrides: allowed
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        line = key_node.start_mark.line + 1
                        raise OptionError(f"duplicate key {capped(repr(key), 100)} (line {line}): only one value "
                                          "can count")
                    seen.add(key)
                except TypeError:  # an unhashable key: the parser's own error says so
                    break
            return super().construct_mapping(node, deep=deep)

    ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(YAML_FLOAT, re.X),
                                       list("-+0123456789."))
    return ConfigLoader


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
