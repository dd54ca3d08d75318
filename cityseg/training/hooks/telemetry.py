"""GPU telemetry of the training steps: starts/stops the NVML sampler and adds the GPU fields of the
training steps (not of validation or checkpoints) to each record."""

from __future__ import annotations

from typing import Any

from cityseg.metrics import SegMetrics
from cityseg.telemetry import GpuSampler, fmt
from cityseg.training.hook import HookBase


class Telemetry(HookBase):
    """GPU fields over the training steps only: each epoch's steps are a window of samples (from
    `before_epoch` to `after_steps`); a record gets the windows since the previous record."""

    def before_train(self) -> None:
        self.gpu = GpuSampler(self.trainer.rt.device).start()
        self.windows: list[tuple[int, int]] = []  # since the last record
        self.all_windows: list[tuple[int, int]] = []  # the whole session, for the summary

    def after_train(self) -> None:
        self.gpu.stop()

    def before_epoch(self) -> None:
        self.mark = self.gpu.mark()

    def after_steps(self) -> None:
        window = (self.mark, self.gpu.mark())
        self.windows.append(window)
        self.all_windows.append(window)

    def after_epoch(self, record: dict[str, Any], metrics: SegMetrics) -> None:
        record.update(self.gpu.summary(windows=self.windows))
        self.windows = []
        if self.gpu.problem:
            record["gpu_sampler_problem"] = self.gpu.problem

    def training_summary(self) -> dict[str, float | None]:
        return self.gpu.summary(windows=self.all_windows)

    def live(self) -> str:
        """images/s, data wait and GPU utilisation so far this epoch, for the progress line."""
        meter = self.trainer.meter
        seconds = meter.clock() - meter.start
        ips = meter.images / seconds if seconds > 0 else 0.0
        wait = meter.data_wait / seconds if seconds > 0 else 0.0
        return f"{ips:.1f} img/s  wait {wait:.0%}  gpu {fmt(self.gpu.latest_util(), '.0f', '%')}"
