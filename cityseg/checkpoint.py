"""Checkpoints that survive a kill mid-write and cannot run code when loaded.

Writes go to a temp file in the same folder, are fsynced, then renamed over the old file (atomic
on POSIX), so a reader only ever sees the old or the new checkpoint. Loads use
`torch.load(weights_only=True)`: tensors, numbers, strings, lists and dicts only, never pickled code.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from cityseg.config import Config, ConfigError, ModelConfig, flatten, with_overrides
from cityseg.errors import STOP_SIGNALS, OptionError, UserError
from cityseg.model import build_model
from cityseg.options import check_config, palette_problem
from cityseg.outputs import atomic_file, temp_owner
from cityseg.palette import Palette


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message is one line naming the file."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A signal during the write acts once the new file is in place; a failed write (disk full) leaves
    # the old file intact and no temp file behind.
    with signals_deferred(), atomic_file(path, fsync=True) as f:
        torch.save(state, f)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def to_host(value: Any) -> Any:
    """A copy of `value` with every tensor copied to host memory: what a background write may pickle
    while training goes on changing the originals in place (the only moment the GPU waits)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: to_host(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_host(v) for v in value)
    return value


class CheckpointWriter:
    """Writes checkpoints in background threads: `submit` hands over a host copy of the state, after
    waiting only for the previous write of the same file (best.pt never waits for last.pt); `join`
    waits for every write. A failed write is raised by the next `submit` or `join` as
    `on_error(path, error)` (a one-line error); the previous file is intact (`save_checkpoint`)."""

    def __init__(self, on_error: Callable[[Path, BaseException], BaseException]) -> None:
        self.on_error = on_error
        self._threads: dict[Path, threading.Thread] = {}
        self._failures: list[tuple[Path, BaseException]] = []

    def submit(self, state: dict[str, Any], path: str | os.PathLike) -> None:
        path = Path(path)
        self._wait(self._threads.pop(path, None))
        host = to_host(state)
        thread = threading.Thread(target=self._write, args=(host, path), name=f"write-{path.name}")
        self._threads[path] = thread
        thread.start()

    def _write(self, state: dict[str, Any], path: Path) -> None:
        try:
            save_checkpoint(state, path)
        except (OSError, RuntimeError) as e:  # disk full, permissions, torch.save's own errors
            self._failures.append((path, e))

    def join(self) -> None:
        while self._threads:
            self._wait(self._threads.pop(next(iter(self._threads))))
        self._wait(None)

    def _wait(self, thread: threading.Thread | None) -> None:
        if thread is not None:
            thread.join()
        if self._failures:
            path, error = self._failures.pop(0)
            self._failures.clear()
            raise self.on_error(path, error)


SLIM_KEYS = ("model", "config", "palette", "versions", "epoch", "step_in_epoch", "global_step")


def weights_only_state(state: dict[str, Any]) -> dict[str, Any]:
    """What eval, predict, export and --init-from read (weights, config, palette, position): no
    optimiser, schedule or history, so best.pt is a third of last.pt with AdamW."""
    return {k: state[k] for k in SLIM_KEYS if k in state}


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT/SIGTERM/SIGHUP arriving in the block are held and handed to the previous handlers after it,
    so a second Ctrl-C or SIGTERM cannot cut a checkpoint write short (main thread only: Python runs
    signal handlers there, so a save in another thread is never interrupted by one)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    # SIGCHLD too: torch's handler raises in the main thread when a loader worker dies.
    previous = {s: signal.getsignal(s) for s in (*STOP_SIGNALS, signal.SIGCHLD)}
    previous = {s: h for s, h in previous.items() if h is not None}  # installed outside Python: leave alone
    for s in previous:
        signal.signal(s, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for s in held:
            _deliver(s, previous[s])


def _deliver(signum: int, handler: Any) -> None:
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL and signum != signal.SIGCHLD:
        os.kill(os.getpid(), signum)  # the default action, as if it had arrived now


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the temp files (.NAME.PID-THREAD.tmp) of checkpoint writes that a kill (SIGKILL, power loss)
    left in `folder`. Call it while holding the run folder (`outputs.claim_run_folder`): no other
    process writes there then, so every such file but this process's own is stale."""
    removed = []
    for tmp in Path(folder).glob(".*.pt.*.tmp"):
        if temp_owner(tmp) != os.getpid():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The raw state of a cityseg-fast checkpoint: readable, weights only, with `model` and `config`.
    Use `read_config`, `read_palette`, `read_training_checkpoint` and `load_from_checkpoint` to check
    the rest of its structure before using it."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint (e.g. {path / 'checkpoints' / 'best.pt'})")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message names the offending global on a line starting "WeightsUnpickler error".
        lines = [ln.strip() for ln in str(e).splitlines() if "Unpickler error" in ln or "GLOBAL" in ln]
        reason = lines[0] if lines else "unsupported pickled object"
        raise CheckpointError(
            f"{path}: refused to load: it holds pickled objects beyond plain weights, which could run "
            f"code ({reason[:160]})"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or damaged: {first[:300]})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not a cityseg-fast checkpoint (missing model weights or config)")
    weights = state["model"]
    if not isinstance(weights, dict) or not weights or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{path}: damaged checkpoint: 'model' is not a set of weight tensors")
    for name, tensor in weights.items():  # NaN/inf weights would score (and predict) garbage silently
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: damaged checkpoint: weight {name[:80]!r} holds NaN or infinite values")
    return state


def read_config(state: dict[str, Any], path: Path) -> Config:
    """The checkpoint's Config, every key known and of its type; else a one-line CheckpointError."""
    tree = state["config"]
    if not isinstance(tree, dict) or not all(isinstance(tree.get(k), dict) for k in ("data", "model", "train")):
        raise CheckpointError(f"{path}: damaged checkpoint: its config is not the data/model/train sections")
    try:
        cfg = with_overrides(Config(), flatten(tree), "config")
    except ConfigError as e:
        raise CheckpointError(f"{path}: config not readable by this version of cityseg-fast ({e})") from None
    try:  # the same ranges and choices as the command line's: a width of 100000 is refused, not allocated
        check_config(cfg, read_files=False)
    except OptionError as e:
        raise CheckpointError(f"{path}: damaged checkpoint: its config has {e}") from None
    return cfg


def read_palette(state: dict[str, Any], path: Path) -> Palette:
    """The checkpoint's palette (class colours and names), checked for consistency."""
    data = state.get("palette")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: checkpoint has no palette (class colours and names)")
    problem = palette_problem(data)
    if problem:
        raise CheckpointError(f"{path}: damaged palette in checkpoint: {problem}")
    try:
        palette = Palette.from_state(data)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: damaged palette in checkpoint ({type(e).__name__}: {e})") from None
    return palette


TRAINING_STATE = {"optimizer": dict, "scheduler": dict, "epoch": int, "step_in_epoch": int, "global_step": int,
                  "history": list, "elapsed_s": float, "partial": dict, "rng": dict}
BEST_MODEL_STATE = {"best_miou": float, "epochs_since_best": int}  # the BestModel hook's, resume needs it


def hook_state(state: dict[str, Any], hook: str) -> dict[str, Any]:
    """A training hook's part of a checkpoint: under `hooks.<class name>`; checkpoints written before
    hooks had their own key kept theirs at the top level (the whole state is then handed over)."""
    hooks = state.get("hooks")
    return hooks.get(hook, {}) if isinstance(hooks, dict) else state


# Model settings that are not the architecture: the class count (the palette sets it) and where the
# encoder's starting weights came from (a checkpoint's weights replace them).
NOT_ARCHITECTURE = ("num_classes", "encoder_weights", "encoder_sha256", "encoder_licence")


def architecture_diffs(saved: dict[str, Any], wanted: ModelConfig) -> list[str]:
    """How a checkpoint's model settings (`saved`, as stored) differ from `wanted`, the class count
    aside (the palette sets it)."""
    wanted_values = {k: v for k, v in asdict(wanted).items() if k not in NOT_ARCHITECTURE}
    # A setting newer than the checkpoint (model.encoder) has its default there, as read_config reads it.
    saved = {**asdict(ModelConfig()), **saved}
    return config_mismatch({k: saved.get(k) for k in wanted_values}, wanted_values)


def check_init_architecture(saved: ModelConfig, path: Path, cfg: ModelConfig) -> None:
    """Refuse the `--init-from` checkpoint at `path` (its model config `saved`) before anything is
    built unless its architecture is this run's; the class count may differ."""
    diffs = architecture_diffs(asdict(saved), cfg)
    if diffs:
        raise CheckpointError(f"{path}: --init-from needs the same architecture: {'; '.join(diffs)} "
                              "(leave --encoder/--width/--depth/--upsample/--norm unset to take the checkpoint's)")


def read_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint `--resume` can continue from: everything `load_checkpoint` checks, plus the
    optimiser, schedule and position in the run."""
    path = Path(path)
    state = load_checkpoint(path)
    best = hook_state(state, "BestModel")
    if not isinstance(best, dict):
        raise CheckpointError(f"{path}: cannot resume from it: its 'hooks' are damaged")
    for key, kind in [*TRAINING_STATE.items(), *BEST_MODEL_STATE.items()]:
        holder = best if key in BEST_MODEL_STATE else state
        value = holder.get(key)
        ok = isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
        if value is None or isinstance(value, bool) or not ok:
            problem = "missing" if key not in holder else f"not a {kind.__name__}"
            raise CheckpointError(f"{path}: cannot resume from it: its {key!r} is {problem} "
                                  "(a damaged checkpoint, or weights only: start a new run with --init-from)")
    read_config(state, path)
    read_palette(state, path)
    return state


def load_from_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu"
                         ) -> tuple[torch.nn.Module, Config, Palette, dict[str, Any]]:
    """(model in eval mode, channels-last on `device`; its config; its palette; the raw state): the
    one way eval, predict, export and fine-tuning read a checkpoint."""
    path = Path(path)
    state = load_checkpoint(path)
    cfg = read_config(state, path)
    palette = read_palette(state, path)
    if palette.num_classes != cfg.model.num_classes:
        raise CheckpointError(f"{path}: damaged checkpoint: {palette.num_classes} palette classes but a model "
                              f"for {cfg.model.num_classes}")
    model = build_model(cfg.model)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:  # missing / unexpected keys or shapes: name the first
        detail = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise CheckpointError(f"{path}: its weights do not fit the model its config describes "
                              f"({detail[:200]})") from None
    return model.to(device, memory_format=torch.channels_last).eval(), cfg, palette, state


def config_mismatch(saved: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> list[str]:
    """Names of the fields whose values differ, e.g. ['model.width: 32 in checkpoint vs 64']."""
    diffs = []
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_mismatch(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} in checkpoint vs {b!r}")
    return diffs
