"""The run folder: config.json, metrics.jsonl, summary.json, curves.png, samples.png."""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: CI and servers have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from cityseg.outputs import atomic_file, atomic_write, writing  # noqa: E402
from cityseg.palette import Palette, colorize  # noqa: E402

ACC_THRESHOLDS = (0.80, 0.85, 0.90, 0.94)


def json_safe(value: Any) -> Any:
    """NaN/inf -> None and tensors -> lists, so the JSON is strict and loads anywhere."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return json_safe(value.tolist())
    return value


def write_json(path: Path, data: Any, what: str = "JSON file") -> None:
    """Replace `path` atomically; a failure (a full disk) is one line naming it."""
    atomic_write(path, json.dumps(json_safe(data), indent=2) + "\n", what)


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace `path` with one JSON line per record, atomically."""
    atomic_write(path, "".join(json.dumps(json_safe(r)) + "\n" for r in records), "metrics file")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with writing(path, "metrics file"), open(path, "a") as f:
        f.write(json.dumps(json_safe(record)) + "\n")
        f.flush()


def save_figure(fig: Any, path: Path, what: str) -> None:
    """Write a matplotlib figure as PNG atomically and close it; a failure is one line naming `path`."""
    try:
        with writing(path, what), atomic_file(path) as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)


def versions() -> dict[str, str | None]:
    # str(): torch.__version__ is a TorchVersion, which weights-only checkpoint loading rejects.
    found: dict[str, str | None] = {"python": platform.python_version(), "torch": str(torch.__version__)}
    for name, module in (("torchvision", "torchvision"), ("dali", "nvidia.dali"), ("triton", "triton")):
        try:
            found[name] = str(__import__(module, fromlist=["__version__"]).__version__)
        except ImportError:
            found[name] = None
    return found


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_model()}, {os.cpu_count()} cores)"


def time_to_thresholds(history: list[dict[str, Any]], key: str = "elapsed_s") -> dict[str, float | None]:
    """Seconds (the records' `key`: run time by default) until val pixel accuracy first reached each
    threshold (None = never)."""
    reached: dict[str, float | None] = {f"{t:.2f}": None for t in ACC_THRESHOLDS}
    for record in history:
        for t in ACC_THRESHOLDS:
            name = f"{t:.2f}"
            if reached[name] is None and (record.get("pixel_acc") or 0.0) >= t:
                reached[name] = record.get(key)
    return reached


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [r["loss"] for r in history], marker="o", label="train loss")
    if any(r.get("val_loss") is not None for r in history):
        axes[0].plot(epochs, [r.get("val_loss") for r in history], marker="o", label="val loss")
    axes[0].set_title("loss")
    axes[0].legend()
    axes[1].plot(epochs, [r["pixel_acc"] for r in history], marker="o", color="tab:green")
    axes[1].set_title("val pixel accuracy")
    axes[2].plot(epochs, [r["miou"] for r in history], marker="o", color="tab:red")
    axes[2].set_title("val mIoU")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no tick at 1.5
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, "training curves")


def plot_gpu_timeline(samples: list[tuple], path: Path) -> None:
    """GPU utilisation (and SM activity where measured) over time; says n/a without samples."""
    fig, ax = plt.subplots(figsize=(8, 3))
    if samples:
        t = [s[0] for s in samples]
        for column, label in ((1, "GPU utilisation %"), (4, "SM activity %")):
            if any(s[column] is not None for s in samples):  # None (unsupported) plots as a gap
                ax.plot(t, [float("nan") if s[column] is None else s[column] for s in samples], label=label)
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no GPU samples (n/a: no NVIDIA GPU / NVML)", ha="center", va="center")
    ax.set_xlabel("seconds")
    ax.set_ylim(0, 105)
    fig.tight_layout()
    save_figure(fig, path, "GPU timeline")


def plot_samples(
    photos: torch.Tensor, truths: torch.Tensor, preds: torch.Tensor, palette: Palette, path: Path
) -> None:
    """Rows of photo | truth | prediction. photos: (N, H, W, 3) uint8; truths/preds: (N, H, W) ids."""
    n = photos.shape[0]
    handles = legend_handles(torch.cat([truths.flatten(), preds.flatten()]), palette)
    columns = min(5, max(1, len(handles)))
    legend_inches = 0.2 * -(-len(handles) // columns) + 0.2 if handles else 0.0  # rows of the colour legend
    fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n + legend_inches), squeeze=False)
    for i in range(n):
        panels = (photos[i], colorize(truths[i], palette), colorize(preds[i], palette))
        for ax, img, title in zip(axes[i], panels, ("photo", "truth", "prediction"), strict=True):
            ax.imshow(img.numpy())
            ax.set_axis_off()
            if i == 0:
                ax.set_title(title)
    fig.tight_layout(rect=(0, legend_inches / (3 * n + legend_inches), 1, 1))
    if handles:  # which colour is which class: the classes present in truth or prediction
        fig.legend(handles=handles, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    save_figure(fig, path, "sample predictions")


def sample_grid(photos: torch.Tensor, truths: torch.Tensor, preds: torch.Tensor, palette: Palette) -> torch.Tensor:
    """plot_samples' rows as one (3, N * H, 3 * W) uint8 image, without a figure: what TensorBoard
    shows at every validation (drawing a matplotlib figure there cost ~0.2 s an epoch boundary)."""
    rows = [torch.cat([photos[i], colorize(truths[i], palette), colorize(preds[i], palette)], dim=1)
            for i in range(photos.shape[0])]  # each (H, 3W, 3)
    return torch.cat(rows, dim=0).permute(2, 0, 1).contiguous()


def legend_handles(class_ids: torch.Tensor, palette: Palette) -> list:
    """One colour patch per class present in `class_ids` (ignore drawn black), in class order."""
    from matplotlib.patches import Patch

    present = torch.unique(class_ids.to(torch.int64)).tolist()
    handles = [Patch(facecolor=(palette.colors[c].float() / 255).tolist(), edgecolor="grey", label=palette.names[c])
               for c in present if 0 <= c < palette.num_classes]
    if any(c >= palette.num_classes for c in present):
        handles.append(Patch(facecolor="black", edgecolor="grey", label="ignored"))
    return handles


class RunFolder:
    """Paths and writers of one run; only the writing rank creates it."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.config = self.root / "config.json"
        self.metrics = self.root / "metrics.jsonl"
        self.summary = self.root / "summary.json"
        self.curves = self.root / "curves.png"
        self.samples = self.root / "samples.png"
        self.last = self.checkpoints / "last.pt"
        self.best = self.checkpoints / "best.pt"

    def create(self) -> RunFolder:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        return self


def plot_confusion(confusion: Sequence[Sequence[int]] | torch.Tensor, names: Sequence[str], path: Path,
                   log: bool = False) -> None:
    """Heat map of the row-normalised confusion matrix (row = truth: each row sums to 1 = recall view).

    `log`: a log colour scale, which shows the small off-diagonal confusions next to a dominant class.
    """
    from matplotlib.colors import LogNorm

    m = torch.as_tensor(confusion, dtype=torch.float64)
    rows = m.sum(1, keepdim=True)
    norm = torch.where(rows > 0, m / rows.clamp(min=1), torch.zeros_like(m)).numpy()
    n = len(names)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * n + 2), max(5.0, 0.45 * n + 1)))
    im = ax.imshow(np.maximum(norm, 1e-4) if log else norm, cmap="Blues",
                   norm=LogNorm(vmin=1e-4, vmax=1) if log else None, vmin=None if log else 0,
                   vmax=None if log else 1)
    ax.set_xticks(range(n), names, rotation=90)
    ax.set_yticks(range(n), names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("truth")
    ax.set_title("confusion (rows normalised)")
    for t in range(n):
        for p in range(n):
            if norm[t, p] >= 0.01:
                ax.text(p, t, f"{100 * norm[t, p]:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if norm[t, p] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    save_figure(fig, path, "confusion picture")
