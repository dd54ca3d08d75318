"""One training update as one callable: forward under autocast, loss, backward, clipping, optimiser.
The loop (and the warm-up, and benchmarks/train_step.py) call it; the schedule steps outside it.

    step = TrainStep(step_model, model, loss_fn, optimizer, scaler, rt, grad_clip=1.0)
    loss = step(image, target)      # detached loss on the device: reading it is a device sync

Compiled (`rt.compile`), model and loss are one graph (`forward_loss`), and its backward one more:
the loss's softmax, gather and scatter-adds fuse with the head instead of running as a dozen eager
kernels. On one CUDA GPU the default mode is `reduce-overhead`: torch.compile records both graphs
as CUDA graphs (shapes are static: the loaders drop the last partial batch), so a step is a few graph
launches, not hundreds of kernel launches from Python; the fused AdamW and the foreach clipping are
a handful of multi-tensor kernels after it. `compile_optimizer=True` compiles clipping and the AdamW
update as well, with a capturable optimiser and a tensor learning rate (the NVIDIA / MLPerf way:
the whole iteration in graphs); which of the two wins is for the GPU benchmark to say
(benchmarks/train_step.py `--compile-modes default,cudagraphs,whole`). `--compile-mode` overrides
the mode. Nothing in a step reads a value back to the host: no `.item()`, no `if` on a tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from cityseg.runtime import Runtime, autocast
from cityseg.settings import CUDAGRAPH_MODES  # their graphs' outputs are overwritten by the next replay


def step_compile_mode(rt: Runtime, distributed: bool) -> str | None:
    """The torch.compile mode of the step: `--compile-mode` if given, else CUDA graphs on one CUDA
    GPU, else torch's default (DDP's gradient all-reduce hooks run between the backward's graphs,
    which CUDA graphs cannot hold)."""
    if rt.compile_mode is not None:
        return rt.compile_mode
    return "reduce-overhead" if rt.device.type == "cuda" and not distributed else None


class ModelWithLoss(nn.Module):
    """model then loss under the run's autocast, as one module: what DDP wraps (cityseg/training/setup.py
    `for_ranks`), so that compiling DDP traces the model and the loss as one graph."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, rt: Runtime) -> None:
        super().__init__()
        self.model, self.loss_fn, self.rt = model, loss_fn, rt

    def forward(self, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with autocast(self.rt):
            return self.loss_fn(self.model(image), target)


class TrainStep:
    """Holds the model, loss, optimiser and scaler of a run and nothing else: restoring their
    state (and the RNG) restores the step."""

    def __init__(self, step_model: nn.Module, model: nn.Module, loss_fn: nn.Module,
                 optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, rt: Runtime,
                 grad_clip: float, compile_optimizer: bool = False, compile_backend: str = "inductor") -> None:
        """`compile_optimizer`: clipping and AdamW compiled too (build the optimiser with
        `build_optimizer(..., compiled=True)`); `compile_backend`: torch.compile's backend, where
        `eager` / `aot_eager` (no code generation, no mode) make quick smoke tests."""
        self.step_model, self.model, self.loss_fn = step_model, model, loss_fn
        self.optimizer, self.scaler, self.rt, self.grad_clip = optimizer, scaler, rt, grad_clip
        distributed = isinstance(step_model, nn.parallel.DistributedDataParallel)
        self.mode = step_compile_mode(rt, distributed) if rt.compile and compile_backend == "inductor" else None
        self.cudagraphs = rt.compile and rt.device.type == "cuda" and self.mode in CUDAGRAPH_MODES

        def compiled(fn):  # static shapes (the loaders drop the last partial batch): never a dynamic-shape graph
            if self.mode:
                return torch.compile(fn, mode=self.mode, dynamic=False)
            return torch.compile(fn, backend=compile_backend, dynamic=False)

        # Across ranks, step_model is DDP around ModelWithLoss: it computes the loss itself.
        forward_loss = step_model if distributed else self._forward_loss
        self.forward_loss = compiled(forward_loss) if rt.compile else forward_loss
        self.lr_tensors: list[torch.Tensor] | None = None
        self.clip_and_step = self._clip_and_step
        if rt.compile and compile_optimizer:
            if scaler.is_enabled():
                raise ValueError("compile_optimizer: the fp16 gradient scaler's inf check is a host sync")
            # A float lr is a constant of the compiled graph (a new value, a recompile); a tensor is
            # an input. Only the optimiser sees the tensors: the schedule and checkpoints keep floats.
            self.lr_tensors = [torch.tensor(float(g["lr"]), device=rt.device) for g in optimizer.param_groups]
            self.clip_and_step = compiled(self._clip_and_step)

    @property
    def warmup_calls(self) -> int:
        """Calls before the step is compiled and captured (cityseg/training/warmup.py reads it): under
        CUDA graphs torch records on the 1st call, warms the tree on the 2nd and replays from the 3rd;
        otherwise the first call compiles everything. The mode is this step's resolved one (CUDA graphs
        by default on one GPU), which `rt.compile_mode` alone does not say."""
        return 3 if self.cudagraphs else 1

    def __call__(self, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Gradients go first: under CUDA graphs they live in the graphs' memory, which this forward reuses.
        self.optimizer.zero_grad(set_to_none=True)
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are dead
        loss = self.forward_loss(image, target)
        self.scaler.scale(loss).backward()
        if self.lr_tensors is None:
            self.clip_and_step()
        else:
            self.step_with_tensor_lr()
        loss = loss.detach()
        return loss.clone() if self.cudagraphs else loss

    def _forward_loss(self, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with autocast(self.rt):
            return self.loss_fn(self.step_model(image), target)

    def _clip_and_step(self) -> None:
        """Clip, then the optimiser step; the scaler only scales under 16-mixed and is a no-op otherwise.
        clip_grad_norm_ runs as foreach kernels on CUDA and never syncs (it scales by
        min(1, max_norm / norm) on the device rather than testing the norm)."""
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def step_with_tensor_lr(self) -> None:
        groups = self.optimizer.param_groups
        floats = [g["lr"] for g in groups]
        for g, t, lr in zip(groups, self.lr_tensors, floats, strict=True):
            t.fill_(lr)  # an async host-to-device write, no sync
            g["lr"] = t
        try:
            self.clip_and_step()
        finally:
            for g, lr in zip(groups, floats, strict=True):
                g["lr"] = lr
