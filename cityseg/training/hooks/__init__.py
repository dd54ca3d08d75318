"""The side concerns of training, one hook a file (see cityseg/training/hook.py for what a hook may
do, loop.py for the order of events):

- `LRSchedule`  (lr_schedule.py) steps the learning-rate schedule after every step
- `Telemetry`   (telemetry.py) the NVML sampler; the GPU fields of the training steps in each record
- `Progress`    (progress.py) the per-epoch bar in a terminal, plain lines with ETA everywhere else
- `EMA`         (ema.py) an exponential moving average of the weights, validated and saved (--ema)
- `BestModel`   (best_model.py) best val mIoU -> best.pt (weights, no optimiser); early stop after
  `patience` validations
- `TargetAccuracy` (target_accuracy.py) ends the run at the first validation that reaches --target-acc
- `TopKCheckpoints` (top_k.py) the K best checkpoints by a val metric (--save-top-k, --top-k-monitor)
- `Checkpointer` (last_checkpoint.py) last.pt at every validation (the --val-every cadence)
- `MetricsWriter` (metrics_file.py) metrics.jsonl (after last.pt, so a kill in between is mended on
  resume) and the console report of each validation (per-class IoU table and one line)
- `Reporter`    (reporter.py) at the end: summary.json, curves.png, samples.png, gpu_timeline.png
- `TensorBoard` (tensorboard.py) event files in the run folder (rank 0)
- `StepCallback` (step_callback.py) calls a function after every step (torch.profiler's `step`)
Hooks run in list order; the order in `default_hooks` is the one these notes assume. A new hook is
one file here with its test, and a line in `default_hooks` if a setting turns it on.
"""

from __future__ import annotations

from collections.abc import Callable

from cityseg.config import TrainConfig
from cityseg.training.hook import HookBase
from cityseg.training.hooks.best_model import BestModel
from cityseg.training.hooks.ema import EMA
from cityseg.training.hooks.last_checkpoint import Checkpointer
from cityseg.training.hooks.lr_schedule import LRSchedule
from cityseg.training.hooks.metrics_file import MetricsWriter
from cityseg.training.hooks.progress import Progress
from cityseg.training.hooks.reporter import Reporter
from cityseg.training.hooks.samples import draw_samples, first_val_batch, predict_samples
from cityseg.training.hooks.step_callback import StepCallback
from cityseg.training.hooks.target_accuracy import TargetAccuracy
from cityseg.training.hooks.telemetry import Telemetry
from cityseg.training.hooks.tensorboard import TensorBoard
from cityseg.training.hooks.top_k import TopKCheckpoints

__all__ = ["EMA", "BestModel", "Checkpointer", "HookBase", "LRSchedule", "MetricsWriter", "Progress", "Reporter",
           "StepCallback", "TargetAccuracy", "Telemetry", "TensorBoard", "TopKCheckpoints", "default_hooks",
           "draw_samples", "first_val_batch", "predict_samples"]


def default_hooks(cfg: TrainConfig, on_step: Callable[[], None] | None = None, is_main: bool = True
                  ) -> list[HookBase]:
    telemetry = Telemetry()
    hooks: list[HookBase] = [LRSchedule(), telemetry, Progress(telemetry)]  # the schedule first: see lr_schedule.py
    if cfg.ema:
        hooks.append(EMA(cfg.ema))
    hooks.append(BestModel(cfg.patience))
    if cfg.target_acc is not None:
        hooks.append(TargetAccuracy(cfg.target_acc))
    if cfg.save_top_k:  # before last.pt, which then lists the K files
        hooks.append(TopKCheckpoints(cfg.save_top_k, cfg.top_k_monitor))
    hooks += [Checkpointer(), MetricsWriter(), Reporter(telemetry)]
    if cfg.tensorboard and is_main:
        hooks.append(TensorBoard())
    if on_step is not None:
        hooks.append(StepCallback(on_step))
    return hooks
