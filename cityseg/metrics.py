"""Segmentation metrics from a confusion matrix kept on the device.

`ConfusionMatrix.update` only queues device work; `compute` reads the matrix to the CPU once, so an
evaluation costs one GPU sync however many batches it has (torchvision references `utils.py`).
Rows are truth, columns prediction: cell [t, p] counts pixels of class t predicted as p, i.e.
`bincount(num_classes * target + pred, minlength=num_classes**2)` over non-ignored pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from rich.table import Table

from cityseg.distributed import DistInfo, sum_over_ranks
from cityseg.palette import IGNORE_INDEX
from cityseg.runtime import Runtime, autocast


@dataclass(frozen=True)
class SegMetrics:
    """Metrics of one evaluation, on the CPU as plain Python values."""

    pixel_acc: float  # correct / non-ignored pixels (nan if every pixel was ignored)
    miou: float  # mean IoU over classes present in truth or prediction (nan if none)
    per_class_iou: list[float]  # nan for classes absent from both truth and prediction
    present: list[bool]  # class appears in truth or prediction, i.e. counts towards mIoU
    confusion: list[list[int]]  # [truth][pred] pixel counts
    ignored_pixels: int = 0  # pixels labelled ignore_index, left out of everything above

    @property
    def num_classes(self) -> int:
        return len(self.per_class_iou)

    @property
    def truth_pixels(self) -> list[int]:
        """Pixels of each class in the ground truth (confusion row sums)."""
        return [sum(row) for row in self.confusion]

    def excluded_classes(self, class_names: Sequence[str]) -> list[str]:
        """Names of the classes absent from truth and prediction (left out of mIoU)."""
        _check_names(class_names, self.num_classes)
        return [name for name, p in zip(class_names, self.present, strict=True) if not p]

    def to_dict(self, with_confusion: bool = True) -> dict[str, Any]:
        """JSON-safe dict: nan becomes None (json.dumps would write the invalid token NaN)."""
        d: dict[str, Any] = {
            "pixel_acc": _nan_to_none(self.pixel_acc),
            "miou": _nan_to_none(self.miou),
            "per_class_iou": [_nan_to_none(v) for v in self.per_class_iou],
            "present": list(self.present),
            "ignored_pixels": self.ignored_pixels,
        }
        if with_confusion:
            d["confusion"] = [list(row) for row in self.confusion]
        return d


def _nan_to_none(v: float) -> float | None:
    return None if math.isnan(v) else v


def _check_names(class_names: Sequence[str], num_classes: int) -> None:
    if len(class_names) != num_classes:
        raise ValueError(f"got {len(class_names)} class names for {num_classes} classes")


class ConfusionMatrix:
    """(num_classes x num_classes) int64 pixel counts accumulated on `device` without host syncs.

    Why not `torch.bincount` on a masked tensor: on CUDA, boolean masking and bincount (which reads
    the input's min and max back to size its output) each stall the host once per batch. Instead
    every pixel gets a bin in a fixed-size buffer via `scatter_add_`: the n*n cells, then one bin
    for ignored pixels and one for invalid ids (a target that is neither in [0, n) nor
    ignore_index, or a prediction outside [0, n)). `compute` raises if the invalid bin is non-zero,
    so a bad mask fails loudly at the single sync instead of as a device-side assert or a silent
    skip.
    """

    def __init__(
        self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        n2 = num_classes * num_classes
        self._ignored_bin, self._invalid_bin = n2, n2 + 1
        self.counts = torch.zeros(n2 + 2, dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device:
        return self.counts.device

    @property
    def matrix(self) -> torch.Tensor:
        """The (truth, pred) count matrix, a view on the device (no sync)."""
        n = self.num_classes
        return self.counts[: n * n].view(n, n)

    def reset(self) -> None:
        self.counts.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch. `pred`: logits (B, C, H, W) (argmax over C) or class ids (B, H, W);
        `target`: class ids (B, H, W) with `ignore_index` for void pixels."""
        if pred.is_floating_point():
            if pred.dim() != target.dim() + 1 or pred.shape[1] != self.num_classes:
                raise ValueError(
                    f"logits must be (B, {self.num_classes}, H, W) for target {tuple(target.shape)}, "
                    f"got {tuple(pred.shape)}"
                )
            pred = pred.argmax(dim=1)
        if pred.shape != target.shape:
            raise ValueError(f"pred ids {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        n = self.num_classes
        pred = pred.to(self.device, torch.int64).flatten()
        target = target.to(self.device, torch.int64).flatten()
        ignored = target == self.ignore_index
        invalid = ~ignored & ((target < 0) | (target >= n) | (pred < 0) | (pred >= n))
        idx = n * target + pred  # (N,) cell of each pixel
        idx = torch.where(ignored, self._ignored_bin, torch.where(invalid, self._invalid_bin, idx))
        self.counts.scatter_add_(0, idx, torch.ones_like(idx))

    def merge(self, other: ConfusionMatrix) -> None:
        """Add another matrix's counts (e.g. from another evaluation shard)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes}-class counts into {self.num_classes}")
        self.counts += other.counts.to(self.device)

    def all_reduce(self) -> None:
        """Sum the counts over DDP ranks in place; a no-op outside torch.distributed."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.counts, op=dist.ReduceOp.SUM)

    def compute(self) -> SegMetrics:
        """Read the counts to the CPU (the one sync of an evaluation) and derive the metrics."""
        n = self.num_classes
        counts = self.counts.cpu()
        invalid = int(counts[self._invalid_bin])
        if invalid:
            raise ValueError(
                f"{invalid} pixels had a target outside [0, {n}) that is not "
                f"ignore_index={self.ignore_index}, or a predicted id outside [0, {n}): "
                "check the mask mapping and num_classes"
            )
        mat = counts[: n * n].view(n, n)
        m = mat.double()
        tp = m.diag()
        union = m.sum(1) + m.sum(0) - tp
        present = union > 0
        iou = torch.where(present, tp / union.clamp(min=1), torch.nan)
        total = m.sum()
        return SegMetrics(
            pixel_acc=(tp.sum() / total).item() if total > 0 else math.nan,
            miou=iou[present].mean().item() if present.any() else math.nan,
            per_class_iou=iou.tolist(),
            present=present.tolist(),
            confusion=mat.tolist(),
            ignored_pixels=int(counts[self._ignored_bin]),
        )


def iou_table(metrics: SegMetrics, class_names: Sequence[str], title: str = "Per-class IoU") -> Table:
    """A rich table: class, IoU %, share of truth pixels; mIoU and pixel accuracy last.

    Classes absent from truth and prediction show "—" and are counted in the caption, so a high
    mIoU on a val set missing hard classes is visibly not the mean over all classes.
    """
    _check_names(class_names, metrics.num_classes)
    truth = metrics.truth_pixels
    total = sum(truth)
    table = Table(title=title, min_width=len(title))  # the title on one line where the terminal allows
    table.add_column("class")
    table.add_column("IoU %", justify="right")
    table.add_column("truth px %", justify="right")
    for i, name in enumerate(class_names):
        iou = f"{100 * metrics.per_class_iou[i]:.1f}" if metrics.present[i] else "—"
        share = f"{100 * truth[i] / total:.1f}" if total else "—"
        table.add_row(name, iou, share, end_section=i == len(class_names) - 1)

    def pct(v: float) -> str:
        return "—" if math.isnan(v) else f"{100 * v:.1f}"

    table.add_row("mIoU", pct(metrics.miou), f"pixel acc {pct(metrics.pixel_acc)} %", style="bold")
    excluded = metrics.num_classes - sum(metrics.present)
    if excluded:
        classes = "class" if excluded == 1 else "classes"
        table.caption = f"{excluded} {classes} absent from truth and prediction: excluded from mIoU"
        table.min_width = max(table.min_width or 0, len(table.caption))
    return table


class LoaderFailed(Exception):
    """The loader stopped mid-way (e.g. its worker processes died of a signal sent to the whole
    process group): raised by `evaluate_model` with the loader's error as its cause, so a caller
    that knows a signal arrived can save and stop instead of failing."""


def _batches(loader) -> Iterator:
    """`loader`'s batches; an error from the loader itself (not from the model) is a LoaderFailed."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except Exception as e:
            raise LoaderFailed(f"the loader stopped: {type(e).__name__}: {e}") from e
        yield batch


def logits_at(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, C, h, w) logits resized to `size` (H, W), to be argmaxed there: bilinear (align_corners=False),
    antialiased where it shrinks. The one resize of validation, `eval` and `predict`, so that the three
    give the same ids for the same photo at any size (a photo smaller than the training size included)."""
    h, w = (int(s) for s in size)
    if tuple(logits.shape[-2:]) == (h, w):
        return logits
    shrinks = h < logits.shape[-2] or w < logits.shape[-1]
    return torch.nn.functional.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False,
                                           antialias=shrinks)


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, loader, runtime: Runtime, num_classes: int,
                   dist_info: DistInfo | None = None,
                   on_batch: Callable[[int], None] | None = None) -> tuple[SegMetrics, float]:
    """Pixel accuracy, mIoU and per-class IoU of `model` over `loader` (all ranks' shards together),
    and the mean cross-entropy: one confusion matrix on the device, read once. The loop of training's
    validation, `eval`, and the time-to-accuracy benchmark (torchvision references' `evaluate`).

    Targets of another size than the logits (scored at the labels' native size while the model runs at
    the training size) are met by resizing the logits (`logits_at`) before the argmax.
    `on_batch(batches done)` after each batch (a progress bar). A failing loader raises `LoaderFailed`."""
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index=IGNORE_INDEX, device=runtime.device)
    loss_sum = torch.zeros((), device=runtime.device)
    batches = 0
    try:
        for image, target in _batches(loader):
            with autocast(runtime):
                logits = model(image)
            logits = logits.float()
            logits = logits_at(logits, target.shape[-2:])
            loss_sum += torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
            cm.update(logits.argmax(1), target)
            batches += 1
            if on_batch is not None:
                on_batch(batches)
    except RuntimeError as e:
        # torch's SIGCHLD handler reports a dead worker wherever the main thread is, the model included.
        if "DataLoader worker" not in str(e):
            raise
        raise LoaderFailed(f"the loader stopped: {e}") from e
    cm.all_reduce()
    model.train(was_training)
    total, count = sum_over_ranks([loss_sum.item(), batches], dist_info or DistInfo(), runtime.device)
    return cm.compute(), total / max(1, count)
