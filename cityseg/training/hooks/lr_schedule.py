"""The learning-rate schedule (cityseg/training/schedule.py), stepped after every training step, once
the step's time is on the training clock: the last step of a budget lands on the schedule's floor.
First in the hook list, so every other hook sees the lr of the next step, as the optimiser will."""

from __future__ import annotations

from cityseg.training.hook import HookBase


class LRSchedule(HookBase):
    def after_step(self) -> None:
        self.trainer.parts.scheduler.step()
