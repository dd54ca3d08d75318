"""Training and evaluation loops: AMP, channels-last, torch.compile, warm-up + cosine LR, atomic
checkpoints, exact resume, Ctrl-C/SIGTERM handling, early stopping and the run folder.

    cityseg-fast train --epochs 10          # the CLI fills a Config and calls `train(cfg)`
"""

from __future__ import annotations

import functools
import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, nullcontext
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from cityseg.checkpoint import CheckpointError, config_mismatch, read_training_checkpoint, save_checkpoint
from cityseg.config import Config, TrainConfig
from cityseg.data.loaders import (
    Shard,
    build_loader,
    palette_mismatch_check,
    resolve_data_dir,
    resolve_loader_kind,
    resolve_palette,
    split_files,
)
from cityseg.data.pairs import MaskCheck, list_split, overlap_warning
from cityseg.distributed import (
    DistInfo,
    any_rank,
    broadcast_buffers,
    broadcast_object,
    cleanup,
    init_distributed,
    sum_over_ranks,
    weights_agree,
)
from cityseg.errors import UserError
from cityseg.metrics import ConfusionMatrix, SegMetrics, iou_table
from cityseg.model import build_model, describe, parameter_count, training_bytes
from cityseg.outputs import claim_run_folder, is_free, write_text_quietly
from cityseg.palette import IGNORE_INDEX, Palette
from cityseg.palette_kmeans import save_palette
from cityseg.progress import StepProgress
from cityseg.report import (
    RunFolder,
    append_jsonl,
    device_name,
    plot_curves,
    plot_samples,
    time_to_thresholds,
    versions,
    write_json,
    write_jsonl,
)
from cityseg.runtime import Runtime, autocast, free_memory, resolve_device, resolve_runtime
from cityseg.telemetry import EpochMeter, GpuSampler, fmt, plot_gpu_timeline

EXIT_INTERRUPTED = 130


class TrainingError(UserError):
    """A run that cannot go on; the message is one line for the user."""


class Interrupted(Exception):
    """Ctrl-C / SIGTERM: the step finished, last.pt is saved."""

    def __init__(self, run_dir: Path, signum: int) -> None:
        self.run_dir, self.signum = run_dir, signum
        super().__init__(f"interrupted; resume with: cityseg-fast train --resume {run_dir}")


def check_training_fits(cfg: Config, rt: Runtime, dist_info: DistInfo) -> None:
    """Refuse, before allocating anything, a model and batch that cannot fit in the device's free
    memory (a lower-bound estimate: `model.training_bytes`)."""
    m, d = cfg.model, cfg.data
    need = training_bytes(m.width, m.depth, d.image_size, d.batch_size, rt.amp, m.upsample)
    if rt.device.type == "cpu":
        need *= dist_info.world_size  # CPU ranks share the machine's memory
    free = free_memory(rt.device)
    if need > free:
        params = parameter_count(m.width, m.depth, m.upsample) / 1e6
        raise TrainingError(
            f"this run needs at least {need / 2**30:,.1f} GiB ({params:,.1f} M parameters, batch {d.batch_size} "
            f"at {d.image_size} px) but {free / 2**30:,.1f} GiB is free on {rt.device}: "
            "lower --batch-size, --image-size, --width or --depth"
        )


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up over `warmup` steps, then cosine decay to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    # No weight decay on BatchNorm and biases (1-d params): decaying them only hurts.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type == "cuda")


@contextmanager
def graceful_interrupts() -> Iterator[dict[str, int | None]]:
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step, so the step in flight
    finishes and last.pt is saved instead of dying mid-update."""
    flag: dict[str, int | None] = {"signum": None}

    def handler(signum, frame):  # noqa: ARG001
        if flag["signum"] is not None:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        flag["signum"] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, runtime: Runtime, num_classes: int, dist_info: DistInfo | None = None
) -> tuple[SegMetrics, float]:
    """Confusion matrix over the loader, read from the device once. Returns (metrics, mean loss)."""
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index=IGNORE_INDEX, device=runtime.device)
    loss_sum = torch.zeros((), device=runtime.device)
    batches = 0
    for image, target in loader:
        with autocast(runtime):
            logits = model(image)
        loss_sum += nn.functional.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX)
        cm.update(logits.argmax(1), target)
        batches += 1
    cm.all_reduce()
    model.train(was_training)
    total, count = sum_over_ranks([loss_sum.item(), batches], dist_info or DistInfo(), runtime.device)
    return cm.compute(), total / max(1, count)


class Trainer:
    """Holds one run's state; `fit()` runs it. Built by `train(cfg)`."""

    def __init__(
        self, cfg: Config, console: Console, run: RunFolder, resume_state: dict | None, dist_info: DistInfo
    ) -> None:
        self.cfg, self.console, self.run, self.dist = cfg, console, run, dist_info
        t = cfg.train
        device = resolve_device(t.device)
        if dist_info.enabled and device.type == "cuda":
            device = torch.device("cuda", dist_info.local_rank)
        self.rt = resolve_runtime(device, t.precision, t.compile, t.compile_mode)
        check_training_fits(cfg, self.rt, dist_info)
        torch.backends.cudnn.benchmark = True  # fixed-size batches: pick the fastest conv algorithms once
        torch.manual_seed(cfg.train.seed)
        self.data_root = resolve_data_dir(cfg.data)
        self.palette = (
            Palette.from_state(resume_state["palette"]) if resume_state else
            resolve_palette(cfg.data, list_split(self.data_root, "train"), cfg.train.seed)
        )
        # Learned (kmeans) palettes fit their data by construction; the fixed one may not.
        check = palette_mismatch_check(self.palette) if cfg.data.palette == "cityscapes" else None
        self.train_files = self.files("train", check)
        self.val_files = self.files("val", check)
        warning = overlap_warning(self.train_files, self.val_files)
        if warning:
            console.print(warning, style="yellow", soft_wrap=True)
        self.loader_kind = resolve_loader_kind(cfg.data.loader, self.rt.device)
        dtype = self.rt.batch_dtype
        make = lambda files, train: build_loader(  # noqa: E731
            self.loader_kind, files, self.palette, cfg.data, train=train,
            device=self.rt.device, dtype=dtype, seed=cfg.train.seed,
            shard=Shard(dist_info.rank, dist_info.world_size),
        )
        self.train_loader = self.val_loader = None
        try:
            self.train_loader = make(self.train_files, True)
            self.val_loader = make(self.val_files, False)
            if len(self.train_loader) == 0:
                raise TrainingError(
                    f"{self.data_root}/train: {len(self.train_files)} pairs make no full batch of "
                    f"{cfg.data.batch_size}: lower --batch-size"
                )
            self.build_training(cfg, resume_state)
        except BaseException:
            self.close()  # the loaders' workers are started: end them before the error goes up
            raise

    def build_training(self, cfg: Config, resume_state: dict | None) -> None:
        # The palette decides the class count (19 for Cityscapes, K for kmeans:K).
        self.cfg = cfg = replace(cfg, model=replace(cfg.model, num_classes=self.palette.num_classes))
        self.model = build_model(cfg.model).to(self.rt.device, memory_format=torch.channels_last)
        wrapped = self.wrap_ddp(self.model)
        self.step_model = torch.compile(wrapped, mode=self.rt.compile_mode) if self.rt.compile else wrapped
        self.optimizer = build_optimizer(self.model, cfg.train, self.rt.device)
        self.scaler = torch.amp.GradScaler(self.rt.device.type, enabled=self.rt.needs_grad_scaler)
        # Planned over all epochs (not max_steps), so stopping early and resuming changes nothing.
        self.total_steps = cfg.train.epochs * len(self.train_loader)
        t = cfg.train
        warmup = min(t.warmup_steps, max(1, self.total_steps // 5))
        # A partial of plain values: a lambda reading `self` would put the Trainer in a reference
        # cycle (trainer -> scheduler -> lambda -> trainer) that outlives the run.
        schedule = functools.partial(warmup_cosine, warmup=warmup, total=self.total_steps, min_ratio=t.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        weights = class_weights(cfg.train.class_weights, self.train_loader, self.palette.num_classes)
        self.loss_fn = nn.CrossEntropyLoss(
            weight=None if weights is None else weights.to(self.rt.device), ignore_index=IGNORE_INDEX
        )
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_miou, self.epochs_since_best = -1.0, 0
        self.history: list[dict[str, Any]] = []
        self.elapsed_before = 0.0  # run time of earlier sessions of a resumed run
        self.partial = {"loss_sum": 0.0, "steps": 0}
        self.on_step: Callable[[], None] | None = None  # e.g. torch.profiler's step()
        if resume_state:
            self.load_state(resume_state)

    def close(self) -> None:
        """End the loaders' worker processes and threads (idempotent)."""
        for loader in (self.train_loader, self.val_loader):
            if loader is not None:
                loader.close()

    def wrap_ddp(self, model: nn.Module) -> nn.Module:
        """DDP averages gradients across ranks; `self.model` stays the plain module for checkpoints."""
        if not self.dist.enabled:
            return model
        if self.cfg.train.sync_bn:
            if self.rt.device.type != "cuda":
                raise TrainingError("--sync-bn needs CUDA devices (SyncBatchNorm has no CPU kernel)")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def files(self, split: str, mask_check: MaskCheck | None) -> list[Path]:
        d = self.cfg.data
        files, skipped = split_files(self.data_root, split, validate=not d.skip_validate, workers=d.workers,
                                     skip_bad=d.skip_bad, mask_check=mask_check)
        if skipped:
            self.console.print(f"skipped {len(skipped)} bad {split} file(s), e.g. {skipped[0]}", style="yellow",
                               soft_wrap=True)
        return files

    # -- checkpoints -------------------------------------------------------------------------------
    def state(self, elapsed: float) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best_miou": self.best_miou,
            "epochs_since_best": self.epochs_since_best,
            "history": self.history,
            "elapsed_s": elapsed,
            "partial": self.partial,
            "rng": {"torch": torch.get_rng_state()},
            "config": self.cfg.to_dict(),
            "palette": self.palette.to_state(),
            "versions": versions(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):  # absent in checkpoints written before 16-mixed existed
            self.scaler.load_state_dict(state["scaler"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step = state["global_step"]
        self.best_miou, self.epochs_since_best = state["best_miou"], state["epochs_since_best"]
        self.history = list(state["history"])
        self.elapsed_before = state["elapsed_s"]
        self.partial = dict(state["partial"])
        torch.set_rng_state(state["rng"]["torch"])

    # -- loops -------------------------------------------------------------------------------------
    def fit(self, interrupt: dict[str, int | None]) -> dict[str, Any]:
        cfg, console = self.cfg, self.console
        self.gpu = GpuSampler(self.rt.device).start()
        self.t0 = time.perf_counter()
        try:
            while self.epoch < cfg.train.epochs and not self.out_of_steps():
                try:
                    record = self.train_epoch(interrupt)
                except torch.OutOfMemoryError:
                    raise self.out_of_memory() from None
                if record is None:  # interrupted mid-epoch: last.pt holds the position
                    raise Interrupted(self.run.root, interrupt["signum"] or signal.SIGINT)
                broadcast_buffers(self.model, self.dist)
                metrics, val_loss = evaluate(self.model, self.val_loader, self.rt, self.palette.num_classes, self.dist)
                record.update(metrics.to_dict(), val_loss=val_loss, elapsed_s=self.elapsed())
                record.pop("confusion", None)
                self.end_epoch(record, metrics)
                if self.stop_requested(interrupt):  # arrived during the last step or validation
                    raise Interrupted(self.run.root, interrupt["signum"] or signal.SIGINT)
                if cfg.train.patience and self.epochs_since_best >= cfg.train.patience:
                    console.print(f"early stop: no better val mIoU for {cfg.train.patience} epochs")
                    break
        finally:
            self.gpu.stop()
        if not weights_agree(self.model, self.dist, self.rt.device):
            raise TrainingError("DDP ranks ended with different weights: a rank diverged (please report this)")
        return self.finish()

    def stop_requested(self, interrupt: dict[str, int | None]) -> bool:
        """Ctrl-C/SIGTERM seen by any rank; every rank must call this at the same step."""
        return any_rank(interrupt["signum"] is not None, self.dist, self.rt.device)

    def out_of_steps(self) -> bool:
        return bool(self.cfg.train.max_steps) and self.global_step >= self.cfg.train.max_steps

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0

    def train_epoch(self, interrupt: dict[str, int | None]) -> dict[str, Any] | None:
        cfg, rt = self.cfg.train, self.rt
        self.model.train()
        self.train_loader.set_epoch(self.epoch, self.step_in_epoch)
        meter = EpochMeter(rt.device)
        gpu_mark = self.gpu.mark()
        loss_sum = torch.zeros((), device=rt.device)
        nonfinite = torch.zeros((), dtype=torch.bool, device=rt.device)
        n_batches = len(self.train_loader)
        stopping = False
        loss_text = ""
        with StepProgress(self.console, f"epoch {self.epoch + 1}/{cfg.epochs}", n_batches, self.step_in_epoch) as bar:
            batches = iter(self.train_loader)
            batch = self.next_batch(batches, meter, interrupt)
            while batch is not None:
                image, target = batch
                with autocast(rt):
                    logits = self.step_model(image)
                    loss = self.loss_fn(logits, target)
                batch = self.next_batch(batches, meter, interrupt)  # fetch while the forward runs on the GPU
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()  # scaling only under 16-mixed; a no-op otherwise
                if cfg.grad_clip > 0:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step()
                loss = loss.detach()
                loss_sum += loss
                nonfinite |= ~torch.isfinite(loss)
                self.step_in_epoch += 1
                self.global_step += 1
                meter.step_done(image.shape[0])
                if self.on_step is not None:
                    self.on_step()
                log_now = self.global_step % cfg.log_every == 0 or batch is None
                if log_now:
                    self.check_finite(nonfinite)
                    loss_text = f"loss {loss.item():.3f}  "
                bar.step(self.step_in_epoch, loss_text + self.live_line(meter), log=log_now)
                # Ranks agree on stopping only at log steps (a sync); alone, every step is free.
                if (log_now or not self.dist.enabled) and self.stop_requested(interrupt):
                    stopping = True
                    break
                if self.out_of_steps():
                    break
        self.check_finite(nonfinite)
        self.partial["loss_sum"] += sum_over_ranks([loss_sum.item()], self.dist, rt.device)[0] / self.dist.world_size
        self.partial["steps"] = self.step_in_epoch
        finished = self.step_in_epoch == n_batches
        if stopping and not finished:
            self.save(self.run.last)
            return None
        stats = meter.summary()
        # Throughput adds up over ranks; the data-wait share is their mean.
        ips, wait = sum_over_ranks([stats["images_per_s"], stats["data_wait_share"]], self.dist, rt.device)
        stats.update(images_per_s=ips, data_wait_share=wait / self.dist.world_size)
        record = {
            "epoch": self.epoch + 1,
            "partial": not finished,  # stopped by --max-steps: last.pt resumes inside this epoch
            "step": self.global_step,
            "loss": self.partial["loss_sum"] / max(1, self.partial["steps"]),
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_s": stats["images_per_s"],
            "data_wait_share": stats["data_wait_share"],
            "seconds": stats["seconds"],
            "timed_images": stats["timed_images"],
            "timed_seconds": stats["timed_seconds"],
            **self.gpu.summary(since=gpu_mark),
        }
        if finished:
            self.epoch += 1
            self.step_in_epoch = 0
            self.partial = {"loss_sum": 0.0, "steps": 0}
        return record

    def next_batch(self, batches: Iterator, meter: EpochMeter, interrupt: dict[str, int | None]):
        t = time.perf_counter()
        try:
            batch = next(batches, None)
        except Exception:
            if interrupt["signum"] is None:
                raise
            # A SIGTERM sent to the whole process group (Slurm, systemd) also ended the loader's
            # workers: the step in flight still finishes and last.pt is saved.
            batch = None
        meter.waited(time.perf_counter() - t)
        return batch

    def check_finite(self, nonfinite: torch.Tensor) -> None:
        if any_rank(bool(nonfinite.item()), self.dist, self.rt.device):
            raise TrainingError(
                f"loss became NaN/inf at epoch {self.epoch + 1}, step {self.global_step}; "
                f"the last good checkpoint is {self.run.last} (try a lower --lr or --no-amp)"
            )

    def live_line(self, meter: EpochMeter) -> str:
        seconds = time.perf_counter() - meter.start
        ips = meter.images / seconds if seconds > 0 else 0.0
        wait = meter.data_wait / seconds if seconds > 0 else 0.0
        return f"{ips:.1f} img/s  wait {wait:.0%}  gpu {fmt(self.gpu.latest_util(), '.0f', '%')}"

    def end_epoch(self, record: dict[str, Any], metrics: SegMetrics) -> None:
        self.history.append(record)
        self.console.print(iou_table(metrics, self.palette.names, title=f"val after epoch {record['epoch']}"))
        self.console.print(
            f"epoch {record['epoch']}: loss {record['loss']:.4f}  val pixel acc {record['pixel_acc']:.4f}  "
            f"mIoU {fmt(record['miou'], '.4f')}  {record['images_per_s']:.1f} img/s  "
            f"data wait {record['data_wait_share']:.0%}", soft_wrap=True
        )
        improved = record["miou"] is not None and record["miou"] > self.best_miou
        if improved:
            self.best_miou, self.epochs_since_best = record["miou"], 0
        else:
            self.epochs_since_best += 1
        self.save(self.run.last)
        if improved:
            self.save(self.run.best)
        # After last.pt, whose history holds this record: a kill in between is mended on resume,
        # which rewrites metrics.jsonl from that history (each epoch once).
        if self.dist.is_main:
            append_jsonl(self.run.metrics, record)

    def out_of_memory(self) -> TrainingError:
        """Save the position (the failed step changed no weights) and suggest a smaller batch."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.rt.device.type == "cuda":
            torch.cuda.empty_cache()
        self.save(self.run.last)
        bs = self.cfg.data.batch_size
        return TrainingError(
            f"out of {self.rt.device.type} memory at batch size {bs}: try --batch-size {max(1, bs // 2)} "
            f"(or a smaller --image-size / --width); continue with --resume {self.run.root}"
        )

    def save(self, path: Path) -> None:
        if not self.dist.is_main:  # every rank holds the same weights; one writer
            return
        try:
            save_checkpoint(self.state(self.elapsed()), path)
        except OSError as e:
            raise TrainingError(
                f"{path}: could not write checkpoint ({e.strerror or e}); the previous checkpoint is kept"
            ) from None

    def finish(self) -> dict[str, Any]:
        run, history = self.run, self.history
        if not history:
            raise TrainingError("no epoch finished: nothing to report")
        timed_images = sum(r["timed_images"] for r in history)
        timed_seconds = sum(r["timed_seconds"] for r in history)
        best = max(history, key=lambda r: r["miou"] if r["miou"] is not None else -1.0)
        summary = {
            "final": history[-1],
            "best": best,
            "time_to_pixel_acc_s": time_to_thresholds(history),
            "images_per_s": timed_images / timed_seconds if timed_seconds > 0 else None,
            "epochs": len(history),
            "steps": self.global_step,
            "elapsed_s": self.elapsed(),
            "device": device_name(self.rt.device),
            "precision": self.rt.precision,
            "compile": self.rt.compile,
            "loader": self.loader_kind,
            "cache": self.cfg.data.cache,
            "world_size": self.dist.world_size,
            "data": str(self.data_root),
            "run_dir": str(self.run.root),
            "versions": versions(),
        }
        if self.dist.is_main:
            write_json(run.summary, summary)
            plot_curves(history, run.curves)
            self.write_samples()
            if self.gpu.samples:
                plot_gpu_timeline(self.gpu.samples, run.root / "gpu_timeline.png")
        return summary

    @torch.no_grad()
    def write_samples(self, n: int = 4) -> None:
        self.model.eval()
        image, target = next(iter(self.val_loader))
        image, target = image[:n], target[:n]
        with autocast(self.rt):
            pred = self.model(image).argmax(1)
        plot_samples(denormalize(image), target.cpu(), pred.cpu(), self.palette, self.run.samples)


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Normalised (N, 3, H, W) -> (N, H, W, 3) uint8 for display."""
    from cityseg.data.torch_loader import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = image.float().cpu() * std + mean
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def class_weights(kind: str, loader, num_classes: int, max_batches: int = 20) -> torch.Tensor | None:
    """`inverse-sqrt-freq`: weight_c = 1/sqrt(freq_c) from a sample of train batches, mean 1."""
    if kind == "none":
        return None
    if kind != "inverse-sqrt-freq":
        raise TrainingError(f"--class-weights {kind}: expected none or inverse-sqrt-freq")
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for i, (_, target) in enumerate(loader):
        t = target[target != IGNORE_INDEX].cpu()
        counts += torch.bincount(t, minlength=num_classes)[:num_classes].double()
        if i + 1 >= max_batches:
            break
    freq = counts / counts.sum().clamp(min=1)
    w = torch.where(freq > 0, 1 / freq.clamp(min=1e-6).sqrt(), torch.zeros_like(freq))
    return (w / w[w > 0].mean()).float()


def default_run_dir() -> Path:
    """runs/<date-time>, with -2, -3, ... when runs start within the same second."""
    base = Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate, n = base, 1
    while not is_free(candidate):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate.absolute()


def train(cfg: Config, console: Console | None = None, on_step: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run (or resume) training as configured; returns summary.json's content. Under torchrun, every
    rank calls this; rank 0 alone prints and writes.

    Raises TrainingError / PairError / CheckpointError with one-line messages, and Interrupted
    after saving last.pt on Ctrl-C/SIGTERM.
    """
    dist_info = init_distributed(resolve_device(cfg.train.device).type)
    # Markup off: paths and file names are printed as given, a `[tag]` in one included.
    console = (console or Console(markup=False, highlight=False)) if dist_info.is_main else Console(quiet=True)
    try:
        return _train(cfg, console, dist_info, on_step)
    finally:
        cleanup(dist_info)


def _train(cfg: Config, console: Console, dist_info: DistInfo, on_step: Callable[[], None] | None) -> dict[str, Any]:
    # The default name holds a timestamp: take rank 0's so every rank writes to one folder.
    root = Path(cfg.train.resume or broadcast_object(cfg.train.out or str(default_run_dir()), dist_info))
    # Rank 0 holds the folder for the run's life: a second run or resume there is refused.
    claim = claim_run_folder(root, resume=bool(cfg.train.resume)) if dist_info.is_main else nullcontext()
    with claim:
        run = RunFolder(root)
        try:
            resume_state = resume_from(run, cfg, console, dist_info) if cfg.train.resume else None
            return _run_trainer(cfg, console, run, resume_state, dist_info, on_step)
        except UserError as e:
            if dist_info.is_main:  # the run folder says why the run ended (alone, if it ended before training)
                write_text_quietly(run.root / "error.log", f"{e}\n")
            raise


def resume_from(run: RunFolder, cfg: Config, console: Console, dist_info: DistInfo) -> dict[str, Any]:
    state = read_training_checkpoint(run.last)
    saved = state["config"]["model"]
    wanted = {k: v for k, v in cfg.to_dict()["model"].items() if k != "num_classes"}  # set by the palette
    diffs = config_mismatch({k: saved.get(k) for k in wanted}, wanted)
    if diffs:
        raise CheckpointError(f"{run.last}: model config differs from this run's: {'; '.join(diffs)}")
    console.print(f"resuming {run.root} at epoch {state['epoch'] + 1}, "
                  f"step {state['step_in_epoch']} of that epoch")
    if dist_info.is_main:  # the records last.pt knows of, each once (see Trainer.end_epoch)
        write_jsonl(run.metrics, state["history"])
    return state


def _run_trainer(cfg: Config, console: Console, run: RunFolder, resume_state: dict | None, dist_info: DistInfo,
                 on_step: Callable[[], None] | None) -> dict[str, Any]:
    trainer = Trainer(cfg, console, run, resume_state, dist_info)
    trainer.on_step = on_step
    with closing(trainer):  # its loaders' workers end on every way out: done, error or signal
        console.print(describe(trainer.model))
        console.print(
            f"device {device_name(trainer.rt.device)}  precision {trainer.rt.precision}  compile {trainer.rt.compile}  "
            f"loader {trainer.loader_kind}  cache {cfg.data.cache}  ranks {dist_info.world_size}  "
            f"data {trainer.data_root} ({len(trainer.train_files)} train / {len(trainer.val_files)} val)",
            soft_wrap=True,
        )
        with graceful_interrupts() as interrupt:
            if dist_info.is_main:
                run.create()
                save_palette(trainer.palette, run.root / "palette.json")  # `--palette RUN/palette.json` reuses it
                write_json(run.config, trainer.cfg.to_dict())  # written once Ctrl-C is handled: tests wait on it
            return trainer.fit(interrupt)
