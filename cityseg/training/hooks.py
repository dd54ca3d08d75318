"""The side concerns of training, one hook each (see `HookBase` in loop.py for the events):

- `Telemetry`   starts/stops the NVML sampler and adds the GPU fields of the training steps (not of
  validation or checkpoints) to each record
- `Progress`    the per-epoch bar in a terminal, plain lines with ETA everywhere else
- `EMA`         an exponential moving average of the weights, validated and saved (--ema)
- `BestModel`   keeps the best val mIoU, writes best.pt (weights, no optimiser), stops early after
  `patience` validations
- `TargetAccuracy` ends the run at the first validation that reaches --target-acc
- `Checkpointer` writes last.pt at every validation (the --val-every cadence)
- `MetricsWriter` metrics.jsonl (after last.pt, so a kill in between is mended on resume) and the
  console report of each epoch (per-class IoU table and one line)
- `Reporter`    at the end: summary.json (timing breakdown included), curves.png, samples.png,
  gpu_timeline.png
- `TensorBoard` event files in the run folder (rank 0)
- `StepCallback` calls a function after every step (torch.profiler's `step`)
Hooks run in list order; the order in `default_hooks` is the one these notes assume.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from cityseg.config import MAX_EPOCHS, TrainConfig
from cityseg.data.contract import denormalize
from cityseg.metrics import SegMetrics, iou_table
from cityseg.outputs import writing
from cityseg.progress import StepProgress, format_eta
from cityseg.report import (
    append_jsonl,
    device_name,
    plot_curves,
    plot_gpu_timeline,
    plot_samples,
    sample_grid,
    time_to_thresholds,
    write_json,
    write_jsonl,
)
from cityseg.runtime import autocast
from cityseg.telemetry import GpuSampler, fmt
from cityseg.training.loop import HookBase, Interrupted

log = logging.getLogger("cityseg.training")


class Telemetry(HookBase):
    """GPU fields over the training steps only: each epoch's steps are a window of samples (from
    `before_epoch` to `after_steps`); a record gets the windows since the previous record."""

    def before_train(self) -> None:
        self.gpu = GpuSampler(self.trainer.rt.device).start()
        self.windows: list[tuple[int, int]] = []  # since the last record
        self.all_windows: list[tuple[int, int]] = []  # the whole session, for the summary

    def after_train(self) -> None:
        self.gpu.stop()

    def before_epoch(self) -> None:
        self.mark = self.gpu.mark()

    def after_steps(self) -> None:
        window = (self.mark, self.gpu.mark())
        self.windows.append(window)
        self.all_windows.append(window)

    def after_epoch(self, record: dict[str, Any], metrics: SegMetrics) -> None:
        record.update(self.gpu.summary(windows=self.windows))
        self.windows = []
        if self.gpu.problem:
            record["gpu_sampler_problem"] = self.gpu.problem

    def training_summary(self) -> dict[str, float | None]:
        return self.gpu.summary(windows=self.all_windows)

    def live(self) -> str:
        """images/s, data wait and GPU utilisation so far this epoch, for the progress line."""
        meter = self.trainer.meter
        seconds = meter.clock() - meter.start
        ips = meter.images / seconds if seconds > 0 else 0.0
        wait = meter.data_wait / seconds if seconds > 0 else 0.0
        return f"{ips:.1f} img/s  wait {wait:.0%}  gpu {fmt(self.gpu.latest_util(), '.0f', '%')}"


class Progress(HookBase):
    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry
        self.loss_text = ""

    def before_epoch(self) -> None:
        t = self.trainer
        if self.t0 is None:
            self.t0 = time.perf_counter()
        of = "" if t.cfg.train.epochs == MAX_EPOCHS else f"/{t.cfg.train.epochs}"  # a time budget decides
        self.bar = StepProgress(t.console, f"epoch {t.epoch + 1}{of}", len(t.data.train), t.step_in_epoch,
                               own_eta=False).__enter__()

    def after_step(self) -> None:
        t = self.trainer
        if t.log_step:  # the loop read the loss (a device sync) on this step
            self.loss_text = f"step loss {t.loss_value:.3f}  "  # this step's; the epoch line gives the mean
        self.bar.step(t.step_in_epoch, f"{self.loss_text}{self.telemetry.live()}  eta {format_eta(self.run_eta())}",
                      log=t.log_step)
        if t.step_in_epoch == len(t.data.train) or t.out_of_steps() or t.out_of_time():
            self.close()  # the epoch's last step: its bar ends above the validation bar, not below it

    def run_eta(self) -> float | None:
        """Seconds left in the whole run (the one ETA shown): the remaining steps of all epochs (and
        --max-steps) at this session's pace, validation not included, and never past the time budget."""
        t = self.trainer
        total = t.cfg.train.epochs * len(t.data.train)
        if t.cfg.train.max_steps:
            total = min(total, t.cfg.train.max_steps)
        done = t.global_step - self.first_step
        by_steps = None if done <= 0 else (total - t.global_step) * (time.perf_counter() - self.t0) / done
        if t.cfg.train.time_budget_s is None:
            return by_steps
        budget_left = max(0.0, t.cfg.train.time_budget_s - t.clock.seconds)
        return budget_left if by_steps is None else min(by_steps, budget_left)

    def before_train(self) -> None:
        self.t0: float | None = None  # set at the first epoch: the warm-up is not the run's pace
        self.first_step = self.trainer.global_step

    def after_steps(self) -> None:
        self.close()  # before validation's bar and the epoch's report

    def after_train(self) -> None:
        self.close()  # an epoch left mid-way (signal, error)

    def close(self) -> None:
        bar, self.bar = getattr(self, "bar", None), None
        if bar is not None:
            bar.__exit__(None, None, None)


class BestModel(HookBase):
    """Best val mIoU so far -> best.pt (what eval, predict, export and --init-from read: no optimiser
    state); `patience` validations without a better one end the run."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best_miou, self.epochs_since_best = -1.0, 0

    def after_epoch(self, record: dict[str, Any], metrics: SegMetrics) -> None:
        t = self.trainer
        improved = record["miou"] is not None and record["miou"] > self.best_miou
        if improved:
            self.best_miou, self.epochs_since_best = record["miou"], 0
            t.save(t.run.best, weights_only=True)
        else:
            self.epochs_since_best += 1
        if self.patience and self.epochs_since_best >= self.patience:
            t.stop_reason = f"early stop: no better val mIoU in the last {self.patience} validations (--patience)"

    def state_dict(self) -> dict[str, Any]:
        return {"best_miou": self.best_miou, "epochs_since_best": self.epochs_since_best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_miou, self.epochs_since_best = state["best_miou"], state["epochs_since_best"]


class Checkpointer(HookBase):
    """last.pt, everything --resume needs, at each validation (the --val-every cadence)."""

    def after_epoch(self, record: dict[str, Any], metrics: SegMetrics) -> None:
        self.trainer.save(self.trainer.run.last)


class MetricsWriter(HookBase):
    def before_train(self) -> None:
        t = self.trainer
        if t.dist.is_main and t.history:  # a resumed run: the records last.pt knows of, each once
            write_jsonl(t.run.metrics, t.history)

    def after_epoch(self, record: dict[str, Any], metrics: SegMetrics) -> None:
        t = self.trainer
        if t.dist.is_main:
            append_jsonl(t.run.metrics, record)
        t.console.print(iou_table(metrics, t.data.palette.names, title=f"val after epoch {record['epoch']}"))
        line = (f"epoch {record['epoch']}: mean loss {record['loss']:.4f}  val pixel acc {record['pixel_acc']:.4f}  "
                f"mIoU {fmt(record['miou'], '.4f')}  {record['images_per_s']:.1f} img/s  "
                f"data wait {record['data_wait_share']:.0%}"
                + (f" + loader GPU {record['loader_gpu_share']:.0%}" if record.get("loader_gpu_share") is not None
                   else ""))
        t.console.print(line, soft_wrap=True)
        log.info(line)


class Reporter(HookBase):
    """The run's summary (also what `train()` returns) and its pictures, written at the end, also
    when a signal ended the run ("completed": false): an interrupted run keeps its curves."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry
        self.summary: dict[str, Any] | None = None

    def after_train(self) -> None:
        t = self.trainer
        # Called while fit's exception unwinds: a signal's `Interrupted` still gets its summary and pictures
        # (of the epochs done); an error does not (error.log says why), nor a second Ctrl-C (now means now).
        interrupted = isinstance(sys.exc_info()[1], Interrupted)
        if not t.history or not (t.completed or interrupted):
            return
        history = t.history
        timing = t.timing()
        images = t.global_step * t.cfg.data.batch_size * t.dist.world_size
        wall = timing["elapsed_s"] - timing["startup_s"] - timing["warmup_s"]
        self.summary = t.summary = {  # the trainer's: what `fit` returns
            "completed": t.completed,
            "final": history[-1],
            "best": max(history, key=lambda r: r["miou"] if r["miou"] is not None else -1.0),
            # when each val pixel accuracy was first seen: from the process start (what a user waits),
            # from the first step (wall), and on the training clock (what the budget counts)
            "time_to_pixel_acc_s": time_to_thresholds(history),
            "time_to_pixel_acc_from_first_step_s": time_to_thresholds(history, "wall_s"),
            "time_to_pixel_acc_train_clock_s": time_to_thresholds(history, "train_s"),
            "images_per_s": images / timing["train_s"] if timing["train_s"] > 0 else None,  # inside training steps
            "wall_images_per_s": images / wall if wall > 0 else None,  # from the first step, pauses included
            "images_trained": images,
            **timing,
            "time_zero": t.time_zero,  # what elapsed_s counts from: "process start" (or "start of train()")
            "compile_cache": t.compile_cache,
            "gpu_training": self.telemetry.training_summary(),
            "epochs": history[-1]["epoch"],
            "validations": len(history),
            "steps": t.global_step,
            "train_seconds": t.clock.seconds,
            "target_acc": t.cfg.train.target_acc,
            "target_reached_train_s": next((r["train_s"] for r in history if t.cfg.train.target_acc is not None
                                            and (r.get("pixel_acc") or 0) >= t.cfg.train.target_acc), None),
            "val_scored_at_px": t.data.val.spec.label_size,
            "device": device_name(t.rt.device),
            "precision": t.rt.precision,
            "compile": t.rt.compile,
            "loader": t.data.loader_kind,
            "cache": t.cfg.data.cache,
            "world_size": t.dist.world_size,
            "ddp": t.dist.enabled,
            "data": str(t.data.root),
            "run_dir": str(t.run.root),
            "versions": t.versions,
        }
        if t.dist.is_main:
            write_json(t.run.summary, self.summary, "run summary")
            try:
                plot_curves(history, t.run.curves)
                if not interrupted:  # it reads the val loader, whose workers the signal may have ended
                    self.write_samples()
                samples = self.telemetry.gpu.samples
                if samples:
                    plot_gpu_timeline(samples, t.run.root / "gpu_timeline.png")
            except Exception as e:  # noqa: BLE001 - interrupted: the resume hint must still come
                if not interrupted:
                    raise
                t.console.print(f"pictures not drawn: {e}", soft_wrap=True)

    def write_samples(self) -> None:
        t = self.trainer
        draw_samples(t, first_val_batch(t), t.run.samples)


def first_val_batch(t: Any, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` val images and targets. The global RNG is left as it was (a loader's iterator
    draws its seed from it): drawing pictures must not change what a resumed run would see."""
    with torch.random.fork_rng(devices=[]):
        image, target = next(iter(t.data.val))
    return image[:n], target[:n]


@torch.no_grad()
def predict_samples(t: Any, batch: tuple[torch.Tensor, torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(photos uint8 (N, H, W, 3), truths, predictions) of `batch`, predicted in eval mode at the scored size."""
    was_training = t.model.training
    t.model.eval()
    try:
        image, target = batch
        with torch.no_grad(), autocast(t.rt):
            logits = t.model(image).float()
        if logits.shape[-2:] != target.shape[-2:]:  # labels scored at their native size
            logits = torch.nn.functional.interpolate(logits, size=target.shape[-2:], mode="bilinear")
            image = torch.nn.functional.interpolate(image.float(), size=target.shape[-2:], mode="bilinear")
        return denormalize(image), target.cpu(), logits.argmax(1).cpu()
    finally:
        t.model.train(was_training)


def draw_samples(t: Any, batch: tuple[torch.Tensor, torch.Tensor], path: Any) -> None:
    """Photo / truth / prediction of `batch`, predicted in eval mode, scored size, to `path`."""
    plot_samples(*predict_samples(t, batch), t.data.palette, path)


class EMA(HookBase):
    """An exponential moving average of the weights (BatchNorm statistics included), updated after
    every step; validation scores it and checkpoints save it as `model`, the raw weights beside it
    as `train_model` for --resume."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self._averaged: torch.optim.swa_utils.AveragedModel | None = None

    @property
    def averaged(self) -> torch.optim.swa_utils.AveragedModel:
        if self._averaged is None:  # the model exists once the trainer does
            t = self.trainer
            self._averaged = torch.optim.swa_utils.AveragedModel(
                t.model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(self.decay), use_buffers=True)
            t.eval_model = self._averaged.module
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


class TargetAccuracy(HookBase):
    """Ends the run once val pixel accuracy reaches the target."""

    def __init__(self, target: float) -> None:
        self.target = target

    def after_epoch(self, record: dict[str, Any], metrics: SegMetrics) -> None:
        if (record.get("pixel_acc") or 0.0) >= self.target:
            self.trainer.stop_reason = (f"target pixel accuracy {self.target:g} reached after "
                                        f"{record['train_s']:.0f} s of training (epoch {record['epoch']})")


class TensorBoard(HookBase):
    """Event files in the run folder (rank 0): loss and lr on log steps (values the loop already read,
    no extra device sync), and per epoch val loss, pixel accuracy, mIoU, per-class IoU, images/s,
    data-wait share, GPU fields and the samples image. `tensorboard --logdir runs/`."""

    SCALARS = ("val_loss", "pixel_acc", "miou", "images_per_s", "data_wait_share", "loader_gpu_share", "gpu_util",
               "gpu_mem_gib", "gpu_power_w", "sm_activity")

    def events(self) -> Any:
        """Where the writer's errors surface (its thread writes; a full disk shows at the next call):
        one line naming the event files."""
        return writing(self.trainer.run.root / "events.out.tfevents.*", "TensorBoard event file")

    def before_train(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        t = self.trainer
        # purge_step: a resumed run rewrites what a killed session logged after its last checkpoint
        with self.events():
            self.writer = SummaryWriter(str(t.run.root), purge_step=t.global_step + 1 if t.global_step else None)

    def after_step(self) -> None:
        t = self.trainer
        if t.log_step:
            with self.events():
                self.writer.add_scalar("train/loss", t.loss_value, t.global_step)
                self.writer.add_scalar("train/lr", t.parts.optimizer.param_groups[0]["lr"], t.global_step)

    def after_epoch(self, record: dict[str, Any], metrics: SegMetrics) -> None:
        with self.events():
            self.write_epoch(record)

    def write_epoch(self, record: dict[str, Any]) -> None:
        t, step = self.trainer, record["step"]
        self.add_samples(step)
        self.writer.add_scalar("train/epoch_loss", record["loss"], step)
        for key in self.SCALARS:
            if record.get(key) is not None:
                self.writer.add_scalar(f"val/{key}" if key in ("val_loss", "pixel_acc", "miou") else f"perf/{key}",
                                       record[key], step)
        for name, iou in zip(t.data.palette.names, record["per_class_iou"], strict=True):
            if iou is not None:
                self.writer.add_scalar(f"val_iou/{name}", iou, step)
        self.writer.flush()

    def add_samples(self, step: int) -> None:
        """Photo | truth | prediction of a few val images at each validation, as one image tensor."""
        t = self.trainer
        if getattr(self, "batch", None) is None:  # the same images every epoch: one extra val read per run
            self.batch = first_val_batch(t)
        self.writer.add_image("samples", sample_grid(*predict_samples(t, self.batch), t.data.palette), step)

    def after_train(self) -> None:
        if getattr(self, "writer", None) is not None:  # None: creating it failed
            with self.events():
                self.writer.close()


class StepCallback(HookBase):
    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn

    def after_step(self) -> None:
        self.fn()


def default_hooks(cfg: TrainConfig, on_step: Callable[[], None] | None = None, is_main: bool = True
                  ) -> list[HookBase]:
    telemetry = Telemetry()
    hooks: list[HookBase] = [telemetry, Progress(telemetry)]
    if cfg.ema:
        hooks.append(EMA(cfg.ema))
    hooks.append(BestModel(cfg.patience))
    if cfg.target_acc is not None:
        hooks.append(TargetAccuracy(cfg.target_acc))
    hooks += [Checkpointer(), MetricsWriter(), Reporter(telemetry)]
    if cfg.tensorboard and is_main:
        hooks.append(TensorBoard())
    if on_step is not None:
        hooks.append(StepCallback(on_step))
    return hooks
