"""The training loop: the `Trainer` holds the state of a run (model, optimiser, position, clock,
history) and runs epochs of steps; everything else is a hook (cityseg/training/hooks/) or a small
collaborator (validation.py, saving.py, limits.py, interrupts.py, timing.py, synced_clock.py).

    trainer = Trainer(parts, run, console, hooks=default_hooks(cfg.train))
    summary = trainer.fit(flag)          # summary.json's content (the Reporter hook reports it)

The order of events (`fit`):

    before_train -> warm-up (compile, capture; the training clock starts after it)
    each epoch:     before_epoch -> (step -> after_step)* -> after_steps
                    -> validation, when due (cadence, the run's end, a record --resume must score)
                    -> after_epoch(record, metrics)   # best.pt, top-k, last.pt, metrics.jsonl, TensorBoard
    until the epochs, --max-steps, the budget, or a hook's stop (events.stop_reason)
    after_train (also while an error or a signal unwinds)

Hooks read the trainer and report through `trainer.events` (events.py), never by setting its
attributes. A signal stops within seconds: the step in flight finishes (a validation in flight is
abandoned) and last.pt is saved with the record unscored; `--resume` scores it first.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console
from torch import nn

from cityseg.checkpoint import hook_state
from cityseg.config import Config
from cityseg.distributed import DistInfo, max_over_ranks, sum_over_ranks, weights_agree
from cityseg.metrics import LoaderFailed
from cityseg.progress import stage
from cityseg.report import RunFolder, versions
from cityseg.runtime import Runtime
from cityseg.telemetry import EpochMeter
from cityseg.training.events import EventStore
from cityseg.training.exits import check_finite, saved_if_out_of_memory
from cityseg.training.hook import HookBase
from cityseg.training.interrupts import EXIT_INTERRUPTED, Interrupted, Signals, ValidationStopped, WaitCut, new_flag
from cityseg.training.limits import RunLimits
from cityseg.training.records import epoch_record
from cityseg.training.saving import CheckpointSaver
from cityseg.training.schedule import ProgressLR, TrainClock, tick_function
from cityseg.training.setup import RunData, TrainingError, cpu_advice
from cityseg.training.step import TrainStep
from cityseg.training.synced_clock import SyncedClock
from cityseg.training.timing import RunTimes
from cityseg.training.validation import Validator
from cityseg.training.warmup import warm_up, warmup_calls

__all__ = ["EXIT_INTERRUPTED", "HookBase", "Interrupted", "Parts", "Trainer"]


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
    scheduler: ProgressLR  # stepped by the LRSchedule hook
    scaler: torch.amp.GradScaler
    clock: TrainClock  # training seconds (validation excluded): the time budget's and the schedule's clock


class Trainer:
    def __init__(self, parts: Parts, run: RunFolder, console: Console, hooks: list[HookBase],
                 started_at: float | None = None, time_zero: str = "process start") -> None:
        self.parts, self.run, self.console = parts, run, console
        self.cfg, self.rt, self.dist, self.data = parts.cfg, parts.rt, parts.dist, parts.data
        self.model, self.clock = parts.model, parts.clock
        self.events = EventStore()  # what hooks report
        self.times = RunTimes(started_at, time_zero)  # where the wall time went
        self.synced = SyncedClock(parts.clock, tick_function(parts.cfg.train.clock), parts.dist, parts.rt.device)
        self.saver = CheckpointSaver(self.state_dict, parts.dist.is_main, self.times)
        self.limits, self.validator = RunLimits(self), Validator(self)
        self.signals = Signals(new_flag(), parts.dist, parts.rt.device)  # fit's flag replaces it
        self.hooks = hooks
        for hook in hooks:
            hook.trainer = self
        # the position, and what the run has done
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.history: list[dict[str, Any]] = []  # one record per validation
        self.partial = {"loss_sum": 0.0, "steps": 0}  # the loss of an epoch left mid-way (max-steps, signal)
        self.epoch_stats = (0, 0.0, 0.0)  # the last epoch's steps, training-clock and wall seconds
        self.completed = False  # fit ran to its end (epochs, --max-steps or a hook's stop)
        # the current step, for hooks
        self.meter: EpochMeter | None = None  # the current epoch's timing
        self.loss: torch.Tensor | None = None  # the last step's loss, detached, on the device
        self.loss_value: float | None = None  # read on log steps only: each read is a device sync
        self.log_step = False  # this step reads the loss and may print
        # facts for the checkpoint and the summary
        self.versions = versions()  # once, at start-up: it imports DALI (seconds), which no checkpoint should wait on
        self.compile_cache: dict[str, Any] | None = None  # runtime.use_compile_cache's answer
        self.data_fingerprint: dict[str, Any] | None = None  # the files trained on (cityseg/data/fingerprint.py)

    @property
    def scored_model(self) -> nn.Module:
        """What validation scores and checkpoints save: the model, or what a hook put in its place."""
        return self.events.scored_model or self.model

    def call(self, event: str, *args: Any) -> None:
        for hook in self.hooks:
            getattr(hook, event)(*args)

    # -- checkpoint state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        p = self.parts
        state = {
            "model": self.scored_model.state_dict(), "optimizer": p.optimizer.state_dict(),
            "scheduler": p.scheduler.state_dict(), "scaler": p.scaler.state_dict(),
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "history": self.history,
            "elapsed_s": self.times.elapsed(),
            "train_seconds": self.clock.seconds,
            "partial": self.partial,
            "timing": self.times.timing(),
            "cadence": self.validator.cadence.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
            "config": self.cfg.to_dict(),
            "palette": self.data.palette.to_state(),
            "data_fingerprint": self.data_fingerprint,  # what --resume checks the data folder against
            "versions": self.versions,
        }
        hooks = {type(hook).__name__: hook.state_dict() for hook in self.hooks}
        state["hooks"] = {name: hook_state for name, hook_state in hooks.items() if hook_state}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        p = self.parts
        self.model.load_state_dict(state["model"])  # an EMA hook then swaps in the raw weights it saved
        self.synced.resume(state.get("train_seconds", 0.0))  # before the schedule, which may read the clock
        p.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):  # absent in checkpoints written before 16-mixed existed
            p.scaler.load_state_dict(state["scaler"])
        p.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step = state["global_step"]
        self.history = list(state["history"])
        self.times.load(state)
        self.validator.cadence.load_state_dict(state.get("cadence", {}))
        self.partial = dict(state["partial"])
        torch.set_rng_state(state["rng"]["torch"])
        for hook in self.hooks:
            hook.load_state_dict(hook_state(state, type(hook).__name__))

    # -- the loop -----------------------------------------------------------------------------------
    def fit(self, flag: dict[str, Any]) -> dict[str, Any] | None:
        """Warm up, then train to the end (all epochs, --max-steps, the budget, or a hook's stop),
        validating when due; returns the run's summary (None without a Reporter hook).
        `flag`: graceful_interrupts' (interrupts.py)."""
        self.call("before_train")
        self.signals = Signals(flag, self.dist, self.rt.device)
        unvalidated = self.partial.pop("unvalidated", None)  # a signal cut the last session's validation short
        try:
            with saved_if_out_of_memory(self):
                self.warm_up()
            while unvalidated is not None or not (self.limits.run_over() or self.events.stop_reason):
                self.epoch_round(unvalidated)
                unvalidated = None
            self.finish()
        finally:
            try:
                self.call("after_train")
            finally:
                self.saver.finish()  # last.pt / best.pt are on disk when fit returns, or it says why not
        return self.events.summary

    def epoch_round(self, unvalidated: dict[str, Any] | None) -> None:
        """An epoch's steps (or the record of last session's, unscored), then its validation when due.
        A signal saves the position and goes, unscored: --resume validates the record first."""
        resumed = unvalidated is not None
        if resumed:  # a record validated late (its epoch trained last session) has no timing here
            self.call("before_epoch")  # hooks see every epoch they are told the end of
            record = unvalidated
        else:
            with saved_if_out_of_memory(self):
                record = self.train_epoch()
            self.validator.cadence.epoch_done(*self.epoch_stats)
        if self.signals.requested():
            # A resumed record is still in last.pt, and a record of no new step is the last validation's
            nothing_new = bool(self.history) and self.history[-1]["step"] == record["step"]
            raise self.interrupted(record, saved=resumed or nothing_new)
        if self.validator.due(resumed):
            self.score(record, resumed)
        if self.signals.requested():  # arrived while the record was scored and saved
            raise Interrupted(self.run.root, self.signals.signum or signal.SIGINT)

    def score(self, record: dict[str, Any], resumed: bool) -> None:
        """Score `record`, then the hooks' after_epoch (last.pt, best.pt, metrics.jsonl, ...)."""
        t, cadence = time.perf_counter(), self.validator.cadence
        try:
            metrics = self.validator.validate(record)
        except (LoaderFailed, ValidationStopped):
            if self.signals.signum is None:
                raise
            raise self.interrupted(record, saved=resumed) from None
        self.history.append(record)
        cadence.validated(cadence.cost_s or 0.0)
        self.call("after_epoch", record, metrics)
        cadence.cost_s = time.perf_counter() - t  # validation, checkpoints and reports

    def finish(self) -> None:
        self.saver.finish()  # the last write's time is in the summary, its error before it
        if not weights_agree(self.model, self.dist, self.rt.device):
            raise TrainingError("DDP ranks ended with different weights: a rank diverged (please report this)")
        if not self.history:
            raise TrainingError("no epoch finished: nothing to report")
        if self.events.stop_reason:
            self.console.print(self.events.stop_reason)
        self.completed = True

    def warm_up(self) -> None:
        """Compile and capture before the clock starts (cityseg/training/warmup.py), every rank, then
        wait for the slowest: the first step of every rank starts together."""
        p, t, val = self.parts, time.perf_counter(), self.data.val
        forwards = [self.validator.forward()] if self.rt.compile else []
        expect = "torch.compile: a minute or more the first time, less from its cache" if self.rt.compile else "a step"
        with self.signals.at_once(), stage("warm-up: the first step on a synthetic batch, before the clock starts",
                                           expect):
            warm_up(p.step, calls := warmup_calls(self.rt, p.step), self.model, p.optimizer, p.scaler, self.rt,
                    self.data.train.spec, self.data.palette, forwards, val.spec, self.validator.batch_sizes())
        max_over_ranks(0.0, self.dist, self.rt.device)  # a barrier
        self.times.add("warmup_s", time.perf_counter() - t)
        advice = cpu_advice(self.cfg, self.rt, len(self.data.train), (time.perf_counter() - t) / max(1, calls))
        if advice:
            self.console.print(f"note: {advice}", style="yellow", soft_wrap=True)

    def train_epoch(self) -> dict[str, Any]:
        """Steps to the end of the epoch (or --max-steps, the budget, or a signal); the record for
        metrics.jsonl, `partial` when the epoch was left mid-way (last.pt then resumes inside it)."""
        started, steps_before, clock_before = time.perf_counter(), self.global_step, self.clock.seconds
        self.model.train()
        self.data.train.set_epoch(self.epoch, self.step_in_epoch)
        self.meter = EpochMeter(self.rt.device)
        loss_sum = torch.zeros((), device=self.rt.device)
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.rt.device)
        self.call("before_epoch")
        session_start = self.times.first_batch_at is None
        self.synced.start()
        batches = iter(self.data.train)
        batch = self.next_batch(batches)
        if session_start:  # workers and pipelines starting up are start-up, not training
            started = self.times.first_batch()
            self.meter = EpochMeter(self.rt.device)
            self.synced.start()
        while batch is not None:
            image, target = batch
            self.loss = loss = self.parts.step(image, target)
            batch = self.next_batch(batches)  # fetch while the step runs on the GPU
            self.step_in_epoch, self.global_step = self.step_in_epoch + 1, self.global_step + 1
            self.log_step = self.global_step % self.cfg.train.log_every == 0 or batch is None
            self.synced.step_done(self.log_step)  # before the schedule (a hook) reads it
            loss_sum += loss
            nonfinite |= ~torch.isfinite(loss)
            self.meter.step_done(image.shape[0])
            if self.log_step:
                check_finite(self, nonfinite)
                self.loss_value = loss.item()
            self.call("after_step")
            if self.epoch_ends_here():
                break
        self.call("after_steps")
        check_finite(self, nonfinite)
        record = self.end_epoch(loss_sum)
        self.times.add("train_s", wall := time.perf_counter() - started)
        self.epoch_stats = (self.global_step - steps_before, self.clock.seconds - clock_before, wall)
        return record

    def epoch_ends_here(self) -> bool:
        """After a step: a signal (ranks agree only at log steps, a sync; alone, every step is free),
        --max-steps, the budget, or the loader's end (a position past it, from a wrong resume offset,
        must end the epoch, not spin)."""
        if (self.log_step or not self.dist.enabled) and self.signals.requested():
            return True
        return self.limits.out_of_steps() or self.limits.out_of_time() or self.step_in_epoch >= len(self.data.train)

    def end_epoch(self, loss_sum: torch.Tensor) -> dict[str, Any]:
        ws = self.dist.world_size
        self.partial["loss_sum"] += sum_over_ranks([loss_sum.item()], self.dist, self.rt.device)[0] / ws
        self.partial["steps"] = self.step_in_epoch
        finished = self.step_in_epoch >= len(self.data.train)  # never skipped, even from a position past the end
        record = epoch_record(self, finished)
        if finished:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            self.partial = {"loss_sum": 0.0, "steps": 0}
        return record

    def next_batch(self, batches: Iterator) -> Any:
        with self.meter.loading():  # the host's wait, and on a GPU the loader's work on this stream
            try:
                with self.signals.cut_by(WaitCut):
                    return next(batches, None)
            except WaitCut:  # the signal came during the wait: the steps done are saved
                return None
            except Exception:
                if self.signals.signum is None:
                    raise
                # A SIGTERM sent to the whole process group (Slurm, systemd) also ended the loader's
                # workers: the step in flight still finishes and last.pt is saved.
                return None

    def interrupted(self, record: dict[str, Any], saved: bool) -> Interrupted:
        """A signal after training steps or during validation: the training that `record` covers is
        done, so last.pt keeps it unscored (unless it holds it already: a resumed record) and
        --resume validates it first. The background write is waited for: on disk before the exit."""
        if not saved:
            self.partial["unvalidated"] = record
            self.saver.save(self.run.last)
            del self.partial["unvalidated"]
        self.saver.finish()
        return Interrupted(self.run.root, self.signals.signum)
