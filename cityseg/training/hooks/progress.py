"""The per-epoch progress bar in a terminal, plain lines with the run's ETA everywhere else."""

from __future__ import annotations

import time

from cityseg.config import MAX_EPOCHS
from cityseg.progress import StepProgress, format_eta
from cityseg.training.hook import HookBase
from cityseg.training.hooks.telemetry import Telemetry


class Progress(HookBase):
    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry
        self.loss_text = ""

    def before_train(self) -> None:
        self.t0: float | None = None  # set at the first epoch: the warm-up is not the run's pace
        self.first_step = self.trainer.global_step

    def before_epoch(self) -> None:
        t = self.trainer
        if self.t0 is None:
            self.t0 = time.perf_counter()
        of = "" if t.cfg.train.epochs == MAX_EPOCHS else f"/{t.cfg.train.epochs}"  # a time budget decides
        self.bar = StepProgress(t.console, f"epoch {t.epoch + 1}{of}", len(t.data.train), t.step_in_epoch,
                               own_eta=False).__enter__()

    def after_step(self) -> None:
        t = self.trainer
        if t.log_step:  # the loop read the loss (a device sync) on this step
            self.loss_text = f"step loss {t.loss_value:.3f}  "  # this step's; the epoch line gives the mean
        self.bar.step(t.step_in_epoch, f"{self.loss_text}{self.telemetry.live()}  eta {format_eta(self.run_eta())}",
                      log=t.log_step)
        if t.step_in_epoch == len(t.data.train) or t.limits.out_of_steps() or t.limits.out_of_time():
            self.close()  # the epoch's last step: its bar ends above the validation bar, not below it

    def run_eta(self) -> float | None:
        """Seconds left in the whole run (the one ETA shown): the remaining steps of all epochs (and
        --max-steps) at this session's pace, validation not included, and never past the time budget."""
        t = self.trainer
        total = t.cfg.train.epochs * len(t.data.train)
        if t.cfg.train.max_steps:
            total = min(total, t.cfg.train.max_steps)
        done = t.global_step - self.first_step
        by_steps = None if done <= 0 else (total - t.global_step) * (time.perf_counter() - self.t0) / done
        if t.cfg.train.time_budget_s is None:
            return by_steps
        budget_left = max(0.0, t.cfg.train.time_budget_s - t.clock.seconds)
        return budget_left if by_steps is None else min(by_steps, budget_left)

    def after_steps(self) -> None:
        self.close()  # before validation's bar and the epoch's report

    def after_train(self) -> None:
        self.close()  # an epoch left mid-way (signal, error)

    def close(self) -> None:
        bar, self.bar = getattr(self, "bar", None), None
        if bar is not None:
            bar.__exit__(None, None, None)
