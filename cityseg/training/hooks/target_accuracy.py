"""--target-acc: the run ends at the first validation whose pixel accuracy reaches the target."""

from __future__ import annotations

from typing import Any

from cityseg.metrics import SegMetrics
from cityseg.training.hook import HookBase


class TargetAccuracy(HookBase):
    def __init__(self, target: float) -> None:
        self.target = target

    def after_epoch(self, record: dict[str, Any], metrics: SegMetrics) -> None:
        if (record.get("pixel_acc") or 0.0) >= self.target:
            self.trainer.events.stop(f"target pixel accuracy {self.target:g} reached after "
                                     f"{record['train_s']:.0f} s of training (epoch {record['epoch']})")
