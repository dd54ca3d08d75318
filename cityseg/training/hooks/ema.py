"""--ema: an exponential moving average of the weights (BatchNorm statistics included), updated after
every step; validation scores it and checkpoints save it as `model`, the raw weights beside it as
`train_model` for --resume."""

from __future__ import annotations

from typing import Any

import torch

from cityseg.training.hook import HookBase


class EMA(HookBase):
    def __init__(self, decay: float) -> None:
        self.decay = decay
        self._averaged: torch.optim.swa_utils.AveragedModel | None = None

    @property
    def averaged(self) -> torch.optim.swa_utils.AveragedModel:
        if self._averaged is None:  # the model exists once the trainer does
            t = self.trainer
            self._averaged = torch.optim.swa_utils.AveragedModel(
                t.model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(self.decay), use_buffers=True)
            t.events.score_with(self._averaged.module)
        return self._averaged

    def before_train(self) -> None:
        self.averaged  # noqa: B018 - create it, and point validation at it

    def after_step(self) -> None:
        self.averaged.update_parameters(self.trainer.model)

    def state_dict(self) -> dict[str, Any]:
        return {"train_model": self.trainer.model.state_dict(), "ema_updates": int(self.averaged.n_averaged)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "train_model" in state:  # the trainer loaded the checkpoint's `model`, the average, into its model
            t = self.trainer
            self.averaged.module.load_state_dict(t.model.state_dict())
            t.model.load_state_dict(state["train_model"])  # the raw weights training goes on from
            self.averaged.n_averaged.fill_(state["ema_updates"])
