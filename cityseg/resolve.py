"""How a run's config comes to be: the one function every way of starting a run goes through (the
`train` and `profile` commands, `cityseg.train`, benchmarks/accuracy.py, the GPU suite).

    run = resolve_run({"data.data_dir": "DIR", "train.time_budget_s": 1200.0})
    run = resolve_run({"train.resume": "runs/a", "train.epochs": 20})      # continue a run
    summary = cityseg.train(run)

A new run: the dataclasses' defaults, then the presets that apply (`cityseg.config.PRESETS`), then the
`--init-from` checkpoint's architecture and image size, then a config file, then `values` (what the
user typed), then `--set`; a time budget without an epoch count lifts the epochs. A resumed run: the
config saved in its last.pt, then only the values `--resume` may change (the settings marked
`resume`), the same time-budget rule. Then every value is checked. Checkpoints read here (last.pt,
the `--init-from` file) are returned with the config, so the run never reads them a second time.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from cityseg.config import (
    AUTO,
    SETTINGS,
    Config,
    budget_decides_epochs,
    one_spelling,
    train_config,
    with_overrides,
)
from cityseg.errors import OptionError
from cityseg.options import check_config, read_config_file
from cityseg.settings import CUDAGRAPH_MODES


@dataclass(frozen=True)
class ResolvedRun:
    """A run's checked config and what was read to make it: `state` is last.pt's content (a resume),
    `init` the `--init-from` checkpoint's (state, model config); `notes` are for the user to see;
    `derived` records how values the run derives were found (config.json's "resolved" section)."""

    config: Config
    state: dict[str, Any] | None = None
    init: tuple[dict[str, Any], Any] | None = None
    notes: tuple[str, ...] = field(default=())
    derived: dict[str, Any] = field(default_factory=dict)


def flag_of(key: str) -> str:
    """How the user names a config key: its flag, else the key itself (a config file's, `--set`'s)."""
    setting = SETTINGS.get(key)
    return setting.option if setting is not None and setting.option else key


RESUME_KEYS = frozenset(key for key, s in SETTINGS.items() if s.resume)


def resolve_run(values: dict[str, Any] | None = None, *, config_file: Path | None = None,
                set_values: dict[str, Any] | None = None, smoke: bool = False) -> ResolvedRun:
    """The run that `values` ({config key: value}, e.g. {"train.lr": 1e-3}) and the other sources
    describe (see the module docstring); any problem is one UserError naming the option or file."""
    values = dict(values or {})
    set_values = checked_set_values(set_values or {})
    resume = values.get("train.resume")
    if resume is not None:
        return resumed_run(Path(resume).absolute(), values, config_file, set_values)
    layers: list[tuple[str, dict[str, Any]]] = []
    init, notes = None, []
    if config_file is not None:
        layers.append((str(config_file), read_config_file(Path(config_file))))
    layers.append(("command line", values))
    if set_values:
        layers.append(("--set", set_values))
    # --init-from from wherever it was given (a config file, a run's config.json, --set): the same effect
    init_from = next((v["train.init_from"] for _, v in reversed(layers) if v.get("train.init_from") is not None), None)
    if not isinstance(init_from, str):  # another type is refused with the others, by name
        init_from = None
    if init_from is not None:  # the checkpoint's architecture and size, unless flags change them
        init_state, saved = read_init_checkpoint(Path(init_from))
        layers.insert(0, ("--init-from", architecture_values(saved)))
    if init_from is not None and "data.image_size" not in {k for _, v in layers[1:] for k in v}:
        notes.append(f"--init-from: training at the checkpoint's image size, {layers[0][1]['data.image_size']} px "
                     "(--image-size changes it)")
    on_cpu = on_a_cpu({k: v for _, layer in layers for k, v in layer.items()}.get("train.device", "auto"))
    cfg = one_spelling(train_config(layers, on_cpu=on_cpu, smoke=smoke))
    check_config(cfg)
    cfg = classes_from_palette(cfg, source=last_source(layers, "model.num_classes"))
    check_ddp_compile_mode(cfg.train.compile_mode, world_size())
    cfg, derived = batch_from_rule(cfg, on_cpu=on_cpu)
    if init_from is not None:
        from cityseg.checkpoint import check_init_architecture

        check_init_architecture(saved.model, Path(init_from), cfg.model)
        init = (init_state, saved.model)
    return ResolvedRun(cfg, init=init, notes=tuple(notes), derived=derived)


def last_source(layers: list[tuple[str, dict[str, Any]]], key: str) -> str | None:
    """The name of the last layer that sets `key` (the one whose value counts), or None."""
    return next((name for name, values in reversed(layers) if key in values), None)


def classes_from_palette(cfg: Config, source: str | None) -> Config:
    """The class count is the palette's (19 for cityscapes, K for kmeans:K, a saved palette's own): set
    here, before anything is built; a different count that a file or `--set` gives is refused."""
    from cityseg.palette_kmeans import palette_class_count

    count = palette_class_count(cfg.data.palette)
    if source is not None and cfg.model.num_classes != count:
        raise OptionError(f"{source}: model.num_classes={cfg.model.num_classes} but --palette {cfg.data.palette} "
                          f"makes {count} classes: the palette decides the class count (leave model.num_classes out)")
    return replace(cfg, model=replace(cfg.model, num_classes=count))


def check_ddp_compile_mode(mode: str | None, ranks: int) -> None:
    """Refuse a CUDA-graph compile mode for a multi-rank run (one line, before any rank builds anything):
    under DDP the gradient all-reduce hooks run between the backward's graphs, and BatchNorm's running
    statistics are mutated inputs, for which cudagraph trees skip the graphs (pytorch#139207: >10x
    slower) or fail in eval after train (pytorch#128218)."""
    if ranks > 1 and mode in CUDAGRAPH_MODES:
        raise OptionError(f"--compile-mode {mode} records CUDA graphs, which DDP runs cannot use (all-reduce hooks "
                          "between graphs; BatchNorm statistics as mutated inputs): use default or "
                          "max-autotune-no-cudagraphs with --nproc")


def world_size() -> int:
    """Ranks of this run: torchrun's WORLD_SIZE, else 1."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def batch_from_rule(cfg: Config, *, on_cpu: bool) -> tuple[Config, dict[str, Any]]:
    """`--batch-size auto` made a number where that needs no GPU trial (cityseg/batch_rule.py): on a CPU
    always, on a GPU from the cache of an earlier trial; lr and warm-up follow. Else it stays `auto`
    (the run measures it before building anything) and the record says so."""
    if cfg.data.batch_size != AUTO:
        return cfg, {}
    from cityseg.batch_rule import apply_choice, cache_key, cached_choice, cpu_choice, data_cap
    from cityseg.data.loaders import train_file_count
    from cityseg.errors import UserError

    try:
        files = train_file_count(cfg.data)
    except UserError:  # a missing or empty folder: the run itself says so, in its own words
        return cfg, {"batch_size": {"batch_size": AUTO, "reason": "the data folder could not be listed"}}
    if on_cpu:
        choice = cpu_choice(files, world_size())
    else:
        import torch

        from cityseg.runtime import resolve_device

        name = torch.cuda.get_device_name(resolve_device(cfg.train.device))
        choice = cached_choice(cache_key(cfg, name, torch.__version__, world_size(), data_cap(files, world_size())))
        if choice is None:
            return cfg, {"batch_size": {"batch_size": AUTO, "reason": "measured by trial steps when the run starts"}}
    return apply_choice(cfg, choice), {"batch_size": choice.to_record()}


def checked_set_values(set_values: dict[str, Any]) -> dict[str, Any]:
    """`--set` values with the paths made absolute, as their flags make them; `train.resume` is
    refused: a run is continued with `--resume RUN` (its settings come from its last.pt), not set."""
    if "train.resume" in set_values:
        raise OptionError(f"--set train.resume={set_values['train.resume']}: continue a run with --resume RUN "
                          "(its settings come from its last.pt)")
    return {key: str(Path(value).absolute()) if SETTINGS.get(key) is not None and SETTINGS[key].path
            and isinstance(value, str) else value for key, value in set_values.items()}


def read_init_checkpoint(path: Path) -> tuple[dict[str, Any], Config]:
    """The `--init-from` checkpoint's content and its (checked) config."""
    from cityseg.checkpoint import load_checkpoint, read_config

    state = load_checkpoint(path)
    return state, read_config(state, path)


def architecture_values(saved: Config) -> dict[str, Any]:
    """A checkpoint's architecture and image size as config values: a model trained at 64 px is
    fine-tuned at 64 px unless --image-size says otherwise, not silently at a preset's size."""
    return {**{f"model.{k}": v for k, v in asdict(saved.model).items() if k != "num_classes"},
            "data.image_size": saved.data.image_size}


def resumed_run(run: Path, values: dict[str, Any], config_file: Path | None,
                set_values: dict[str, Any] | None) -> ResolvedRun:
    """The config saved in RUN's last.pt with the values `--resume` may change applied."""
    refused = sorted({flag_of(k) for k in values if k not in RESUME_KEYS | {"train.resume"}})
    refused[:0] = [name for name, given in (("--config", config_file), ("--set", set_values)) if given]
    if refused:
        allowed = ", ".join(sorted({flag_of(k) for k in RESUME_KEYS}))
        raise OptionError(f"--resume {run}: {', '.join(refused)} would change the run it continues (its settings "
                          f"are in its last.pt); with --resume only {allowed} apply. To start a new run from "
                          f"its weights: --init-from {run / 'checkpoints' / 'last.pt'}")
    from cityseg.checkpoint import read_config
    from cityseg.outputs import check_not_in_use

    check_not_in_use(run)
    last = run / "checkpoints" / "last.pt"
    state = read_resumable(run, last)
    cfg = read_config(state, last)
    overrides = {k: v for k, v in values.items() if k in RESUME_KEYS}
    overrides.setdefault("train.max_steps", 0)  # the stop of the session that saved it is not this one's
    overrides["train.resume"] = str(run)
    cfg = one_spelling(budget_decides_epochs(with_overrides(cfg, overrides, "--resume"), values))
    check_config(cfg)
    applied = sorted({flag_of(k) for k in values if k in RESUME_KEYS})
    notes = (f"resume: applying {', '.join(applied)}; everything else as saved in {last}",) if applied else ()
    if state["epoch"] >= cfg.train.epochs and "unvalidated" not in state.get("partial", {}):
        nothing = f"the run has trained {state['epoch']} epochs: --epochs {cfg.train.epochs} leaves nothing to train"
        if completed(run):
            raise OptionError(f"--resume {run}: {nothing}; give --epochs above {state['epoch']} to train on")
        notes += (f"resume: {nothing}; writing the summary a stop before the end left out",)
    return ResolvedRun(cfg, state=state, notes=notes)


def completed(run: Path) -> bool:
    """RUN/summary.json says the run ran to its end."""
    import json

    try:
        return json.loads((run / "summary.json").read_text()).get("completed") is True
    except (OSError, ValueError, AttributeError):
        return False


def read_resumable(run: Path, last: Path) -> dict[str, Any]:
    """last.pt's content; where it is missing or unreadable, the error says what can be done instead."""
    from cityseg.checkpoint import CheckpointError, read_training_checkpoint

    if not last.exists() and (run / "config.json").is_file():
        raise CheckpointError(f"--resume {run}: the run stopped before its first checkpoint, so there is nothing to "
                              f"resume: delete {run} and start it again, or start a new run with another --out")
    try:
        return read_training_checkpoint(last)
    except CheckpointError as e:
        best = run / "checkpoints" / "best.pt"
        if not best.is_file():
            raise
        raise CheckpointError(f"{e}; it cannot be resumed, but a new run can start from its best weights: "
                              f"--init-from {best}") from None


def resolved_from_config(cfg: Config) -> ResolvedRun:
    """A complete Config given to `cityseg.train`: taken as it is (older spellings made current),
    checked, and its checkpoints read (with `train.resume`, last.pt's model settings must be the config's).
    A new run derives its class count and auto's batch as the command line does."""
    cfg = one_spelling(cfg)
    check_config(cfg)
    if cfg.train.resume is not None:
        from cityseg.checkpoint import CheckpointError, architecture_diffs, read_training_checkpoint

        last = Path(cfg.train.resume) / "checkpoints" / "last.pt"
        state = read_training_checkpoint(last)
        diffs = architecture_diffs(state["config"]["model"], cfg.model)
        if diffs:
            raise CheckpointError(f"{last}: model config differs from this run's: {'; '.join(diffs)}")
        return ResolvedRun(cfg, state=state)
    cfg = classes_from_palette(cfg, source=None)
    cfg, derived = batch_from_rule(cfg, on_cpu=on_a_cpu(cfg.train.device))
    if cfg.train.init_from is not None:
        from cityseg.checkpoint import check_init_architecture

        path = Path(cfg.train.init_from)
        state, saved = read_init_checkpoint(path)
        check_init_architecture(saved.model, path, cfg.model)
        return ResolvedRun(cfg, init=(state, saved.model), derived=derived)
    return ResolvedRun(cfg, derived=derived)


def on_a_cpu(device: str) -> bool:
    """Whether `--device` (auto, cpu, cuda, cuda:N) trains on a CPU."""
    return device == "cpu" or (device == "auto" and not cuda_available())


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
