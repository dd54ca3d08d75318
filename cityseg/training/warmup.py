"""Warm-up before the clock: compile, capture and autotune on a synthetic batch, then put every bit of
state back, so the budget, the schedule and --target-acc count training only and the run trains the
very weights it would have trained without it.

    snapshot = TrainingState.capture(model, optimizer, scaler)
    for _ in range(warmup_calls(rt, step)): step(image, target)      # compiles, captures, autotunes
    snapshot.restore()                                               # weights, BN, AdamW, scaler, RNG

Everything is restored in place (`copy_`), never by swapping tensors: a CUDA graph captured during the
warm-up reads and writes the very storage the model and the optimiser hold.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from cityseg.data.contract import LoaderSpec
from cityseg.palette import Palette, map_colors
from cityseg.runtime import Runtime, autocast
from cityseg.telemetry import synchronize

# Modes whose compiled step runs as CUDA graphs: torch records on the 1st call, warms the tree up on
# the 2nd and replays from the 3rd, so three calls leave nothing to capture inside the run.
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def warmup_calls(rt: Runtime, step: object) -> int:
    """How many times the step must run before it is fully compiled and captured: what the step says
    (`step.warmup_calls`, when it knows better), else 3 under CUDA graphs and 1 otherwise."""
    declared = getattr(step, "warmup_calls", None)
    if isinstance(declared, int) and declared > 0:
        return declared
    return 3 if rt.compile and rt.compile_mode in CUDAGRAPH_MODES else 1


def synthetic_batch(spec: LoaderSpec, num_classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch with the loader's exact shape, dtype, device and (channels-last) memory format: normal
    images, random class ids with some ignore pixels. Its own generator: the run's RNG is not drawn."""
    g = torch.Generator().manual_seed(seed)
    s, (th, tw) = spec.image_size, spec.label_hw  # labels may be non-square (the official 1024x2048)
    image = torch.randn(spec.batch_size, 3, s, s, generator=g)
    image = image.to(spec.device, spec.dtype).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, num_classes, (spec.batch_size, th, tw), generator=g)
    target[:, :2] = 255  # the ignore label takes its own path in the loss
    return image, target.to(spec.device)


def mask_shapes(spec: LoaderSpec, val_spec: LoaderSpec | None = None, val_batch_sizes: Sequence[int] = ()
                ) -> list[tuple[int, tuple[int, int]]]:
    """(batch, (height, width)) of each mask batch a device-side loader maps during the run: the training batch and
    each validation batch. The Triton kernel autotunes once per size bucket (kernels/mask_to_class.py:
    pixels' log2 // 2), so the warm-up maps these very sizes: a batch of 1 is another bucket than 16."""
    shapes = [(spec.batch_size, spec.label_hw)]
    shapes += [(n, (val_spec or spec).label_hw) for n in val_batch_sizes]
    return list(dict.fromkeys(shapes))


def _copy_into(live: dict[str, Any], saved: dict[str, Any]) -> None:
    for key, value in saved.items():
        if isinstance(value, torch.Tensor) and isinstance(live.get(key), torch.Tensor):
            live[key].copy_(value)
        else:
            live[key] = value


@dataclass
class TrainingState:
    """A copy of what one update changes: weights and buffers (BatchNorm statistics and counters),
    optimiser state and hyper-parameters, the gradient scaler and every RNG stream."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    opt_state: dict[nn.Parameter, dict[str, Any]] = field(default_factory=dict)
    groups: list[dict[str, Any]] = field(default_factory=list)
    scaler_tensors: dict[str, torch.Tensor | None] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def capture(cls, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler
                ) -> TrainingState:
        clone = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
        s = cls(model, optimizer, scaler)
        s.weights = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
        s.opt_state = {p: {k: clone(v) for k, v in st.items()} for p, st in optimizer.state.items()}
        s.groups = [{k: clone(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        s.scaler_tensors = {k: clone(getattr(scaler, k, None)) for k in ("_scale", "_growth_tracker")}
        s.rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            s.rng["cuda"] = torch.cuda.get_rng_state_all()
        return s

    @torch.no_grad()
    def restore(self) -> None:
        for key, live in self.model.state_dict(keep_vars=True).items():
            live.detach().copy_(self.weights[key])
        self._restore_optimizer()
        for group, saved in zip(self.optimizer.param_groups, self.groups, strict=True):
            _copy_into(group, saved)
        self._restore_scaler()
        torch.set_rng_state(self.rng["torch"])
        random.setstate(self.rng["python"])
        np.random.set_state(self.rng["numpy"])
        if "cuda" in self.rng:
            torch.cuda.set_rng_state_all(self.rng["cuda"])

    def _restore_optimizer(self) -> None:
        """Saved entries are copied back. A parameter the warm-up gave its first state: Adam's first
        state is all zeros (step 0, both moments 0), so zeroing keeps the tensors a captured graph
        uses; any other optimiser forgets it, as if it had never stepped."""
        adam = isinstance(self.optimizer, (torch.optim.Adam, torch.optim.AdamW))
        for p in list(self.optimizer.state):
            live = self.optimizer.state[p]
            if p in self.opt_state:
                _copy_into(live, self.opt_state[p])
            elif adam and all(isinstance(v, torch.Tensor) for v in live.values()):
                for v in live.values():
                    v.zero_()
            else:
                del self.optimizer.state[p]

    def _restore_scaler(self) -> None:
        """The scale and growth tracker, in place; those the warm-up created go back to their first
        values (what the scaler's lazy start would have made)."""
        firsts = {"_scale": getattr(self.scaler, "_init_scale", None),
                  "_growth_tracker": getattr(self.scaler, "_init_growth_tracker", None)}
        for name, saved in self.scaler_tensors.items():
            live = getattr(self.scaler, name, None)
            if not isinstance(live, torch.Tensor):
                continue
            if saved is not None:
                live.copy_(saved)
            elif firsts[name] is not None:
                live.fill_(firsts[name])


def warm_up(step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], calls: int, model: nn.Module,
            optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, rt: Runtime, spec: LoaderSpec,
            palette: Palette, val_forwards: Sequence[nn.Module] = (), val_spec: LoaderSpec | None = None,
            val_batch_sizes: Sequence[int] = ()) -> None:
    """Run the training step `calls` times on a synthetic batch, each compiled validation forward on
    each validation batch size it will meet, and the mask mapping; synchronise; then restore
    every piece of state those runs touched. Gradients are left as they are: the step sets them first.
    The mask mapping (Triton on a GPU: autotuned on first use per size bucket; the table elsewhere)
    runs once at each of `mask_shapes`."""
    snapshot = TrainingState.capture(model, optimizer, scaler)
    was_training = model.training
    try:
        image, target = synthetic_batch(spec, palette.num_classes)
        model.train()
        for _ in range(calls):
            step(image, target)
        with torch.no_grad():
            for forward in val_forwards:
                forward.eval()
                for n in val_batch_sizes:
                    with autocast(rt):
                        forward(synthetic_batch(replace(val_spec or spec, batch_size=n), palette.num_classes)[0])
        for n, (h, w) in mask_shapes(spec, val_spec, val_batch_sizes):
            map_colors(torch.zeros(n, h, w, 3, dtype=torch.uint8, device=rt.device), palette)
        synchronize(rt.device)
    finally:
        snapshot.restore()
        for forward in val_forwards:
            forward.train(was_training)
        model.train(was_training)
        synchronize(rt.device)
