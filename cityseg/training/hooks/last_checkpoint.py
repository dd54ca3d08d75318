"""last.pt: everything --resume needs, written at each validation (the --val-every cadence)."""

from __future__ import annotations

from typing import Any

from cityseg.metrics import SegMetrics
from cityseg.training.hook import HookBase


class Checkpointer(HookBase):
    def after_epoch(self, record: dict[str, Any], metrics: SegMetrics) -> None:
        self.trainer.saver.save(self.trainer.run.last)
