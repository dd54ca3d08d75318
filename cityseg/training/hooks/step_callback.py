"""Calls a function after every training step (train()'s `on_step`: torch.profiler's `step`)."""

from __future__ import annotations

from collections.abc import Callable

from cityseg.training.hook import HookBase


class StepCallback(HookBase):
    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn

    def after_step(self) -> None:
        self.fn()
