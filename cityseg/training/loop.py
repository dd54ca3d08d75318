"""The training loop: `fit` runs epochs, `train_epoch` runs steps, `step` is one update. Everything
else (checkpoints, early stop, progress, metrics files, telemetry, profiling) is a hook.

    trainer = Trainer(parts, run, console, hooks=[Telemetry(), Progress(), Checkpointer(), Reporter(), ...])
    summary = trainer.fit(interrupt)          # summary.json's content (the Reporter hook makes it)

A hook (detectron2's `HookBase`) sees the trainer and is called around training, epochs and steps;
it keeps its own state in the checkpoint through `state_dict` / `load_state_dict`, under
`hooks.<its class name>` (checkpoints written before that kept it in top-level keys: still read).

Before the first step `fit` warms up (cityseg/training/warmup.py: compile, capture, autotune, then
every bit of state restored), so the clock that the budget, the schedule and --target-acc read counts
training only. Validation, and with it best.pt / last.pt (`after_epoch`), comes at the `--val-every`
cadence (cityseg/training/cadence.py) and always at the end of the run; checkpoints are written by a
background thread. A signal (SIGINT, SIGTERM, SIGHUP) stops within seconds: the step in flight
finishes (a validation in flight is abandoned), last.pt is saved with the record not yet scored, and
`--resume` scores it first: a scheduler's SIGKILL, 30 s after its SIGTERM, finds nothing left to lose.
Where the time went (start-up, warm-up, training, validation, checkpoints) is kept in
`timing()`, from the process start.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from cityseg.checkpoint import CheckpointWriter, hook_state, weights_only_state
from cityseg.config import Config
from cityseg.distributed import DistInfo, any_rank, broadcast_buffers, max_over_ranks, sum_over_ranks, weights_agree
from cityseg.errors import InterruptedNow
from cityseg.metrics import LoaderFailed, SegMetrics, evaluate_model
from cityseg.progress import StepProgress, stage
from cityseg.report import RunFolder, versions
from cityseg.runtime import Runtime
from cityseg.telemetry import EpochMeter
from cityseg.training.cadence import ValCadence
from cityseg.training.schedule import ProgressLR, TrainClock, tick_function
from cityseg.training.setup import RunData, TrainingError, cpu_advice
from cityseg.training.step import TrainStep
from cityseg.training.warmup import warm_up, warmup_calls

# The parts of the wall time that `timing()` reports (other_s is the rest), cumulative over resumed sessions.
TIMED = ("startup_s", "warmup_s", "train_s", "val_s", "checkpoint_s")

EXIT_INTERRUPTED = 130


class Interrupted(Exception):
    """Ctrl-C / SIGTERM / SIGHUP: the step finished, last.pt is saved."""

    def __init__(self, run_dir: Path, signum: int) -> None:
        self.run_dir, self.signum = run_dir, signum
        super().__init__(f"interrupted; resume with: cityseg-fast train --resume {run_dir}")


class ValidationStopped(Exception):
    """A signal arrived during validation: it is abandoned (`--resume` scores the record)."""


class WaitCut(Exception):
    """A signal arrived while the loop waited for the next training batch: the epoch ends there."""


class HookBase:
    """Override what you need; `self.trainer` is set when the hook is registered."""

    trainer: Trainer

    def before_train(self) -> None: ...
    def after_train(self) -> None: ...
    def before_epoch(self) -> None: ...
    def after_step(self) -> None: ...
    def after_steps(self) -> None: ...  # the epoch's last step is done (before any validation)
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
    def __init__(self, parts: Parts, run: RunFolder, console: Console, hooks: list[HookBase],
                 started_at: float | None = None) -> None:
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
        # This session's zero on the perf_counter clock: the process start (training/__init__.py)
        self.t0 = time.perf_counter() if started_at is None else started_at
        self.times = dict.fromkeys(TIMED, 0.0)  # this session's
        self.times_before = dict.fromkeys(TIMED, 0.0)  # earlier sessions'
        self.first_batch_at: float | None = None  # this session's first batch ready: the first step starts
        self.epoch_stats = (0, 0.0, 0.0)  # the last epoch's steps, training-clock and wall seconds
        self.cadence = ValCadence.from_option(parts.cfg.train.val_every)
        self.writer = CheckpointWriter(self.write_error)
        self.val_models: dict[int, nn.Module] = {}  # compiled validation forwards, by module
        self.compile_cache: dict[str, Any] | None = None  # runtime.use_compile_cache's answer, for the summary
        self.time_zero = "process start"  # what t0 is (training/__init__.py sets it)
        self.versions = versions()  # once, at start-up: it imports DALI (seconds), which no checkpoint should wait on
        self.stop_reason: str | None = None  # set by a hook (early stop) to end the run after this epoch
        self.meter: EpochMeter | None = None  # the current epoch's timing
        self.loss: torch.Tensor | None = None  # the last step's loss, detached, on the device
        self.loss_value: float | None = None  # read on log steps only: each read is a device sync
        self.log_step = False  # this step reads the loss and may print
        self.completed = False  # fit ran to its end (epochs, --max-steps or a hook's stop)
        self.summary: dict[str, Any] | None = None  # what `fit` returns: set by the Reporter hook
        self.data_fingerprint: dict[str, Any] | None = None  # the files trained on (cityseg/data/fingerprint.py)
        self.interrupt: dict[str, Any] = {"signum": None, "immediate": False, "cut": None}  # graceful_interrupts'

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
            "timing": self.timing(),
            "cadence": self.cadence.state_dict(),
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
        self.times_before = {k: float(state.get("timing", {}).get(k, 0.0)) for k in TIMED}
        self.cadence.load_state_dict(state.get("cadence", {}))
        self.partial = dict(state["partial"])
        torch.set_rng_state(state["rng"]["torch"])
        for hook in self.hooks:
            hook.load_state_dict(hook_state(state, type(hook).__name__))

    def save(self, path: Path, weights_only: bool = False) -> None:
        """Hand a host copy of the state to the background writer (the previous write is waited for
        first): the device waits only for that copy. `weights_only`: what best.pt needs."""
        if not self.dist.is_main:  # every rank holds the same weights; one writer
            return
        t = time.perf_counter()
        try:
            state = self.state_dict()
            self.writer.submit(weights_only_state(state) if weights_only else state, path)
        finally:
            self.times["checkpoint_s"] += time.perf_counter() - t

    @staticmethod
    def write_error(path: Path, e: BaseException) -> TrainingError:
        """torch.save reports a full disk as a RuntimeError ("unexpected pos"), the OS as an OSError."""
        lines = str(e).splitlines()
        strerror = getattr(e, "strerror", None)  # the OS names its reason; torch.save's own error does not
        reason = strerror or f"{lines[0][:160] if lines else type(e).__name__}; disk full?"
        return TrainingError(f"{path}: could not write checkpoint ({reason}); the previous checkpoint is kept")

    def finish_writes(self) -> None:
        t = time.perf_counter()
        try:
            self.writer.join()
        finally:
            self.times["checkpoint_s"] += time.perf_counter() - t

    def elapsed(self) -> float:
        """Run time from the process start, earlier sessions of a resumed run included."""
        return self.elapsed_before + time.perf_counter() - self.t0

    def timing(self) -> dict[str, float]:
        """Where the run's wall time went, cumulative over sessions; the parts add up to elapsed_s.
        startup_s: process start to the first batch ready (warm-up excluded); warmup_s: compile and
        capture; train_s: training steps (data waits included); val_s: validation; checkpoint_s: the
        time checkpoints held training up (host copy, waiting on the writer); other_s: the rest
        (reports, TensorBoard, samples)."""
        parts = {k: self.times_before[k] + self.times[k] for k in TIMED}
        if self.first_batch_at is None:  # still starting up
            parts["startup_s"] += time.perf_counter() - self.t0 - self.times["warmup_s"]
        elapsed = self.elapsed()
        return {**parts, "other_s": elapsed - sum(parts.values()), "elapsed_s": elapsed}

    # -- the loop -----------------------------------------------------------------------------------
    def fit(self, interrupt: dict[str, Any]) -> dict[str, Any] | None:
        """Warm up, then train to the end (all epochs, --max-steps, the budget, or a hook's stop),
        validating at the cadence and at the end; returns the run's summary (None without a Reporter
        hook; `history` holds one record per validation)."""
        self.call("before_train")
        self.interrupt = interrupt
        unvalidated = self.partial.pop("unvalidated", None)  # a signal cut the last session's validation short
        try:
            try:
                self.warm_up()
            except torch.OutOfMemoryError:
                raise self.out_of_memory() from None
            while unvalidated is not None or (not self.run_over() and self.stop_reason is None):
                if unvalidated is not None:
                    self.call("before_epoch")  # hooks see every epoch they are told the end of
                try:
                    record = unvalidated or self.train_epoch(interrupt)
                except torch.OutOfMemoryError:
                    raise self.out_of_memory() from None
                resumed, unvalidated = unvalidated is not None, None
                if not resumed:  # a record validated late (its epoch trained last session) has no timing here
                    self.cadence.epoch_done(*self.epoch_stats)
                if self.stop_requested(interrupt):
                    # Mid-epoch or at its end: save the position and go, unscored (a resumed record is
                    # still in last.pt, and a record of no new step is the last validation's, saved
                    # with it): --resume validates it first. No validation on the way out.
                    nothing_new = bool(self.history) and self.history[-1]["step"] == record["step"]
                    raise self.interrupted(record, interrupt["signum"], saved=resumed or nothing_new)
                if resumed or self.run_over() or self.validation_due():
                    t = time.perf_counter()
                    try:
                        metrics = self.validate(record)
                    except (LoaderFailed, ValidationStopped):
                        if interrupt["signum"] is None:
                            raise
                        raise self.interrupted(record, interrupt["signum"], saved=resumed) from None
                    self.history.append(record)
                    self.cadence.validated(self.cadence.cost_s or 0.0)
                    self.call("after_epoch", record, metrics)  # last.pt, best.pt, metrics.jsonl
                    self.cadence.cost_s = time.perf_counter() - t  # validation, checkpoints and reports
                if self.stop_requested(interrupt):  # arrived while the record was scored and saved
                    raise Interrupted(self.run.root, interrupt["signum"] or signal.SIGINT)
            self.finish_writes()  # the last write's time is in the summary, its error before it
            if not weights_agree(self.model, self.dist, self.rt.device):
                raise TrainingError("DDP ranks ended with different weights: a rank diverged (please report this)")
            if not self.history:
                raise TrainingError("no epoch finished: nothing to report")
            if self.stop_reason:
                self.console.print(self.stop_reason)
            self.completed = True
        finally:
            try:
                self.call("after_train")
            finally:
                self.finish_writes()  # last.pt / best.pt are on disk when fit returns, or it says why not
        return self.summary

    def run_over(self) -> bool:
        """The epochs, --max-steps or the budget are spent: the end of the run validates."""
        return self.epoch >= self.cfg.train.epochs or self.out_of_steps() or self.out_of_time()

    def validation_due(self) -> bool:
        """--val-every says so; measured cadences (`auto`) differ between ranks: any rank decides."""
        due = self.cadence.due(self.training_left_s())
        return any_rank(due, self.dist, self.rt.device) if self.cadence.unit == "auto" else due

    def training_left_s(self) -> float:
        """Seconds of training until the epochs, --max-steps or the budget end, at the last epoch's pace."""
        steps, _, wall = self.epoch_stats
        left = (self.cfg.train.epochs - self.epoch) * len(self.data.train) - self.step_in_epoch
        if self.cfg.train.max_steps:
            left = min(left, self.cfg.train.max_steps - self.global_step)
        seconds = left * wall / max(1, steps)
        budget = self.cfg.train.time_budget_s
        return seconds if budget is None else min(seconds, budget - self.clock.seconds)

    def warm_up(self) -> None:
        """Compile and capture before the clock starts (cityseg/training/warmup.py), every rank, then
        wait for the slowest: the first step of every rank starts together."""
        p, t = self.parts, time.perf_counter()
        val = self.data.val
        forwards = [self.val_forward()] if self.rt.compile else []
        expect = "torch.compile: a minute or more the first time, less from its cache" if self.rt.compile else "a step"
        # A signal here stops at once: nothing new to save, and one compile may take minutes.
        if self.interrupt["signum"] is not None:
            raise InterruptedNow(self.interrupt["signum"])
        self.interrupt["immediate"] = True
        try:
            with stage("warm-up: the first step on a synthetic batch, before the clock starts", expect):
                warm_up(p.step, calls := warmup_calls(self.rt, p.step), self.model, p.optimizer, p.scaler, self.rt,
                        self.data.train.spec, self.data.palette, forwards, val.spec, self.val_batch_sizes())
        finally:
            self.interrupt["immediate"] = False
        max_over_ranks(0.0, self.dist, self.rt.device)  # a barrier
        self.times["warmup_s"] += time.perf_counter() - t
        advice = cpu_advice(self.cfg, self.rt, len(self.data.train), (time.perf_counter() - t) / max(1, calls))
        if advice:
            self.console.print(f"note: {advice}", style="yellow", soft_wrap=True)

    def val_forward(self) -> nn.Module:
        """What validation calls: the scored model (an EMA's average, perhaps), compiled with static
        shapes where training is compiled, so it runs training's kernels at training's precision."""
        model = self.eval_model
        if not self.rt.compile:
            return model
        if id(model) not in self.val_models:
            self.val_models[id(model)] = torch.compile(model, mode=self.rt.compile_mode, dynamic=False)
        return self.val_models[id(model)]

    def val_batch_sizes(self) -> list[int]:
        """The batch sizes validation meets on this rank's shard: full batches and the last one."""
        n, ws, bs = len(self.data.val_files), self.dist.world_size, self.data.val.spec.batch_size
        sizes = set()
        for shard in {n // ws, -(-n // ws)}:
            if shard:
                sizes.add(min(bs, shard))
                if shard % bs:
                    sizes.add(shard % bs)
        return sorted(sizes, reverse=True)

    def save_unvalidated(self, record: dict[str, Any]) -> None:
        """last.pt with the position reached and the record not yet scored: --resume validates it first."""
        self.partial["unvalidated"] = record
        self.save(self.run.last)
        del self.partial["unvalidated"]

    def interrupted(self, record: dict[str, Any], signum: int, saved: bool) -> Interrupted:
        """A signal after training steps or during validation: the training that `record` covers is
        done, so last.pt keeps it unscored (unless it holds it already: a resumed record) and
        --resume validates it first. The background write is waited for: on disk before the exit."""
        if not saved:
            self.save_unvalidated(record)
        self.finish_writes()
        return Interrupted(self.run.root, signum)

    def train_epoch(self, interrupt: dict[str, Any]) -> dict[str, Any]:
        """Steps to the end of the epoch (or --max-steps, the budget, or a signal); the record for
        metrics.jsonl, `partial` when the epoch was left mid-way (last.pt then resumes inside it)."""
        cfg = self.cfg.train
        loader = self.data.train
        started, steps_before, clock_before = time.perf_counter(), self.global_step, self.clock.seconds
        self.model.train()
        loader.set_epoch(self.epoch, self.step_in_epoch)
        self.meter = meter = EpochMeter(self.rt.device)
        loss_sum = torch.zeros((), device=self.rt.device)
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.rt.device)
        self.call("before_epoch")
        session_start = self.first_batch_at is None
        last = self.tick()
        batches = iter(loader)
        batch = self.next_batch(batches, interrupt)
        if session_start:  # workers and pipelines starting up are start-up, not training
            self.first_batch_at = started = time.perf_counter()
            self.times["startup_s"] += started - self.t0 - self.times["warmup_s"]
            self.meter = meter = EpochMeter(self.rt.device)
            last = self.tick()
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
                break
            # A position past the loader's length (a wrong resume offset) must end the epoch, not spin.
            if self.out_of_steps() or self.out_of_time() or self.step_in_epoch >= len(loader):
                break
        self.call("after_steps")
        self.check_finite(nonfinite)
        record = self.end_epoch(loss_sum)
        wall = time.perf_counter() - started
        self.times["train_s"] += wall
        self.epoch_stats = (self.global_step - steps_before, self.clock.seconds - clock_before, wall)
        return record

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

    def end_epoch(self, loss_sum: torch.Tensor) -> dict[str, Any]:
        n_batches = len(self.data.train)
        ws = self.dist.world_size
        self.partial["loss_sum"] += sum_over_ranks([loss_sum.item()], self.dist, self.rt.device)[0] / ws
        self.partial["steps"] = self.step_in_epoch
        finished = self.step_in_epoch >= n_batches  # never skipped, even from a position past the end
        stats = self.meter.summary()
        # Throughput adds up over ranks; the data-wait share is their mean.
        ips, wait = sum_over_ranks([stats["images_per_s"], stats["data_wait_share"]], self.dist, self.rt.device)
        record = {
            "epoch": self.epoch + 1,
            "partial": not finished,  # stopped by --max-steps, the budget or a signal: last.pt resumes inside it
            "step": self.global_step,
            "train_s": self.clock.seconds,
            "loss": self.partial["loss_sum"] / max(1, self.partial["steps"]),
            "lr": self.parts.optimizer.param_groups[0]["lr"],
            "images_per_s": ips,
            "data_wait_share": wait / ws,
            # a device-side loader's own GPU time on the training stream (None on a CPU): rank 0's
            "loader_gpu_share": stats["loader_gpu_share"],
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
        """Score the val split into `record` (rank 0's BatchNorm statistics on every rank first), with
        when it was known three ways: `elapsed_s` from the process start, `wall_s` from the first step,
        `train_s` on the training clock."""
        t = time.perf_counter()
        broadcast_buffers(self.eval_model, self.dist)
        def on_batch(done: int) -> None:
            bar.step(done, "", log=done == len(self.data.val))
            if self.validation_stop_requested(done):
                raise ValidationStopped
            if not self.dist.enabled:  # from now on a signal ends validation at once (not while the loader's
                self.interrupt["cut"] = ValidationStopped  # iterator is being built: half-built, it fails at exit)

        try:
            with StepProgress(self.console, f"val after epoch {record['epoch']}", len(self.data.val)) as bar:
                metrics, val_loss = evaluate_model(self.val_forward(), self.data.val, self.rt,
                                                   self.data.palette.num_classes, self.dist, on_batch=on_batch)
        finally:
            self.interrupt["cut"] = None
        self.times["val_s"] += time.perf_counter() - t
        now = self.timing()  # wall_s: from the first step, start-up and warm-up of every session left out
        record.update(metrics.to_dict(with_confusion=False), val_loss=val_loss, elapsed_s=now["elapsed_s"],
                      wall_s=now["elapsed_s"] - now["startup_s"] - now["warmup_s"])
        return metrics

    def next_batch(self, batches: Iterator, interrupt: dict[str, Any]):
        with self.meter.loading():  # the host's wait, and on a GPU the loader's work on this stream
            try:
                with self.cut_by_signal(WaitCut):
                    return next(batches, None)
            except WaitCut:  # the signal came during the wait: the steps done are saved
                return None
            except Exception:
                if interrupt["signum"] is None:
                    raise
                # A SIGTERM sent to the whole process group (Slurm, systemd) also ended the loader's
                # workers: the step in flight still finishes and last.pt is saved.
                return None

    @contextmanager
    def cut_by_signal(self, cut: type[Exception]) -> Iterator[None]:
        """In the block a signal raises `cut` at once (graceful_interrupts), one process only: under DDP
        every rank must stop at the same step, which a vote after the step decides."""
        if self.dist.enabled:
            yield
            return
        if self.interrupt["signum"] is not None:
            raise cut
        self.interrupt["cut"] = cut
        try:
            yield
        finally:
            self.interrupt["cut"] = None

    def validation_stop_requested(self, done: int) -> bool:
        """A signal seen during validation. One process: after every batch. DDP: every 8th batch up to
        the shortest shard's length, so every rank takes part in each vote (a collective)."""
        if not self.dist.enabled:
            return self.interrupt["signum"] is not None
        ws, bs = self.dist.world_size, self.data.val.spec.batch_size
        fewest = -(-(len(self.data.val_files) // ws) // bs)  # the last rank's shard is the shortest
        if done % 8 or done > fewest:
            return False
        return self.stop_requested(self.interrupt)

    def stop_requested(self, interrupt: dict[str, Any]) -> bool:
        """Ctrl-C/SIGTERM/SIGHUP seen by any rank; every rank must call this at the same step."""
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
