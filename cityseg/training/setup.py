"""Everything a run is built from, as plain functions that return values: the runtime, the data
(folder, palette, validated files, loaders), the model (DDP), optimiser, schedule and loss.

    rt = training_runtime(cfg, dist_info)
    data = prepare_data(cfg, rt, dist_info, console)
    model, step_model = build_models(cfg.model, rt, dist_info, cfg.train.sync_bn)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from cityseg.checkpoint import CheckpointError
from cityseg.config import Config, ModelConfig, TrainConfig
from cityseg.data.contract import PairLoader
from cityseg.data.formats import Dataset, Source
from cityseg.data.loaders import (
    build_loader,
    palette_mismatch_check,
    resolve_dataset,
    resolve_loader_kind,
    resolve_palette,
    split_files,
)
from cityseg.data.pairs import MaskCheck, overlap_warning
from cityseg.distributed import DistInfo
from cityseg.encoders import OURS, resolve_weights
from cityseg.errors import UserError
from cityseg.model import EncoderUNet, build_model, model_parameters, model_training_bytes, size_problem
from cityseg.palette import IGNORE_INDEX, Palette, cityscapes_palette
from cityseg.progress import stage
from cityseg.runtime import Runtime, free_memory, resolve_device, resolve_runtime
from cityseg.training.losses import build_loss_fn
from cityseg.training.schedule import ProgressLR, TrainClock, planned_warmup, warmup_note
from cityseg.training.step import ModelWithLoss


class TrainingError(UserError):
    """A run that cannot go on; the message is one line for the user."""


def training_runtime(cfg: TrainConfig, dist_info: DistInfo) -> Runtime:
    """Device (each DDP rank its own GPU), precision and compilation of a run."""
    device = resolve_device(cfg.device)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    return resolve_runtime(device, cfg.precision, cfg.compile, cfg.compile_mode)


def check_training_fits(cfg: Config, rt: Runtime, dist_info: DistInfo) -> None:
    """Refuse, before allocating anything, an image size the model cannot take and a model and batch
    that cannot fit in the device's free memory (a lower-bound estimate: `model.model_training_bytes`)."""
    m, d = cfg.model, cfg.data
    problem = size_problem(m, d.image_size)
    if problem:
        raise TrainingError(f"--image-size {d.image_size}: {problem}")
    need = model_training_bytes(m, d.image_size, d.batch_size, rt.amp)
    if rt.device.type == "cpu":
        need *= dist_info.world_size  # CPU ranks share the machine's memory
    free = free_memory(rt.device)
    if need > free:
        params = model_parameters(m) / 1e6
        raise TrainingError(
            f"this run needs at least {need / 2**30:,.1f} GiB ({params:,.1f} M parameters, batch {d.batch_size} "
            f"at {d.image_size} px) but {free / 2**30:,.1f} GiB is free on {rt.device}: "
            "lower --batch-size, --image-size, --width or --depth"
        )


def starting_encoder_weights(cfg: ModelConfig) -> tuple[ModelConfig, Path | None]:
    """A new run's encoder weights: the checked file to start from (None: random, or our U-Net) and the
    model config recording where they came from (source, sha256, licence) for config.json and every
    checkpoint. `auto` is imagenet for a timm encoder."""
    if cfg.encoder == OURS:
        return cfg, None
    weights = "imagenet" if cfg.encoder_weights == "auto" else cfg.encoder_weights
    path, record = resolve_weights(cfg.encoder, weights)
    return replace(cfg, encoder_weights=record.source, encoder_sha256=record.sha256,
                   encoder_licence=record.licence), path


@dataclass
class RunData:
    """The data of a run; `close()` ends its loaders' workers."""

    root: Path
    palette: Palette
    train_files: Source  # the samples of each split, in the dataset's format
    val_files: Source
    loader_kind: str
    train: PairLoader | None = None
    val: PairLoader | None = None

    def close(self) -> None:
        for loader in (self.train, self.val):
            if loader is not None:
                loader.close()


def list_files(cfg: Config, dataset: Dataset, split: str, check: MaskCheck | None, palette: Palette,
               console: Console) -> Source:
    d = cfg.data
    what = f"file checks: {split}/ (every sample opened and checked)" if not d.skip_validate else f"listing {split}/"
    with stage(what):
        files, skipped = split_files(dataset, split, validate=not d.skip_validate, workers=d.threads,
                                     skip_bad=d.skip_bad, mask_check=check, palette=palette, id_map=d.id_map)
    if skipped:
        console.print(f"skipped {len(skipped)} bad {split} file(s), e.g. {skipped[0]}", style="yellow", soft_wrap=True)
    return files


def prepare_data(cfg: Config, rt: Runtime, dist_info: DistInfo, console: Console,
                 palette: Palette | None = None) -> RunData:
    """Dataset folder in its layout (or the cached synthetic set), palette (`palette` on resume) and
    validated samples; the loaders come after the batch is known (`open_loaders`)."""
    dataset = resolve_dataset(cfg.data)
    if dataset.note and dist_info.rank == 0:
        console.print(dataset.note, soft_wrap=True)
    root = dataset.root
    if palette is None:
        unchecked = dataset.source("train", cityscapes_palette(), cfg.data.id_map)
        palette = resolve_palette(cfg.data, unchecked, cfg.train.seed)
    # Learned (kmeans) palettes fit their data by construction; the fixed one may not.
    check = palette_mismatch_check(palette) if cfg.data.palette == "cityscapes" else None
    train_files = list_files(cfg, dataset, "train", check, palette, console)
    val_files = list_files(cfg, dataset, "val", check, palette, console)
    warning = overlap_warning(train_files, val_files)
    if warning:
        console.print(warning, style="yellow", soft_wrap=True)
    return RunData(root, palette, train_files, val_files, resolve_loader_kind(cfg.data, rt.device))


def open_loaders(data: RunData, cfg: Config, rt: Runtime, dist_info: DistInfo) -> None:
    """Both loaders of `data`, sharded for this rank. On an error, loaders already started are closed."""
    if data.palette.num_classes != cfg.model.num_classes:  # resolve_run sets it from the palette
        raise TrainingError(f"the palette has {data.palette.num_classes} classes, the model "
                            f"{cfg.model.num_classes}: leave model.num_classes to the palette")
    make = functools.partial(build_loader, data.loader_kind, palette=data.palette, cfg=cfg.data, device=rt.device,
                             dtype=rt.batch_dtype, seed=cfg.train.seed, shard_id=dist_info.rank,
                             num_shards=dist_info.world_size)
    try:
        data.train = make(data.train_files, train=True)
        data.val = make(data.val_files, train=False)
        if len(data.train) == 0:
            raise TrainingError(f"{data.root}/train: {len(data.train_files)} samples make no full batch of "
                                f"{cfg.data.batch_size} (on each of {dist_info.world_size} ranks): lower --batch-size")
    except BaseException:
        data.close()  # workers already started end before the error goes up
        raise


def build_models(cfg: ModelConfig, rt: Runtime, dist_info: DistInfo, sync_bn: bool,
                 encoder_weights: Path | None = None, encoder_bn: str = "train") -> tuple[nn.Module, nn.Module]:
    """(model, step_model): the plain module (checkpoints, validation) on the device in channels-last,
    and the module a training step runs (across ranks with SyncBatchNorm if asked; `for_ranks` then
    wraps it in DDP together with the loss). The step compiles it with the loss, so not here.
    `encoder_weights`: the checked file a timm encoder starts from (`starting_encoder_weights`);
    `encoder_bn` frozen: its BatchNorms keep their pretrained statistics (`EncoderUNet.freeze_encoder_bn`)."""
    model = build_model(cfg, encoder_weights).to(rt.device, memory_format=torch.channels_last)
    if encoder_bn == "frozen" and isinstance(model, EncoderUNet):
        model.freeze_encoder_bn()
    step_model: nn.Module = model
    if dist_info.enabled and sync_bn:
        if rt.device.type != "cuda":
            raise TrainingError("--sync-bn needs CUDA devices (SyncBatchNorm has no CPU kernel)")
        step_model = nn.SyncBatchNorm.convert_sync_batchnorm(step_model)
    return model, step_model


def for_ranks(step_model: nn.Module, loss_fn: nn.Module, rt: Runtime, dist_info: DistInfo) -> nn.Module:
    """Across ranks, DDP around model *and* loss (`ModelWithLoss`): compiled, DDP's own forward stays
    outside the graph while the model and loss inside it trace as one graph (split only at gradient
    bucket boundaries by dynamo's DDP optimizer), as on one device; a function calling a DDP model
    breaks the graph between model and loss. One process: `step_model` as it is."""
    if not dist_info.enabled:
        return step_model
    ids = [rt.device.index] if rt.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(ModelWithLoss(step_model, loss_fn, rt), device_ids=ids)


def init_weights_from(model: nn.Module, cfg: ModelConfig, path: Path, init: tuple[dict, ModelConfig],
                      console: Console) -> None:
    """Start from a checkpoint's weights (`--init-from`); a different class count re-initialises only
    the 1x1 head, and says so."""
    state, saved = init
    weights = state["model"]
    if saved.num_classes != cfg.num_classes:
        weights = {k: v for k, v in weights.items() if not k.startswith("head.")}
        console.print(f"--init-from {path}: {saved.num_classes} classes there, {cfg.num_classes} here: the head "
                      "is re-initialised, every other layer starts from the checkpoint", style="yellow", soft_wrap=True)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise CheckpointError(f"{path}: its weights do not fit this model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")


def parameter_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW's param groups: weight decay on conv/linear weights only (decaying BatchNorm and biases
    only hurts); for a timm encoder with its own learning rate (`encoder_lr`, a share of `lr`) or a
    freeze (`freeze_encoder` steps at lr 0, which ProgressLR applies), the encoder's and the decoder's
    parameters in groups of their own, marked `part` and `frozen_steps`. Otherwise the two groups
    of old, so that runs from before these settings resume."""
    split = isinstance(model, EncoderUNet) and (cfg.encoder_lr != 1 or cfg.freeze_encoder > 0)
    if split:
        decoder = [p for name, p in model.named_parameters() if not name.startswith("encoder.")]
        parts = [("encoder", list(model.encoder.parameters()), cfg.lr * cfg.encoder_lr, cfg.freeze_encoder),
                 ("decoder", decoder, cfg.lr, 0)]
    else:
        parts = [("all", list(model.parameters()), cfg.lr, 0)]
    groups = []
    for part, params, lr, frozen_steps in parts:
        for decay in (True, False):
            group = {"params": [p for p in params if (p.ndim > 1) == decay], "lr": lr,
                     "weight_decay": cfg.weight_decay if decay else 0.0}
            if split:
                group.update(part=part, frozen_steps=frozen_steps)
            groups.append(group)
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device, compiled: bool = False
                    ) -> torch.optim.Optimizer:
    """AdamW over `parameter_groups`: on CUDA the fused kernel (one launch for all parameters), or, for
    a step that compiles the optimiser too (`compiled`), the foreach form inductor compiles,
    capturable so that its step count lives on the device and CUDA graphs can hold it."""
    groups = parameter_groups(model, cfg)
    cuda = device.type == "cuda"
    if compiled:
        return torch.optim.AdamW(groups, lr=cfg.lr, foreach=cuda, capturable=cuda)
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=cuda)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int, clock: TrainClock
                    ) -> ProgressLR:
    """Warm-up + cosine (or one-cycle) planned over all epochs (not --max-steps, so stopping and
    resuming changes nothing), or over the time budget when there is one."""
    if cfg.time_budget_s is not None:
        return ProgressLR(optimizer, warmup=cfg.warmup_steps, min_ratio=cfg.min_lr_ratio, shape=cfg.schedule,
                          budget_s=cfg.time_budget_s, clock=clock)
    total = cfg.epochs * steps_per_epoch
    return ProgressLR(optimizer, warmup=planned_warmup(cfg.warmup_steps, total), min_ratio=cfg.min_lr_ratio,
                      shape=cfg.schedule, total_steps=total)


def schedule_note(cfg: TrainConfig, steps_per_epoch: int) -> str | None:
    """One line when the plan cannot leave the LR warm-up (`schedule.warmup_note`)."""
    total = None if cfg.time_budget_s is not None else cfg.epochs * steps_per_epoch
    return warmup_note(cfg.warmup_steps, total, cfg.max_steps)


def class_weights(kind: str, loader: PairLoader, num_classes: int, max_batches: int = 20) -> torch.Tensor | None:
    """`inverse-sqrt-freq`: weight_c = 1/sqrt(freq_c) from a sample of train batches, mean 1."""
    if kind == "none":
        return None
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for i, (_, target) in enumerate(loader):
        t = target[target != IGNORE_INDEX].cpu()
        counts += torch.bincount(t, minlength=num_classes)[:num_classes].double()
        if i + 1 >= max_batches:
            break
    freq = counts / counts.sum().clamp(min=1)
    w = torch.where(freq > 0, 1 / freq.clamp(min=1e-6).sqrt(), torch.zeros_like(freq))
    return (w / w[w > 0].mean()).float()


def build_loss(cfg: TrainConfig, train_loader: PairLoader, num_classes: int, device: torch.device) -> nn.Module:
    weights = class_weights(cfg.class_weights, train_loader, num_classes)
    return build_loss_fn(cfg.loss, None if weights is None else weights.to(device))


# The CPU recipe measured on 2 cores with real data (README "Expected results"): 128 px, width 16, batch 8.
CPU_RECIPE = {"image_size": 128, "width": 16, "batch_size": 8}


def cpu_advice(cfg: Config, rt: Runtime, steps_per_epoch: int, step_s: float) -> str | None:
    """What a CPU run on real data at the GPU sizes should be told before it trains: its expected time
    (the warm-up step's pace) and the flags of the measured CPU recipe; None when it does not apply."""
    d, m = cfg.data, cfg.model
    if rt.device.type != "cpu" or d.data_dir is None or (d.image_size <= 128 and m.width <= 16):
        return None
    from cityseg.progress import format_eta

    epochs = cfg.train.epochs
    budget = cfg.train.time_budget_s
    epoch_s = steps_per_epoch * step_s
    whole = f"{format_eta(epoch_s * epochs)} for {epochs} epochs" if budget is None else \
        f"the --time-budget of {format_eta(budget)}"
    return (f"a CPU at {d.image_size} px, width {m.width}, batch {d.batch_size}: about {format_eta(epoch_s)} "
            f"an epoch ({steps_per_epoch} steps at the warm-up's {step_s:.1f} s a step), {whole}. "
            "On CPUs the measured recipe is --image-size 128 --width 16 --batch-size 8 (with --time-budget 20m: "
            "0.87 val pixel accuracy, 0.37 mIoU on 2 cores; README \"Expected results\")")
