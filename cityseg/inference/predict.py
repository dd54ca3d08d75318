"""`cityseg-fast predict`: segment photos of any size with a trained checkpoint.

    cityseg-fast predict --ckpt runs/X/checkpoints/best.pt photos/ street.jpg --out preds/
    cityseg-fast predict --ckpt runs/X/checkpoints/best.pt DIR/val --pairs --out preds/   # also scores

Per image NAME it writes three PNGs (overlay.py); inputs are read as inputs.py says. With --pairs
the photo is the left half of a Kaggle pair and the right half is the truth: metrics.json and
confusion.png are written too.

Preprocessing is the validation loader's, step for step (antialiased bilinear resize of the uint8
photo to the training size, `normalize`, channels-last, autocast as configured), so a pair at the
training size gets exactly the prediction `cityseg-fast eval` scores.

Back to the photo's size: the logits are upsampled bilinearly and then argmaxed, rather than
argmaxing at the training size and upsampling the ids with nearest. At 256 -> 2048 px, nearest ids
are 8x8 staircases; interpolated logits give class boundaries at full resolution for the cost of one
(C, H, W) float map per image (what torchvision's segmentation models do in `forward`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torchvision.transforms.v2 import functional as F

from cityseg.checkpoint import load_from_checkpoint
from cityseg.data.contract import normalize
from cityseg.data.formats import Sample, Source, labels_to_ids
from cityseg.data.pairs import PairError
from cityseg.errors import OutputError
from cityseg.inference.inputs import PAIRS, InputImage, list_inputs, list_pair_inputs, load_input, output_names
from cityseg.inference.overlay import OUTPUT_KINDS, write_outputs
from cityseg.inference.tta import FlipTTA, resolve_tta
from cityseg.metrics import ConfusionMatrix, SegMetrics, iou_table, logits_at
from cityseg.outputs import ensure_dir, new_output_files
from cityseg.palette import IGNORE_INDEX, Palette
from cityseg.report import plot_confusion, write_json
from cityseg.runtime import autocast, inference_runtime, resolve_device

# -- model side ------------------------------------------------------------------------------------


def preprocess(photos: Sequence[np.ndarray], size: int, device: torch.device) -> torch.Tensor:
    """uint8 (H, W, 3) photos of any sizes -> normalised float32 (B, 3, size, size), channels-last.

    The same ops as the validation loader (`PairDataset.load` + `normalize`), resized on
    `device` so full-size photos are shrunk on the GPU when there is one.
    """
    batch = torch.empty((len(photos), 3, size, size), dtype=torch.uint8, device=device,
                        memory_format=torch.channels_last)
    for i, photo in enumerate(photos):
        x = torch.from_numpy(np.array(photo, dtype=np.uint8)).to(device).permute(2, 0, 1)  # (3, H, W)
        if x.shape[-2:] != (size, size):
            x = F.resize(x, [size, size], antialias=True)
        batch[i].copy_(x)
    return normalize(batch, torch.float32)


class Predictor:
    """A checkpoint ready to segment photos: `predict_batch([photo, ...]) -> [ids, ...]`."""

    def __init__(self, ckpt_path: str | os.PathLike, device: str = "auto", tta: str | None = None,
                 batch_size: int = 8) -> None:
        if batch_size < 1:
            raise ValueError(f"--batch-size {batch_size}: expected at least 1")
        self.ckpt = Path(ckpt_path)
        self.tta = resolve_tta(tta)
        where = resolve_device(device)
        model, self.cfg, self.palette, _ = load_from_checkpoint(self.ckpt, where)
        self.runtime = inference_runtime(where, self.cfg.train.precision)
        self.image_size = self.cfg.data.image_size
        self.batch_size = batch_size
        self.model = FlipTTA(model) if self.tta == "flip" else model

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @torch.no_grad()
    def logits(self, photos: Sequence[np.ndarray]) -> torch.Tensor:
        """(B, C, S, S) float32 logits at the training size S, on the device."""
        x = preprocess(photos, self.image_size, self.device)
        with autocast(self.runtime):
            return self.model(x).float()

    @torch.no_grad()
    def predict_batch(self, photos: Sequence[np.ndarray]) -> list[np.ndarray]:
        """uint8 (H, W, 3) photos -> (H, W) uint8 class ids, each at its photo's own size."""
        out: list[np.ndarray] = []
        for start in range(0, len(photos), self.batch_size):
            chunk = photos[start : start + self.batch_size]
            logits = self.logits(chunk)
            for i, photo in enumerate(chunk):
                out.append(upsampled_argmax(logits[i : i + 1], photo.shape[:2]).cpu().numpy())
        return out


# Bytes of full-size float logits above which they are made a strip of rows at a time: an 8000x8000
# photo's 19 classes would be 4.9 GB at once (101 s and 6.2 GB of memory measured), in strips 64 MB.
FULL_LOGITS_MAX_BYTES = 256 << 20
STRIP_BYTES = 64 << 20


def upsampled_argmax(logits: torch.Tensor, size: tuple[int, int],
                     max_bytes: int = FULL_LOGITS_MAX_BYTES) -> torch.Tensor:
    """(1, C, h, w) logits -> (H, W) uint8 ids of the logits resized to `size` (no resize if equal).
    Large outputs are upsampled a strip of rows at a time (`strip_upsampled_argmax`): memory stays
    bounded whatever the photo's size."""
    (_, c, h, w), (height, width) = logits.shape, size
    if height >= h and width >= w and c * height * width * 4 > max_bytes:
        return strip_upsampled_argmax(logits, size)
    return logits_at(logits, size)[0].argmax(0).to(torch.uint8)  # validation's resize: the same ids


def strip_upsampled_argmax(logits: torch.Tensor, size: tuple[int, int], strip_bytes: int = STRIP_BYTES) -> torch.Tensor:
    """The argmax of bilinearly upsampled logits (align_corners=False, as `interpolate` computes it;
    equal up to float rounding at exact ties), without the (C, H, W) map: widths first at the
    logits' height, then each strip of output rows blended from its two source rows."""
    (_, c, h, _), (height, width) = logits.shape, size
    wide = nn.functional.interpolate(logits, size=(h, width), mode="bilinear", align_corners=False)[0]  # (C, h, W)
    ids = torch.empty((height, width), dtype=torch.uint8, device=logits.device)
    rows = max(1, strip_bytes // (c * width * 4))
    for r0 in range(0, height, rows):
        r = torch.arange(r0, min(height, r0 + rows), device=logits.device, dtype=torch.float64)
        src = ((r + 0.5) * (h / height) - 0.5).clamp(min=0)  # torch's source index for align_corners=False
        y0 = src.floor().long()
        y1 = (y0 + 1).clamp(max=h - 1)
        lam = (src - y0).to(wide.dtype)[None, :, None]
        strip = wide[:, y0] * (1 - lam) + wide[:, y1] * lam  # (C, rows, W)
        ids[r0 : r0 + len(r)] = strip.argmax(0).to(torch.uint8)
    return ids


# -- the command -----------------------------------------------------------------------------------


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("predict", style="bold"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=False)


def _load_or_error(path: Path | Sample, name: str, pairs: bool, skip_bad: bool,
                   source: Source | None = None) -> InputImage | PairError:
    try:
        return load_input(path, name, pairs, source)
    except PairError as e:
        if skip_bad:
            return e
        raise


def plan_outputs(predictor: Predictor, inputs: Sequence[str | os.PathLike], out_dir: Path, pairs: bool,
                 data_format: str, id_map: str) -> tuple[list[tuple[Any, str, Any]], list[Path]]:
    """(the jobs: (sample, output name, source), every file the run will write); an output that
    would overwrite an input is refused."""
    if pairs:
        samples = list_pair_inputs(inputs, predictor.palette, out_dir, data_format, id_map)
        files = [sample.photo for sample, _ in samples]
    else:
        files = list_inputs(inputs, out_dir)
        samples = [(f, None) for f in files]
    jobs = [(sample, name, source) for (sample, source), name in zip(samples, output_names(files), strict=True)]
    inputs_by_path = {f.resolve() for f in files}
    for _, name, _ in jobs:
        for kind in OUTPUT_KINDS:
            if (out_dir / f"{name}_{kind}.png").resolve() in inputs_by_path:
                raise OutputError(f"{out_dir / f'{name}_{kind}.png'}: an input would be overwritten by an output; "
                                  "choose another --out")
    planned = [out_dir / f"{name}_{kind}.png" for _, name, _ in jobs for kind in OUTPUT_KINDS]
    planned += [out_dir / "metrics.json", out_dir / "confusion.png"] if pairs else []
    return jobs, planned


def run_predict(
    predictor: Predictor,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    pairs: bool = False,
    workers: int = 4,
    skip_bad: bool = False,
    console: Console | None = None,
    overwrite: bool = False,
    data_format: str = "auto",
    id_map: str = "auto",
) -> dict[str, Any]:
    """Predict every input and write its three PNGs; with `pairs`, score and write metrics.json.
    With `pairs`, a dataset folder of any layout (`data_format`, detected by default) gives its val
    samples, labels mapped as in training (`id_map` for class-id masks).
    Every output is checked first (`outputs.new_output_files`): a file already there is refused
    unless `overwrite`; `out_dir` inside a `pairs` input folder or a dataset split always.

    Threads decode the next batch and encode the last batch's PNGs while the model runs (Pillow
    releases the GIL in both). Returns {"images", "skipped", "out", "metrics" (pairs only)}.
    """
    console = console or Console(markup=False, highlight=False)
    out_dir = Path(out_dir)
    jobs, planned = plan_outputs(predictor, inputs, out_dir, pairs, data_format, id_map)
    # Pair folders are datasets: predictions dropped there would become (bad) pairs.
    inputs = [(Path(p), "the --pairs input folder") for p in inputs if pairs and Path(p).is_dir()]
    new_output_files(planned, "predictions", overwrite=overwrite, inputs=inputs)
    written_before = read_written(out_dir)
    if overwrite:
        check_only_predictions_replaced(planned, written_before)
    ensure_dir(out_dir, "output folder")
    written: list[Path] = []
    palette = predictor.palette
    cm = ConfusionMatrix(palette.num_classes, ignore_index=IGNORE_INDEX) if pairs else None
    try:  # what was written is recorded, a run stopped half-way included
        done, skipped = predict_all(predictor, jobs, out_dir, pairs, skip_bad, workers, console, written, cm)
    finally:
        record_written(out_dir, written_before, written)
    for e in skipped:
        console.print(f"skipped {e}", highlight=False, markup=False)
    result: dict[str, Any] = {"images": done, "skipped": [str(e) for e in skipped], "out": str(out_dir)}
    if cm is not None and done:
        metrics = cm.compute()
        try:
            result["metrics"] = write_pair_metrics(metrics, predictor, out_dir, done, console)
        finally:
            record_written(out_dir, read_written(out_dir), [p for p in planned[-2:] if p.is_file()])
    return result


def predict_all(predictor: Predictor, jobs: list[tuple[Any, str, Any]], out_dir: Path, pairs: bool, skip_bad: bool,
                workers: int, console: Console, written: list[Path], cm: ConfusionMatrix | None
                ) -> tuple[int, list[PairError]]:
    """Predict the jobs batch by batch, decoding the next batch and writing the last one's PNGs in
    threads; `written` gets each file as it is on disk, `cm` the pairs' scores. Returns (images
    predicted, inputs skipped)."""
    palette, bs = predictor.palette, predictor.batch_size
    skipped: list[PairError] = []
    done = 0
    with ThreadPoolExecutor(max(1, workers)) as pool, _progress(console) as bar:
        task = bar.add_task("predict", total=len(jobs))

        def submit(start: int) -> list[Future]:
            return [pool.submit(_load_or_error, p, n, pairs, skip_bad, src)
                    for p, n, src in jobs[start : start + bs]]

        pending, writes = submit(0), []
        for start in range(0, len(jobs), bs):
            loaded = [f.result() for f in pending]
            pending = submit(start + bs)  # decode ahead while this batch runs
            good = [x for x in loaded if isinstance(x, InputImage)]
            skipped += [x for x in loaded if isinstance(x, PairError)]
            ids = predictor.predict_batch([x.photo for x in good]) if good else []
            for f in writes:  # the previous batch's PNGs: bounded memory, errors surface here
                written += f.result().values()
            writes = [pool.submit(write_outputs, out_dir, x.name, x.photo, y, palette)
                      for x, y in zip(good, ids, strict=True)]
            if cm is not None:
                for x, y in zip(good, ids, strict=True):
                    cm.update(torch.from_numpy(y)[None], mask_ids(x, palette)[None])
            done += len(good)
            bar.update(task, advance=len(loaded))
        for f in writes:
            written += f.result().values()
    return done, skipped


def mask_ids(x: InputImage, palette: Palette) -> torch.Tensor:
    """An input's label -> (H, W) uint8 class ids, the training mapping (colour masks: the LUT on CPU;
    class-id masks: their format's id table)."""
    return labels_to_ids(torch.from_numpy(np.array(x.mask)), x.source or PAIRS, palette, torch.uint8)


# -- what predict wrote: --overwrite replaces these, never another file -------------------------------

WRITTEN = ".cityseg-predict-written.json"  # in the output folder: {file name: [size, mtime_ns]}


def read_written(out_dir: Path) -> dict[str, list[int]]:
    """The files earlier predictions wrote in `out_dir`, with their size and time then."""
    import json

    try:
        data = json.loads((out_dir / WRITTEN).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_only_predictions_replaced(planned: list[Path], written_before: dict[str, list[int]]) -> None:
    """`--overwrite` replaces earlier outputs only: a file at an output's name that predict did not
    write there (a photo of yours named NAME_color.png, skipped as an input for its name) is refused
    by name."""
    for path in planned:
        if (path.exists() or path.is_symlink()) and path.name not in written_before:
            raise OutputError(f"{path}: exists and was not written by an earlier predict: --overwrite replaces "
                              "only earlier predictions; choose another --out")


def record_written(out_dir: Path, written_before: dict[str, list[int]], written: list[Path]) -> None:
    """Add this run's files to the record, even when the run stops half-way."""
    from cityseg.outputs import atomic_write

    if not written:
        return
    import json

    record = dict(written_before)
    for path in written:
        stat = path.stat()
        record[path.name] = [stat.st_size, stat.st_mtime_ns]
    atomic_write(out_dir / WRITTEN, json.dumps(record) + "\n", "record of predictions written")


def write_pair_metrics(metrics: SegMetrics, predictor: Predictor, out_dir: Path, images: int,
                       console: Console) -> dict[str, Any]:
    names = predictor.palette.names
    console.print(iou_table(metrics, names, title=f"{predictor.ckpt} on {images} pairs (photo size)"))
    result = {**metrics.to_dict(), "images": images, "checkpoint": str(predictor.ckpt), "tta": predictor.tta,
              "class_names": list(names)}
    write_json(out_dir / "metrics.json", result, "metrics JSON")
    plot_confusion(metrics.confusion, names, out_dir / "confusion.png")
    return result
