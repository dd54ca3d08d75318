"""One training update as one callable: forward under autocast, loss, backward, clipping, optimiser.
The loop (and the warm-up, and benchmarks/train_step.py) call it; the schedule steps outside it.

    step = TrainStep(step_model, model, loss_fn, optimizer, scaler, rt, grad_clip=1.0)
    loss = step(image, target)      # detached loss on the device: reading it is a device sync
"""

from __future__ import annotations

import torch
from torch import nn

from cityseg.runtime import Runtime, autocast


class TrainStep:
    def __init__(self, step_model: nn.Module, model: nn.Module, loss_fn: nn.Module,
                 optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, rt: Runtime,
                 grad_clip: float) -> None:
        self.step_model, self.model, self.loss_fn = step_model, model, loss_fn
        self.optimizer, self.scaler, self.rt, self.grad_clip = optimizer, scaler, rt, grad_clip

    def __call__(self, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with autocast(self.rt):
            logits = self.step_model(image)
            loss = self.loss_fn(logits, target)
        self.update(loss)
        return loss.detach()

    def update(self, loss: torch.Tensor) -> None:
        """Backward, clip, optimiser step: the scaler only scales under 16-mixed and is a no-op otherwise."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
