"""`cityseg-fast eval`: score a checkpoint on a split with the same code path as training's validation.

    cityseg-fast eval --ckpt runs/X/checkpoints/best.pt --data DIR --split val --json metrics.json
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from cityseg.checkpoint import load_from_checkpoint
from cityseg.data.loaders import build_loader, resolve_dataset, split_files
from cityseg.inference.tta import FlipTTA, resolve_tta
from cityseg.metrics import evaluate_model, iou_table
from cityseg.outputs import new_output_files
from cityseg.progress import StepProgress
from cityseg.report import plot_confusion, write_json
from cityseg.runtime import inference_runtime, resolve_device


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
    native: bool | None = None,
    overwrite: bool = False,
    verbose: bool = False,
    data_format: str | None = None,
) -> dict[str, Any]:
    """Pixel accuracy, mIoU, per-class IoU and confusion matrix of `ckpt` on `data/split`, scored at
    the masks' own size (`native`, the default of the run's config) or at the model's input size.
    `data_format`: the dataset's layout (pairs, folders, cityscapes; default: detected).
    `json_out` and its heat map (JSON_OUT stem + .confusion.png) are new files (or `overwrite`),
    never the checkpoint or inside the dataset: checked before the evaluation.
    Quiet unless `verbose` (the progress bar and the per-class table) or given a `console`."""
    console = console or Console(markup=False, highlight=False, quiet=not verbose)
    where = resolve_device(device)
    model, cfg, palette, _ = load_from_checkpoint(ckpt, where)
    rt = inference_runtime(where, cfg.train.precision)
    data_dir = str(Path(data).absolute()) if data else cfg.data.data_dir
    data_cfg = replace(cfg.data, batch_size=batch_size, workers=workers, data_dir=data_dir,
                       val_native=cfg.data.val_native if native is None else native,
                       format=data_format or (cfg.data.format if data is None else "auto"))
    dataset = resolve_dataset(data_cfg)
    if dataset.note:
        console.print(dataset.note, soft_wrap=True)
    root = dataset.root
    if json_out is not None:  # a bad path fails now, not after the evaluation
        heat_map = Path(json_out).with_suffix(".confusion.png")
        new_output_files([Path(json_out), heat_map], "metrics JSON", overwrite=overwrite,
                         inputs=[(Path(ckpt), "the checkpoint being read"), (root, "the dataset being scored")])
    files, _ = split_files(dataset, split, validate=not data_cfg.skip_validate, workers=workers, palette=palette,
                           id_map=data_cfg.id_map)
    tta = resolve_tta(tta)
    if tta == "flip":
        model = FlipTTA(model)
    with build_loader("torch", files, palette, data_cfg, train=False, device=rt.device, dtype=torch.float32,
                      seed=cfg.train.seed) as loader:
        with StepProgress(console, f"eval {split}", len(loader)) as bar:
            metrics, loss = evaluate_model(model, loader, rt, palette.num_classes,
                                           on_batch=lambda done: bar.step(done, "", log=done % 20 == 0))
        scored_at = loader.spec.label_size
    h, w = loader.spec.label_hw
    size = f"{h}" if h == w else f"{w}x{h}"
    # The title on its own line (wrapped at spaces, if at all), not squeezed into the table's width.
    console.print(f"{ckpt} on {split} ({len(files)} images, scored at {size} px)", soft_wrap=True)
    console.print(iou_table(metrics, palette.names, title=f"{split}: per-class IoU"))
    result = {**metrics.to_dict(), "loss": loss, "checkpoint": str(ckpt), "split": split, "images": len(files),
              "scored_at_px": scored_at, "tta": tta, "class_names": list(palette.names)}
    if json_out is not None:
        write_json(Path(json_out), result, "metrics JSON")
        plot_confusion(metrics.confusion, palette.names, heat_map)
    return result
