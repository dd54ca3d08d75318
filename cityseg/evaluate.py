"""`cityseg-fast eval`: score a checkpoint on a split with the same code path as training's validation.

    cityseg-fast eval --ckpt runs/X/checkpoints/best.pt --data DIR --split val --json metrics.json
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from cityseg.checkpoint import load_checkpoint
from cityseg.config import Config, TrainConfig
from cityseg.data.loaders import build_loader, resolve_data_dir, split_files
from cityseg.engine import evaluate, palette_from_state, resolve_runtime
from cityseg.metrics import iou_table
from cityseg.model import build_model
from cityseg.report import write_json


def load_model(state: dict[str, Any], device: torch.device) -> torch.nn.Module:
    cfg = Config.from_dict(state["config"])
    model = build_model(cfg.model)
    model.load_state_dict(state["model"])
    return model.to(device, memory_format=torch.channels_last).eval()


def evaluate_checkpoint(
    ckpt: Path,
    data: Path | None,
    *,
    split: str = "val",
    batch_size: int = 16,
    device: str = "auto",
    workers: int = 2,
    json_out: Path | None = None,
    console: Console | None = None,
    tta: str | None = None,
) -> dict[str, Any]:
    """Pixel accuracy, mIoU, per-class IoU and confusion matrix of `ckpt` on `data/split`."""
    console = console or Console()
    state = load_checkpoint(ckpt)
    cfg = Config.from_dict(state["config"])
    rt = resolve_runtime(TrainConfig(device=device, amp=cfg.train.amp, compile=False))
    palette = palette_from_state(state["palette"])
    data_dir = str(data) if data else cfg.data.data_dir
    data_cfg = replace(cfg.data, batch_size=batch_size, workers=workers, data_dir=data_dir)
    files, _ = split_files(resolve_data_dir(data_cfg), split, validate=not data_cfg.skip_validate, workers=workers)
    from cityseg.predict import FlipTTA, plot_confusion, resolve_tta  # lazy: predict imports this module

    tta = resolve_tta(tta)
    model = load_model(state, rt.device)
    if tta == "flip":
        model = FlipTTA(model)
    with build_loader("torch", files, palette, data_cfg, train=False, device=rt.device, dtype=torch.float32,
                      seed=cfg.train.seed) as loader:
        metrics, loss = evaluate(model, loader, rt, palette.num_classes)
    console.print(iou_table(metrics, palette.names, title=f"{ckpt} on {split} ({len(files)} images)"))
    result = {**metrics.to_dict(), "loss": loss, "checkpoint": str(ckpt), "split": split, "images": len(files),
              "tta": tta, "class_names": list(palette.names)}
    if json_out is not None:
        write_json(Path(json_out), result)
        plot_confusion(metrics.confusion, palette.names, Path(json_out).with_suffix(".confusion.png"))
    return result
