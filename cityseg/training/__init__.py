"""Training: `train(run)` runs (or resumes) a run and returns its summary.

    cityseg-fast train --epochs 10          # the CLI resolves the run (cityseg/resolve.py), then `train(run)`
    from cityseg import Config, train; summary = train(Config())      # a complete Config, taken as it is

setup.py builds the parts (plain functions), loop.py is the loop, hooks/ the side concerns (one a file).
Under torchrun every rank calls `train`; rank 0 alone prints and writes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import closing, nullcontext
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from cityseg.batch_rule import BatchChoice
from cityseg.checkpoint import remove_stale_temps
from cityseg.config import AUTO, Config
from cityseg.data.fingerprint import data_fingerprint, fingerprint_change
from cityseg.distributed import DistInfo, broadcast_object, cleanup, init_distributed
from cityseg.errors import UserError
from cityseg.model import describe
from cityseg.outputs import cache_dir, claim_run_folder, is_free, write_error_log
from cityseg.palette import Palette, save_palette
from cityseg.progress import startup_console
from cityseg.report import RunFolder, device_name, write_json
from cityseg.resolve import ResolvedRun, resolved_from_config
from cityseg.runtime import Runtime, resolve_device, use_compile_cache
from cityseg.telemetry import process_start
from cityseg.training.batch_size import finish_auto_batch
from cityseg.training.hook import HookBase
from cityseg.training.hooks import default_hooks
from cityseg.training.interrupts import EXIT_INTERRUPTED, Interrupted, graceful_interrupts
from cityseg.training.loop import Parts, Trainer
from cityseg.training.schedule import TrainClock
from cityseg.training.setup import (
    RunData,
    TrainingError,
    build_loss,
    build_models,
    build_optimizer,
    build_scheduler,
    check_training_fits,
    for_ranks,
    init_weights_from,
    open_loaders,
    prepare_data,
    schedule_note,
    starting_encoder_weights,
    training_runtime,
)
from cityseg.training.step import TrainStep

__all__ = ["EXIT_INTERRUPTED", "HookBase", "Interrupted", "Trainer", "TrainingError", "train"]

_trained_before = False  # a later train() in this process counts from its own call, not the process start


def time_zero() -> tuple[float, str]:
    """(perf_counter zero, its name) that elapsed_s and startup_s count from: the process start for
    the first run of a process (interpreter and imports included: what a user waits), the call of
    `train()` for later ones."""
    global _trained_before
    first, _trained_before = not _trained_before, True
    return process_start() if first else (time.perf_counter(), "start of train()")


def train(cfg: Config | ResolvedRun, console: Console | None = None, on_step: Callable[[], None] | None = None,
          hooks: list[HookBase] | None = None, *, verbose: bool = False) -> dict[str, Any]:
    """Run (or resume, with `cfg.train.resume`) training as configured; returns summary.json's content.

    `cfg`: what `cityseg.resolve_run` returns (the defaults, presets, files and flags of a run, as
    `cityseg-fast train` resolves them), or a complete `Config`, taken as it is; either is checked,
    and the checkpoints it names are read once.

    Quiet by default, as a library should be: `verbose=True` shows the progress bars and per-epoch
    tables of `cityseg-fast train` (which passes its own `console`), and each epoch's one-line result
    goes to the "cityseg" logger (`logging.basicConfig(level=logging.INFO)` shows it).
    Raises a `UserError` (one-line message) for what the user can fix, and `Interrupted` after saving
    last.pt on Ctrl-C/SIGTERM/SIGHUP (within seconds: the
    partial epoch is scored by `--resume`). `on_step` is called after every step (torch.profiler's `step`);
    `hooks` are added after the default ones."""
    zero = time_zero()
    run = cfg if isinstance(cfg, ResolvedRun) else resolved_from_config(cfg)
    dist_info = init_distributed(resolve_device(run.config.train.device).type)
    # Markup off: paths and file names are printed as given, a `[tag]` in one included.
    console = console or Console(markup=False, highlight=False, quiet=not verbose)
    if not dist_info.is_main:
        console = Console(quiet=True)
    try:
        with startup_console(console):  # the start-up stages (data, lookup table, checks, warm-up) say what they do
            return _train(run, console, dist_info, on_step, hooks or [], zero)
    finally:
        cleanup(dist_info)


def default_run_dir() -> Path:
    """runs/<date-time>, with -2, -3, ... when runs start within the same second."""
    base = Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate, n = base, 1
    while not is_free(candidate):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate.absolute()


def _train(resolved: ResolvedRun, console: Console, dist_info: DistInfo, on_step: Callable[[], None] | None,
           extra_hooks: list[HookBase], zero: tuple[float, str]) -> dict[str, Any]:
    cfg = resolved.config
    # The default name holds a timestamp: take rank 0's so every rank writes to one folder.
    root = Path(cfg.train.resume or broadcast_object(cfg.train.out or str(default_run_dir()), dist_info))
    created = missing_folders(root) if dist_info.is_main else []
    # Rank 0 holds the folder for the run's life: a second run or resume there is refused.
    claim = claim_run_folder(root, resume=bool(cfg.train.resume)) if dist_info.is_main else nullcontext()
    try:
        with claim:
            run = RunFolder(root)
            try:
                state = resume_state(run, resolved.state, console) if cfg.train.resume else None
                return run_training(cfg, resolved.derived, console, dist_info, run, state, resolved.init, on_step,
                                    extra_hooks, zero)
            except UserError as e:
                if dist_info.is_main and run.config.is_file():  # a run that started says why it ended
                    write_error_log(run.root, str(e))
                raise
            except KeyboardInterrupt as e:  # a second Ctrl-C: stopped at once; say where the run is
                e.run_dir = root  # type: ignore[attr-defined]
                raise
    finally:
        remove_if_empty(created)  # a start that failed (bad data, bad option) leaves no empty run folder


def missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for path in (folder.absolute(), *folder.absolute().parents):
        if path.exists():
            break
        missing.append(path)
    return missing


def remove_if_empty(folders: list[Path]) -> None:
    for path in folders:  # deepest first; a folder that holds anything stays
        try:
            path.rmdir()
        except OSError:
            return


def resume_state(run: RunFolder, state: dict[str, Any] | None, console: Console) -> dict[str, Any]:
    """last.pt's content, read (and checked against the config) when the run was resolved."""
    assert state is not None  # resolve_run / resolved_from_config read it
    remove_stale_temps(run.last.parent)  # what a kill mid-save left (the folder is ours: locked)
    console.print(f"resuming {run.root} at epoch {state['epoch'] + 1}, step {state['step_in_epoch']} of that epoch",
                  soft_wrap=True)
    return state


def run_training(cfg: Config, derived: dict[str, Any], console: Console, dist_info: DistInfo, run: RunFolder,
                 state: dict[str, Any] | None, init: tuple[dict[str, Any], Any] | None,
                 on_step: Callable[[], None] | None, extra_hooks: list[HookBase], zero: tuple[float, str]
                 ) -> dict[str, Any]:
    rt = training_runtime(cfg.train, dist_info)
    if cfg.data.batch_size != AUTO:
        check_training_fits(cfg, rt, dist_info)  # before any file is read
    # Before anything compiles (auto's trial steps too) and before loader workers start (they inherit it);
    # only where something compiles (torch.compile, or the Triton mask kernel on a GPU).
    compile_cache = use_compile_cache(root=cache_dir() / "compile") if rt.compile or rt.device.type == "cuda" else None
    for note in rt.notes:
        console.print(f"note: {note}", style="yellow", soft_wrap=True)
    init = None if state else init  # on resume, last.pt holds the weights
    torch.backends.cudnn.benchmark = True  # fixed-size batches: pick the fastest conv algorithms once
    torch.manual_seed(cfg.train.seed)
    encoder_file = None
    if state is None and init is None:  # a new run: pretrained encoder weights (resume, --init-from: theirs)
        model_cfg, encoder_file = starting_encoder_weights(cfg.model)
        cfg = replace(cfg, model=model_cfg)
    data = prepare_data(cfg, rt, dist_info, console, Palette.from_state(state["palette"]) if state else None)
    with closing(data):  # the loaders' workers end on every way out: done, error or signal
        fingerprint = data_fingerprint({"train": data.train_files, "val": data.val_files})
        if state is not None:
            check_same_data(state, fingerprint, run.root, data.root)
        if cfg.data.batch_size == AUTO:  # a GPU with no remembered answer: trial steps, now the files are known
            cfg, derived = finish_auto_batch(cfg, rt, dist_info, len(data.train_files), console)
            check_training_fits(cfg, rt, dist_info)
        if "batch_size" in derived:
            console.print(BatchChoice.from_record(derived["batch_size"]).summary(), soft_wrap=True)
        open_loaders(data, cfg, rt, dist_info)
        model, step_model = build_models(cfg.model, rt, dist_info, cfg.train.sync_bn, encoder_file,
                                         cfg.train.encoder_bn)
        if init is not None:  # on resume, last.pt holds the weights
            init_weights_from(model, cfg.model, Path(cfg.train.init_from), init, console)
        trainer = make_trainer(cfg, rt, dist_info, data, model, step_model, run, console,
                               default_hooks(cfg.train, on_step, dist_info.is_main) + extra_hooks, zero)
        trainer.compile_cache, trainer.data_fingerprint = compile_cache, fingerprint
        if state is not None:
            trainer.load_state_dict(state)
        describe_run(console, model, rt, data, dist_info, compile_cache)
        with graceful_interrupts() as interrupt:
            if dist_info.is_main:
                run.create()
                save_palette(data.palette, run.root / "palette.json")  # `--palette RUN/palette.json` reuses it
                # Written once Ctrl-C is handled: tests wait on it. "resolved": how auto's values were found.
                write_json(run.config, cfg.to_dict() | ({"resolved": derived} if derived else {}), "run config")
            summary = trainer.fit(interrupt)
        assert summary is not None  # the Reporter hook, one of the default hooks, made it
        return summary


def make_trainer(cfg: Config, rt: Runtime, dist_info: DistInfo, data: RunData, model: torch.nn.Module,
                 step_model: torch.nn.Module, run: RunFolder, console: Console, hooks: list[HookBase],
                 zero: tuple[float, str]) -> Trainer:
    """The optimiser, the loss, the step and the schedule around the built models; the trainer."""
    optimizer = build_optimizer(model, cfg.train, rt.device)
    clock = TrainClock()
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.needs_grad_scaler)
    loss_fn = build_loss(cfg.train, data.train, data.palette.num_classes, rt.device)
    step_model = for_ranks(step_model, loss_fn, rt, dist_info)
    step = TrainStep(step_model, model, loss_fn, optimizer, scaler, rt, cfg.train.grad_clip)
    parts = Parts(cfg, rt, dist_info, data, model, step, optimizer,
                  build_scheduler(optimizer, cfg.train, len(data.train), clock), scaler, clock)
    note = schedule_note(cfg.train, len(data.train))
    if note:
        console.print(f"note: {note}", style="yellow", soft_wrap=True)
    return Trainer(parts, run, console, hooks, started_at=zero[0], time_zero=zero[1])


def describe_run(console: Console, model: torch.nn.Module, rt: Runtime, data: RunData, dist_info: DistInfo,
                 compile_cache: dict[str, Any] | None) -> None:
    console.print(describe(model))
    console.print(
        f"device {device_name(rt.device)}  precision {rt.precision}  compile {rt.compile}  "
        f"loader {data.loader_kind}  ranks {dist_info.world_size}  "
        f"data {data.root} ({len(data.train_files)} train / {len(data.val_files)} val)", soft_wrap=True,
    )
    if compile_cache is not None:
        warmth = "warm" if compile_cache["warm"] else "cold: the first run of these shapes compiles longer"
        console.print(f"compile cache {compile_cache['dir']} ({warmth})", soft_wrap=True)


def check_same_data(state: dict[str, Any], now: dict[str, Any], run_dir: Path, data_dir: Path) -> None:
    """--resume continues on the files the run trained on (they may have moved: names and sizes count,
    not the path); a folder changed since is refused, naming what changed. A last.pt written before
    fingerprints were saved is taken as it is."""
    saved = state.get("data_fingerprint")
    change = fingerprint_change(saved, now) if isinstance(saved, dict) else None
    if change:
        raise UserError(f"--resume {run_dir}: the data in {data_dir} changed since the run started ({change}): its "
                        "epochs, position and schedule count the files it had. Put those files back (--data may "
                        f"point to where they are now), or start a new run from its weights: --init-from "
                        f"{run_dir / 'checkpoints' / 'last.pt'}")
