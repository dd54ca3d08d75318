"""The `predict` and `export` commands; cli.py registers them on the `cityseg-fast` app.

    cityseg-fast predict --ckpt runs/X/checkpoints/best.pt street.jpg photos/ --out preds/
    cityseg-fast predict --ckpt runs/X/checkpoints/best.pt DIR/val --pairs --out preds/ --tta flip
    cityseg-fast export --ckpt runs/X/checkpoints/best.pt --format onnx --out unet.onnx

`fail` and `console` come from cityseg.cli inside each function: cli.py imports this module to
register the commands, so a top-level import would be circular.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def predict_cmd(
    inputs: Annotated[list[Path], typer.Argument(help="Photos (JPEG/PNG, any size) or folders of them; "
                                                 "with --pairs, Kaggle pair files or folders of them.")],
    ckpt: Annotated[Path, typer.Option(help="Checkpoint (best.pt or last.pt of a run).")],
    out: Annotated[Path, typer.Option(help="Output folder: NAME_ids.png, NAME_color.png, NAME_overlay.png "
                                      "per image (+ metrics.json, confusion.png with --pairs).")],
    pairs: Annotated[bool, typer.Option(help="Inputs are Kaggle pairs: predict the left half, score against "
                                        "the right half.")] = False,
    tta: Annotated[str, typer.Option(help="Test-time augmentation: none | flip (average with the mirrored "
                                     "prediction; 2x the compute).")] = "none",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 8,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    workers: Annotated[int, typer.Option(help="Threads decoding inputs and encoding PNGs.")] = 4,
    skip_bad: Annotated[bool, typer.Option(help="Skip unreadable or invalid inputs (listed and counted at the "
                                           "end) instead of stopping at the first.")] = False,
) -> None:
    """Segment photos with a checkpoint: class-id, colour and overlay PNGs per image."""
    from cityseg.checkpoint import CheckpointError
    from cityseg.cli import console, fail
    from cityseg.data.pairs import PairError
    from cityseg.engine import TrainingError
    from cityseg.predict import Predictor, run_predict

    try:
        predictor = Predictor(ckpt, device=device, tta=tta, batch_size=batch_size)
        result = run_predict(predictor, inputs, out, pairs=pairs, workers=workers, skip_bad=skip_bad,
                             console=console)
    except (PairError, CheckpointError, TrainingError, ValueError) as e:
        fail(str(e))
    skipped = f", skipped {len(result['skipped'])}" if result["skipped"] else ""
    console.print(f"[bold green]done[/]: {result['images']} images{skipped} -> {result['out']}")
    if "metrics" in result:
        m = result["metrics"]
        console.print(f"pixel acc {m['pixel_acc']:.4f}  mIoU {m['miou']:.4f}  (metrics.json, confusion.png)")


def export_cmd(
    ckpt: Annotated[Path, typer.Option(help="Checkpoint (best.pt or last.pt of a run).")],
    fmt: Annotated[str, typer.Option("--format", help="onnx | torchscript.")],
    out: Annotated[Path, typer.Option(help="File to write (e.g. unet.onnx, unet.pt).")],
    image_size: Annotated[int | None, typer.Option(help="Input size S (square); default: the training "
                                                   "size.")] = None,
    check: Annotated[bool, typer.Option("--check/--no-check", help="Compare the export's argmax with "
                                        "PyTorch's on random inputs (ONNX: needs onnxruntime).")] = True,
) -> None:
    """Export a checkpoint's model to ONNX or TorchScript (float32, NCHW, free batch size)."""
    import importlib.util

    import torch

    from cityseg.checkpoint import CheckpointError
    from cityseg.cli import console, fail
    from cityseg.export import ExportError, check_parity, export_model, load_export_model, read_metadata

    try:
        path = export_model(ckpt, fmt, out, image_size=image_size)
        console.print(f"[bold green]wrote[/] {path} ({path.stat().st_size / 1e6:.1f} MB, {fmt})")
        if not check:
            return
        if fmt == "onnx" and importlib.util.find_spec("onnxruntime") is None:
            console.print("parity not checked: onnxruntime is not installed (pip install onnxruntime)")
            return
        size = read_metadata(path, fmt)["image_size"]
        model, _ = load_export_model(ckpt)
        images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        agree = check_parity(model, path, fmt, images)
    except (ExportError, CheckpointError, ValueError) as e:
        fail(str(e))
    console.print(f"argmax agreement with PyTorch on 2 random inputs: {100 * agree:.2f} %")
