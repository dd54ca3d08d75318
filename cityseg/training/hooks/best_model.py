"""best.pt: the weights of the best val mIoU so far (what eval, predict, export and --init-from read),
and the early stop that counts validations since it (--patience)."""

from __future__ import annotations

from typing import Any

from cityseg.metrics import SegMetrics
from cityseg.training.hook import HookBase


class BestModel(HookBase):
    """Best val mIoU so far -> best.pt (no optimiser state); `patience` validations without a better
    one end the run."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best_miou, self.epochs_since_best = -1.0, 0

    def after_epoch(self, record: dict[str, Any], metrics: SegMetrics) -> None:
        t = self.trainer
        improved = record["miou"] is not None and record["miou"] > self.best_miou
        if improved:
            self.best_miou, self.epochs_since_best = record["miou"], 0
            t.saver.save(t.run.best, weights_only=True)
        else:
            self.epochs_since_best += 1
        if self.patience and self.epochs_since_best >= self.patience:
            t.events.stop(f"early stop: no better val mIoU in the last {self.patience} validations (--patience)")

    def state_dict(self) -> dict[str, Any]:
        return {"best_miou": self.best_miou, "epochs_since_best": self.epochs_since_best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_miou, self.epochs_since_best = state["best_miou"], state["epochs_since_best"]
