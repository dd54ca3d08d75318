"""metrics.jsonl (one line per validation, written after last.pt, so a kill in between is mended on
resume) and the console report of each validation: the per-class IoU table and one line."""

from __future__ import annotations

import logging
from typing import Any

from cityseg.metrics import SegMetrics, iou_table
from cityseg.report import append_jsonl, write_jsonl
from cityseg.telemetry import fmt
from cityseg.training.hook import HookBase

log = logging.getLogger("cityseg.training")


class MetricsWriter(HookBase):
    def before_train(self) -> None:
        t = self.trainer
        if t.dist.is_main and t.history:  # a resumed run: the records last.pt knows of, each once
            write_jsonl(t.run.metrics, t.history)

    def after_epoch(self, record: dict[str, Any], metrics: SegMetrics) -> None:
        t = self.trainer
        if t.dist.is_main:
            append_jsonl(t.run.metrics, record)
        t.console.print(iou_table(metrics, t.data.palette.names, title=f"val after epoch {record['epoch']}"))
        line = (f"epoch {record['epoch']}: mean loss {record['loss']:.4f}  val pixel acc {record['pixel_acc']:.4f}  "
                f"mIoU {fmt(record['miou'], '.4f')}  {record['images_per_s']:.1f} img/s  "
                f"data wait {record['data_wait_share']:.0%}"
                + (f" + loader GPU {record['loader_gpu_share']:.0%}" if record.get("loader_gpu_share") is not None
                   else ""))
        t.console.print(line, soft_wrap=True)
        log.info(line)
