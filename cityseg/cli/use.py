"""Using a trained model: `eval`, `predict` and `export`.

    cityseg-fast eval --ckpt runs/X/checkpoints/best.pt --data DIR --split val --json val.json
    cityseg-fast predict --ckpt runs/X/checkpoints/best.pt street.jpg photos/ --out preds/
    cityseg-fast predict --ckpt runs/X/checkpoints/best.pt DIR/val --pairs --out preds/ --tta flip
    cityseg-fast export --ckpt runs/X/checkpoints/best.pt --format onnx --out unet.onnx
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from cityseg.cli.choices import FORMAT_HELP, ID_MAP_HELP, DataFormat, Format, IdMap, Split, Tta
from cityseg.cli.common import app, console
from cityseg.options import check_options

CkptOpt = Annotated[Path, typer.Option(help="Checkpoint (best.pt or last.pt of a run).")]
FormatOpt = Annotated[DataFormat, typer.Option("--format", help=FORMAT_HELP)]
IdMapOpt = Annotated[IdMap, typer.Option("--id-map", help=ID_MAP_HELP)]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace output files that already exist "
                                            "(never an input: the checkpoint, a dataset split).")]


@app.command("eval")
def evaluate_cmd(
    ckpt: CkptOpt,
    data: Annotated[Path | None, typer.Option(help="Dataset folder; default: the one the run trained on.")] = None,
    split: Annotated[Split, typer.Option(help="Split to score.")] = Split.val,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 16,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    workers: Annotated[int, typer.Option(help="Loader worker processes.")] = 2,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the metrics and confusion matrix here "
                                                  "as JSON, and its heat map beside it as PNG.")] = None,
    tta: Annotated[Tta, typer.Option(help="Test-time augmentation: flip averages the mirrored prediction "
                                     "(2x the compute).")] = Tta.none,
    native: Annotated[bool, typer.Option("--native/--model-size", help="Score against the masks at their own size "
                                         "(default; logits upsampled to it) or resized to the model's input "
                                         "size.")] = True,
    overwrite: OverwriteOpt = False,
    data_format: FormatOpt = DataFormat("auto"),
) -> None:
    """Score a checkpoint on a split: pixel accuracy, mIoU and the per-class IoU table."""
    check_options({"batch_size": batch_size, "workers": workers})
    from cityseg.inference.evaluate import evaluate_checkpoint

    fmt = data_format.value
    result = evaluate_checkpoint(ckpt, data, split=split.value, batch_size=batch_size, device=device,
                                 workers=workers, json_out=json_out, console=console, tta=tta.value, native=native,
                                 overwrite=overwrite, data_format=None if fmt == "auto" else fmt)
    console.print(f"pixel acc {result['pixel_acc']:.4f}  mIoU {result['miou']:.4f}")


@app.command("predict")
def predict_cmd(
    inputs: Annotated[list[Path], typer.Argument(help="Photos (JPEG/PNG, any size) or folders of them; "
                                                 "with --pairs, Kaggle pair files or folders of them, or a "
                                                 "dataset folder of any layout (its val split).")],
    ckpt: CkptOpt,
    out: Annotated[Path, typer.Option(help="Output folder: NAME_ids.png, NAME_color.png, NAME_overlay.png "
                                      "per image (+ metrics.json, confusion.png with --pairs).")],
    pairs: Annotated[bool, typer.Option(help="Inputs are labelled: Kaggle pairs (predict the left half, score "
                                        "against the right half) or dataset folders (--format).")] = False,
    tta: Annotated[Tta, typer.Option(help="Test-time augmentation: flip averages the mirrored prediction "
                                     "(2x the compute).")] = Tta.none,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 8,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    threads: Annotated[int, typer.Option("--threads", "--workers", help=(
        "Threads decoding inputs and encoding PNGs (--workers: its older name, until the next release)."))] = 4,
    skip_bad: Annotated[bool, typer.Option(help="Skip unreadable or invalid inputs (listed and counted at the "
                                           "end) instead of stopping at the first.")] = False,
    overwrite: OverwriteOpt = False,
    data_format: FormatOpt = DataFormat("auto"),
    id_map: IdMapOpt = IdMap("auto"),
) -> None:
    """Segment photos with a checkpoint: class-id, colour and overlay PNGs per image."""
    check_options({"batch_size": batch_size})
    check_options({"threads": threads})
    from cityseg.inference.predict import Predictor, run_predict

    predictor = Predictor(ckpt, device=device, tta=tta.value, batch_size=batch_size)
    result = run_predict(predictor, inputs, out, pairs=pairs, workers=threads, skip_bad=skip_bad, console=console,
                         overwrite=overwrite, data_format=data_format.value, id_map=id_map.value)
    skipped = f", skipped {len(result['skipped'])}" if result["skipped"] else ""
    console.print(Text.assemble(("done", "bold green"), f": {result['images']} images{skipped} -> {result['out']}"))
    if "metrics" in result:
        m = result["metrics"]
        console.print(f"pixel acc {m['pixel_acc']:.4f}  mIoU {m['miou']:.4f}  (metrics.json, confusion.png)")


@app.command("export")
def export_cmd(
    ckpt: CkptOpt,
    fmt: Annotated[Format, typer.Option("--format", help="onnx (opset 18) or torchscript.")],
    out: Annotated[Path, typer.Option(help="File to write (e.g. unet.onnx, unet.pt).")],
    image_size: Annotated[int | None, typer.Option(help="Input size S (square); default: the training "
                                                   "size.")] = None,
    check: Annotated[bool, typer.Option("--check/--no-check", help="Compare the export's argmax with "
                                        "PyTorch's on random inputs (ONNX: needs onnxruntime).")] = True,
    overwrite: OverwriteOpt = False,
) -> None:
    """Export a checkpoint's model to ONNX or TorchScript (float32, NCHW, free batch size)."""
    check_options({"image_size": image_size})
    import importlib.util

    import torch

    from cityseg.inference.export import check_parity, export_model, load_export_model, read_metadata

    path = export_model(ckpt, fmt.value, out, image_size=image_size, overwrite=overwrite)
    console.print(Text.assemble(("wrote", "bold green"), f" {path} ({path.stat().st_size / 1e6:.1f} MB, {fmt.value})"))
    if not check:
        return
    if fmt is Format.onnx and importlib.util.find_spec("onnxruntime") is None:
        console.print("parity not checked: onnxruntime is not installed (pip install onnxruntime)")
        return
    size = read_metadata(path, fmt.value)["image_size"]
    model, _, _ = load_export_model(ckpt)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    agree = check_parity(model, path, fmt.value, images)
    console.print(f"argmax agreement with PyTorch on 2 random inputs: {100 * agree:.2f} %")
