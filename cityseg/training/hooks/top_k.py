"""--save-top-k K: the K best checkpoints by a val metric (--top-k-monitor: miou, pixel_acc, or
val_loss, lower better), as Lightning's `ModelCheckpoint(save_top_k=K, monitor=...)` keeps them:

    checkpoints/top-k/epoch=3-step=120-miou=0.4123.pt      # weights, config, palette: like best.pt

summary.json's `top_k` lists them, best first, with their scores.

Each file is written like every checkpoint (in the background, to a temp file renamed into place).
A file that falls out of the K best is deleted only once last.pt no longer lists it (at the next
validation, or at the run's end): a kill at any moment leaves the K files last.pt names, and
--resume deletes what a kill left beside them. Ties keep the earlier checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from cityseg.config import SETTINGS
from cityseg.metrics import SegMetrics
from cityseg.training.hook import HookBase

MONITORS = SETTINGS["train.top_k_monitor"].choices  # val metrics of a record
LOWER_IS_BETTER = {"val_loss"}
FOLDER = "top-k"


class TopKCheckpoints(HookBase):
    def __init__(self, k: int, monitor: str = "miou") -> None:
        if monitor not in MONITORS:
            raise ValueError(f"top-k monitor {monitor!r}: expected one of {', '.join(MONITORS)}")
        self.k, self.monitor = k, monitor
        self.kept: list[tuple[float, str]] = []  # (score, file name), best first
        self.to_remove: list[str] = []  # fell out of the K best; deleted once last.pt says so

    @property
    def folder(self) -> Path:
        return self.trainer.run.checkpoints / FOLDER

    def better(self, a: float, b: float) -> bool:
        return a < b if self.monitor in LOWER_IS_BETTER else a > b

    def after_epoch(self, record: dict[str, Any], metrics: SegMetrics) -> None:
        t = self.trainer
        if self.to_remove:  # the last.pt of the previous validation no longer lists them: once it is on disk
            t.saver.finish()
            self.remove_dropped()
        score = record.get(self.monitor)
        if score is None or not math.isfinite(score):
            return
        if len(self.kept) >= self.k and not self.better(score, self.kept[-1][0]):
            return
        name = f"epoch={record['epoch']}-step={record['step']}-{self.monitor}={score:.4f}.pt"
        t.saver.save(self.folder / name, weights_only=True)
        at = next((i for i, (s, _) in enumerate(self.kept) if self.better(score, s)), len(self.kept))
        self.kept.insert(at, (score, name))
        self.to_remove += [n for _, n in self.kept[self.k:] if n != name]
        self.kept = self.kept[: self.k]

    def after_train(self) -> None:
        if self.trainer.completed:  # the loop waited for every write: last.pt lists the K kept
            self.remove_dropped()
        kept = [{"path": str(self.folder / name), self.monitor: score} for score, name in self.kept]
        self.trainer.events.add_to_summary("top_k", {"monitor": self.monitor, "checkpoints": kept})  # best first

    def remove_dropped(self) -> None:
        if self.trainer.dist.is_main:
            for name in self.to_remove:
                (self.folder / name).unlink(missing_ok=True)
        self.to_remove = []

    @property
    def paths(self) -> list[Path]:
        """The kept checkpoints, best first (Lightning's `best_k_models`, ordered)."""
        return [self.folder / name for _, name in self.kept]

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "kept": [list(entry) for entry in self.kept], "to_remove": self.to_remove}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A resumed run: the files last.pt lists are the K best; any other file there is what a kill
        left between a top-k write and its last.pt (the validation is done again), or one to delete."""
        if state.get("monitor", self.monitor) == self.monitor:  # another monitor: a new list
            kept = [(float(score), str(name)) for score, name in state.get("kept", [])]
            self.kept = [(score, name) for score, name in kept if (self.folder / name).is_file()][: self.k]
        if self.trainer.dist.is_main and self.folder.is_dir():
            keep = {name for _, name in self.kept}
            for path in self.folder.glob("*.pt"):
                if path.name not in keep:
                    path.unlink()
