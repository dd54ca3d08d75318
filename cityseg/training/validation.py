"""Validation: when it comes (the --val-every cadence, cityseg/training/cadence.py; always at the run's
end; first thing on --resume for a record a signal left unscored), and scoring the val split into an
epoch's record. A signal abandons it (`ValidationStopped`): --resume scores the record."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from cityseg.distributed import any_rank, broadcast_buffers
from cityseg.metrics import SegMetrics, evaluate_model
from cityseg.progress import StepProgress
from cityseg.training.cadence import ValCadence
from cityseg.training.interrupts import ValidationStopped


class Validator:
    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer  # read only: its data, model, signals and times
        self.cadence = ValCadence.from_option(trainer.cfg.train.val_every)
        self.compiled: dict[int, nn.Module] = {}  # compiled validation forwards, by module

    def due(self, resumed: bool) -> bool:
        """A record from last session (unscored), the run's end, or --val-every says so; measured
        cadences (`auto`) differ between ranks: any rank decides."""
        t = self.trainer
        if resumed or t.limits.run_over():
            return True
        due = self.cadence.due(t.limits.training_left_s())
        return any_rank(due, t.dist, t.rt.device) if self.cadence.unit == "auto" else due

    def forward(self) -> nn.Module:
        """What validation calls: the scored model (an EMA's average, perhaps), compiled with static
        shapes where training is compiled, so it runs training's kernels at training's precision."""
        t = self.trainer
        model = t.scored_model
        if not t.rt.compile:
            return model
        if id(model) not in self.compiled:
            self.compiled[id(model)] = torch.compile(model, mode=t.rt.compile_mode, dynamic=False)
        return self.compiled[id(model)]

    def batch_sizes(self) -> list[int]:
        """The batch sizes validation meets on this rank's shard: full batches and the last one."""
        t = self.trainer
        n, ws, bs = len(t.data.val_files), t.dist.world_size, t.data.val.spec.batch_size
        sizes = set()
        for shard in {n // ws, -(-n // ws)}:
            if shard:
                sizes.add(min(bs, shard))
                if shard % bs:
                    sizes.add(shard % bs)
        return sorted(sizes, reverse=True)

    def validate(self, record: dict[str, Any]) -> SegMetrics:
        """Score the val split into `record` (rank 0's BatchNorm statistics on every rank first), with
        when it was known three ways: `elapsed_s` from the process start, `wall_s` from the first step,
        `train_s` on the training clock."""
        t = self.trainer
        start = time.perf_counter()
        broadcast_buffers(t.scored_model, t.dist)

        def on_batch(done: int) -> None:
            bar.step(done, "", log=done == len(t.data.val))
            if self.stop_requested(done):
                raise ValidationStopped
            # from now on a signal ends validation at once (not while the loader's iterator is being
            # built: half-built, it fails at exit)
            t.signals.cut_from_now(ValidationStopped)

        try:
            with StepProgress(t.console, f"val after epoch {record['epoch']}", len(t.data.val)) as bar:
                metrics, val_loss = evaluate_model(self.forward(), t.data.val, t.rt, t.data.palette.num_classes,
                                                   t.dist, on_batch=on_batch)
        finally:
            t.signals.uncut()
        t.times.add("val_s", time.perf_counter() - start)
        now = t.times.timing()  # wall_s: from the first step, start-up and warm-up of every session left out
        record.update(metrics.to_dict(with_confusion=False), val_loss=val_loss, elapsed_s=now["elapsed_s"],
                      wall_s=now["elapsed_s"] - now["startup_s"] - now["warmup_s"])
        return metrics

    def stop_requested(self, done: int) -> bool:
        """A signal seen during validation. One process: after every batch. DDP: every 8th batch up to
        the shortest shard's length, so every rank takes part in each vote (a collective)."""
        t = self.trainer
        if not t.dist.enabled:
            return t.signals.signum is not None
        ws, bs = t.dist.world_size, t.data.val.spec.batch_size
        fewest = -(-(len(t.data.val_files) // ws) // bs)  # the last rank's shard is the shortest
        if done % 8 or done > fewest:
            return False
        return t.signals.requested()
