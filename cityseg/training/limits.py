"""When a run's training ends by itself: its epochs, --max-steps, or --time-budget on the training
clock. (A hook's stop, early stop or --target-acc, comes through the event store.)"""

from __future__ import annotations

from typing import Any


class RunLimits:
    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer  # read only: its position and clock
        self.cfg = trainer.cfg.train

    def out_of_steps(self) -> bool:
        return bool(self.cfg.max_steps) and self.trainer.global_step >= self.cfg.max_steps

    def out_of_time(self) -> bool:
        budget = self.cfg.time_budget_s
        return budget is not None and self.trainer.clock.seconds >= budget

    def run_over(self) -> bool:
        """The epochs, --max-steps or the budget are spent: the end of the run validates."""
        return self.trainer.epoch >= self.cfg.epochs or self.out_of_steps() or self.out_of_time()

    def training_left_s(self) -> float:
        """Seconds of training until the epochs, --max-steps or the budget end, at the last epoch's pace."""
        t = self.trainer
        steps, _, wall = t.epoch_stats
        left = (self.cfg.epochs - t.epoch) * len(t.data.train) - t.step_in_epoch
        if self.cfg.max_steps:
            left = min(left, self.cfg.max_steps - t.global_step)
        seconds = left * wall / max(1, steps)
        budget = self.cfg.time_budget_s
        return seconds if budget is None else min(seconds, budget - t.clock.seconds)
