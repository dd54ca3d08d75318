"""The training loop: `fit` runs epochs, `train_epoch` runs steps, `step` is one update. Everything
else (checkpoints, early stop, progress, metrics files, telemetry, profiling) is a hook.

    trainer = Trainer(parts, run, console, hooks=[Telemetry(), Progress(), Checkpointer(), ...])
    summary = trainer.fit(interrupt)

A hook (detectron2's `HookBase`) sees the trainer and is called around training, epochs and steps;
it keeps its own state in the checkpoint through `state_dict` / `load_state_dict`, whose keys are
top-level keys of the checkpoint (so files written before hooks existed still load).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from cityseg.checkpoint import save_checkpoint
from cityseg.config import Config
from cityseg.distributed import DistInfo, any_rank, broadcast_buffers, max_over_ranks, sum_over_ranks, weights_agree
from cityseg.metrics import LoaderFailed, SegMetrics, evaluate_model
from cityseg.progress import StepProgress
from cityseg.report import RunFolder, versions
from cityseg.runtime import Runtime
from cityseg.telemetry import EpochMeter
from cityseg.training.schedule import ProgressLR, TrainClock, tick_function
from cityseg.training.setup import RunData, TrainingError
from cityseg.training.step import TrainStep

EXIT_INTERRUPTED = 130


class Interrupted(Exception):
    """Ctrl-C / SIGTERM: the step finished, last.pt is saved."""

    def __init__(self, run_dir: Path, signum: int) -> None:
        self.run_dir, self.signum = run_dir, signum
        super().__init__(f"interrupted; resume with: cityseg-fast train --resume {run_dir}")


class HookBase:
    """Override what you need; `self.trainer` is set when the hook is registered."""

    trainer: Trainer

    def before_train(self) -> None: ...
    def after_train(self) -> None: ...
    def before_epoch(self) -> None: ...
    def after_step(self) -> None: ...
    def after_epoch(self, record: dict[str, Any], metrics: SegMetrics) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Parts:
    """What the loop trains (built by cityseg/training/setup.py)."""

    cfg: Config
    rt: Runtime
    dist: DistInfo
    data: RunData
    model: nn.Module  # the plain module: checkpoints and validation
    step: TrainStep  # one update: forward, loss, backward, optimiser (cityseg/training/step.py)
    optimizer: torch.optim.Optimizer
    scheduler: ProgressLR
    scaler: torch.amp.GradScaler
    clock: TrainClock  # training seconds (validation excluded): the time budget's and the schedule's clock


class Trainer:
    def __init__(self, parts: Parts, run: RunFolder, console: Console, hooks: list[HookBase]) -> None:
        self.parts, self.run, self.console = parts, run, console
        self.cfg, self.rt, self.dist, self.data = parts.cfg, parts.rt, parts.dist, parts.data
        self.model = parts.model
        self.eval_model = parts.model  # what validation scores and checkpoints save (a hook may swap in an EMA)
        self.clock = parts.clock
        self.tick = tick_function(parts.cfg.train.clock)
        self.real_seconds = self.synced_seconds = 0.0  # this rank's measured training time; its last agreed value
        self.step_estimate, self.steps_since_sync = 0.0, 0
        self.hooks = hooks
        for hook in hooks:
            hook.trainer = self
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.history: list[dict[str, Any]] = []
        self.partial = {"loss_sum": 0.0, "steps": 0}  # the loss of an epoch left mid-way (max-steps, signal)
        self.elapsed_before = 0.0  # run time of earlier sessions of a resumed run
        self.t0 = time.perf_counter()
        self.stop_reason: str | None = None  # set by a hook (early stop) to end the run after this epoch
        self.meter: EpochMeter | None = None  # the current epoch's timing
        self.loss: torch.Tensor | None = None  # the last step's loss, detached, on the device
        self.loss_value: float | None = None  # read on log steps only: each read is a device sync
        self.log_step = False  # this step reads the loss and may print
        self.completed = False  # fit ran to its end (epochs, --max-steps or a hook's stop)

    def call(self, event: str, *args: Any) -> None:
        for hook in self.hooks:
            getattr(hook, event)(*args)

    # -- checkpoint state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        p = self.parts
        state = {
            "model": self.eval_model.state_dict(),
            "optimizer": p.optimizer.state_dict(),
            "scheduler": p.scheduler.state_dict(),
            "scaler": p.scaler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "history": self.history,
            "elapsed_s": self.elapsed(),
            "train_seconds": self.clock.seconds,
            "partial": self.partial,
            "rng": {"torch": torch.get_rng_state()},
            "config": self.cfg.to_dict(),
            "palette": self.data.palette.to_state(),
            "versions": versions(),
        }
        for hook in self.hooks:
            state.update(hook.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        p = self.parts
        self.model.load_state_dict(state.get("train_model", state["model"]))  # raw weights, with an EMA
        self.clock.seconds = state.get("train_seconds", 0.0)  # before the schedule, which may read it
        self.real_seconds = self.synced_seconds = self.clock.seconds
        p.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):  # absent in checkpoints written before 16-mixed existed
            p.scaler.load_state_dict(state["scaler"])
        p.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step = state["global_step"]
        self.history = list(state["history"])
        self.elapsed_before = state["elapsed_s"]
        self.partial = dict(state["partial"])
        torch.set_rng_state(state["rng"]["torch"])
        for hook in self.hooks:
            hook.load_state_dict(state)

    def save(self, path: Path) -> None:
        if not self.dist.is_main:  # every rank holds the same weights; one writer
            return
        try:
            save_checkpoint(self.state_dict(), path)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError ("unexpected pos")
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:160]
            raise TrainingError(
                f"{path}: could not write checkpoint ({reason}; disk full?); the previous checkpoint is kept"
            ) from None

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0

    # -- the loop -----------------------------------------------------------------------------------
    def fit(self, interrupt: dict[str, int | None]) -> list[dict[str, Any]]:
        """Train to the end (all epochs, --max-steps, or a hook's stop); returns the history."""
        self.t0 = time.perf_counter()
        self.call("before_train")
        unvalidated = self.partial.pop("unvalidated", None)  # a signal cut the last session's validation short
        try:
            while unvalidated is not None or (self.epoch < self.cfg.train.epochs and not self.out_of_steps()
                                              and not self.out_of_time() and self.stop_reason is None):
                if unvalidated is not None:
                    self.call("before_epoch")  # hooks see every epoch they are told the end of
                try:
                    record = unvalidated or self.train_epoch(interrupt)
                except torch.OutOfMemoryError:
                    raise self.out_of_memory() from None
                unvalidated = None
                if record is None:  # interrupted mid-epoch: last.pt holds the position
                    raise Interrupted(self.run.root, interrupt["signum"] or signal.SIGINT)
                try:
                    metrics = self.validate(record)
                except LoaderFailed:
                    if interrupt["signum"] is None:
                        raise
                    raise self.interrupted_in_validation(record, interrupt["signum"]) from None
                self.history.append(record)
                self.call("after_epoch", record, metrics)
                if self.stop_requested(interrupt):  # arrived during the last step or validation
                    raise Interrupted(self.run.root, interrupt["signum"] or signal.SIGINT)
            if not weights_agree(self.model, self.dist, self.rt.device):
                raise TrainingError("DDP ranks ended with different weights: a rank diverged (please report this)")
            if not self.history:
                raise TrainingError("no epoch finished: nothing to report")
            if self.stop_reason:
                self.console.print(self.stop_reason)
            self.completed = True
        finally:
            self.call("after_train")
        return self.history

    def interrupted_in_validation(self, record: dict[str, Any], signum: int) -> Interrupted:
        """A signal to the whole process group ended the val loader's workers: the epoch's training
        is done, so last.pt keeps it with its record, and --resume validates it first."""
        self.partial["unvalidated"] = record
        self.save(self.run.last)
        del self.partial["unvalidated"]
        return Interrupted(self.run.root, signum)

    def train_epoch(self, interrupt: dict[str, int | None]) -> dict[str, Any] | None:
        """Steps to the end of the epoch (or --max-steps, or a signal); None when a signal stopped
        it mid-epoch (last.pt is saved), else the epoch's record for metrics.jsonl."""
        cfg = self.cfg.train
        loader = self.data.train
        self.model.train()
        loader.set_epoch(self.epoch, self.step_in_epoch)
        self.meter = meter = EpochMeter(self.rt.device)
        loss_sum = torch.zeros((), device=self.rt.device)
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.rt.device)
        stopping = False
        self.call("before_epoch")
        last = self.tick()
        batches = iter(loader)
        batch = self.next_batch(batches, interrupt)
        while batch is not None:
            image, target = batch
            loss = self.parts.step(image, target)
            batch = self.next_batch(batches, interrupt)  # fetch while the step runs on the GPU
            self.step_in_epoch += 1
            self.global_step += 1
            self.log_step = self.global_step % cfg.log_every == 0 or batch is None
            now = self.tick()
            self.real_seconds += now - last
            last = now
            self.advance_clock()  # before the schedule reads it: the last step lands on the floor
            self.parts.scheduler.step()
            self.loss = loss
            loss_sum += loss
            nonfinite |= ~torch.isfinite(loss)
            meter.step_done(image.shape[0])
            if self.log_step:
                self.check_finite(nonfinite)
                self.loss_value = loss.item()
            self.call("after_step")
            # Ranks agree on stopping only at log steps (a sync); alone, every step is free.
            if (self.log_step or not self.dist.enabled) and self.stop_requested(interrupt):
                stopping = True
                break
            if self.out_of_steps() or self.out_of_time():
                break
        self.check_finite(nonfinite)
        return self.end_epoch(loss_sum, stopping)

    def advance_clock(self) -> None:
        """The training clock the budget and the schedule read. One process: its own measured time.
        Under DDP it must be the same number on every rank (else ranks would use different learning
        rates or stop at different steps, and diverge or hang): between log steps it advances by the
        step time agreed at the last one, and each log step sets it to the slowest rank's time."""
        if not self.dist.enabled:
            self.clock.seconds = self.real_seconds
            return
        self.steps_since_sync += 1
        if not self.log_step:
            self.clock.seconds += self.step_estimate
            return
        synced = max_over_ranks(self.real_seconds, self.dist, self.rt.device)
        self.step_estimate = max(0.0, synced - self.synced_seconds) / self.steps_since_sync
        self.clock.seconds = self.synced_seconds = synced
        self.steps_since_sync = 0

    def end_epoch(self, loss_sum: torch.Tensor, stopping: bool) -> dict[str, Any] | None:
        n_batches = len(self.data.train)
        ws = self.dist.world_size
        self.partial["loss_sum"] += sum_over_ranks([loss_sum.item()], self.dist, self.rt.device)[0] / ws
        self.partial["steps"] = self.step_in_epoch
        finished = self.step_in_epoch == n_batches
        if stopping and not finished:
            self.save(self.run.last)
            return None
        stats = self.meter.summary()
        # Throughput adds up over ranks; the data-wait share is their mean.
        ips, wait = sum_over_ranks([stats["images_per_s"], stats["data_wait_share"]], self.dist, self.rt.device)
        record = {
            "epoch": self.epoch + 1,
            "partial": not finished,  # stopped by --max-steps or the budget: last.pt resumes inside it
            "step": self.global_step,
            "train_s": self.clock.seconds,
            "loss": self.partial["loss_sum"] / max(1, self.partial["steps"]),
            "lr": self.parts.optimizer.param_groups[0]["lr"],
            "images_per_s": ips,
            "data_wait_share": wait / ws,
            "seconds": stats["seconds"],
            "timed_images": stats["timed_images"],
            "timed_seconds": stats["timed_seconds"],
        }
        if finished:
            self.epoch += 1
            self.step_in_epoch = 0
            self.partial = {"loss_sum": 0.0, "steps": 0}
        return record

    def validate(self, record: dict[str, Any]) -> SegMetrics:
        """Score the val split into `record` (rank 0's BatchNorm statistics on every rank first)."""
        broadcast_buffers(self.eval_model, self.dist)
        with StepProgress(self.console, f"val after epoch {record['epoch']}", len(self.data.val)) as bar:
            metrics, val_loss = evaluate_model(self.eval_model, self.data.val, self.rt,
                                               self.data.palette.num_classes, self.dist,
                                               on_batch=lambda done: bar.step(done, "", log=done == len(self.data.val)))
        record.update(metrics.to_dict(with_confusion=False), val_loss=val_loss, elapsed_s=self.elapsed())
        return metrics

    def next_batch(self, batches: Iterator, interrupt: dict[str, int | None]):
        t = time.perf_counter()
        try:
            batch = next(batches, None)
        except Exception:
            if interrupt["signum"] is None:
                raise
            # A SIGTERM sent to the whole process group (Slurm, systemd) also ended the loader's
            # workers: the step in flight still finishes and last.pt is saved.
            batch = None
        self.meter.waited(time.perf_counter() - t)
        return batch

    def stop_requested(self, interrupt: dict[str, int | None]) -> bool:
        """Ctrl-C/SIGTERM seen by any rank; every rank must call this at the same step."""
        return any_rank(interrupt["signum"] is not None, self.dist, self.rt.device)

    def out_of_steps(self) -> bool:
        return bool(self.cfg.train.max_steps) and self.global_step >= self.cfg.train.max_steps

    def out_of_time(self) -> bool:
        budget = self.cfg.train.time_budget_s
        return budget is not None and self.clock.seconds >= budget

    def check_finite(self, nonfinite: torch.Tensor) -> None:
        if any_rank(bool(nonfinite.item()), self.dist, self.rt.device):
            raise TrainingError(
                f"loss became NaN/inf at epoch {self.epoch + 1}, step {self.global_step}; "
                f"the last good checkpoint is {self.run.last} (try a lower --lr or --precision 32)"
            )

    def out_of_memory(self) -> TrainingError:
        """Save the position (the failed step changed no weights) and suggest a smaller batch."""
        self.parts.optimizer.zero_grad(set_to_none=True)
        if self.rt.device.type == "cuda":
            torch.cuda.empty_cache()
        self.save(self.run.last)
        bs = self.cfg.data.batch_size
        return TrainingError(
            f"out of {self.rt.device.type} memory at batch size {bs}: try --batch-size {max(1, bs // 2)} "
            f"(or a smaller --image-size / --width); continue with --resume {self.run.root}"
        )
