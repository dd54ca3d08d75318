"""Checkpoints that survive a kill mid-write and cannot run code when loaded.

Writes go to a temp file in the same folder, are fsynced, then renamed over the old file (atomic
on POSIX), so a reader only ever sees the old or the new checkpoint. Loads use
`torch.load(weights_only=True)`: tensors, numbers, strings, lists and dicts only, never pickled code.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line naming the file."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (disk full, Ctrl-C) leaves the old file intact
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
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
        raise CheckpointError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0][:160]})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not a cityseg-fast checkpoint (missing model weights or config)")
    return state


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
