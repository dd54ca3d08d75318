"""`cityseg-fast predict`: segment photos of any size with a trained checkpoint.

    cityseg-fast predict --ckpt runs/X/checkpoints/best.pt photos/ street.jpg --out preds/
    cityseg-fast predict --ckpt runs/X/checkpoints/best.pt DIR/val --pairs --out preds/   # also scores

Per image NAME it writes NAME_ids.png (trainIds, mode L, 255 = ignore), NAME_color.png (Cityscapes
colours) and NAME_overlay.png (photo and colours blended 50/50, a legend of the classes present in a
strip below). With --pairs the photo is the left half of a Kaggle pair and the right half is the
truth: metrics.json and confusion.png are written too.

Preprocessing is the validation loader's, step for step (antialiased bilinear resize of the uint8
photo to the training size, `normalize_batch`, channels-last, autocast as configured), so a pair at
the training size gets exactly the prediction `cityseg-fast eval` scores.

Back to the photo's size: the logits are upsampled bilinearly and then argmaxed, rather than
argmaxing at the training size and upsampling the ids with nearest. At 256 -> 2048 px, nearest ids
are 8x8 staircases; interpolated logits give class boundaries at full resolution for the cost of one
(C, H, W) float map per image (what torchvision's segmentation models do in `forward`).

Photo policy (`read_photo`): JPEG or PNG; 8-bit RGB used as is; grayscale, palette and alpha images
are converted to RGB (a grayscale street photo is still a photo; alpha is dropped). CMYK and 16/32-bit
images are refused with a one-line error: Pillow's conversions of them are lossy or wrong (no ICC
colour management, 16-bit values clipped instead of scaled). The EXIF orientation is applied, so
outputs line up with the photo as viewers show it.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError, features
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torchvision.transforms.v2 import functional as F

from cityseg.checkpoint import load_from_checkpoint
from cityseg.data.pairs import IMAGE_SUFFIXES, MAX_PIXELS, PairError, check_readable, natural_key, read_pair
from cityseg.data.torch_loader import normalize_batch
from cityseg.errors import OutputError
from cityseg.metrics import ConfusionMatrix, SegMetrics, iou_table
from cityseg.outputs import ensure_dir
from cityseg.palette import IGNORE_INDEX, Palette, colorize
from cityseg.report import write_json
from cityseg.runtime import autocast, inference_runtime, resolve_device
from kernels.mask_to_class import mask_to_class

Tta = Literal["flip"] | None
TTA_MODES = ("none", "flip")
PHOTO_FORMATS = ("JPEG", "MPO", "PNG")  # MPO: the multi-picture JPEGs many phones write
_CONVERTIBLE = {"RGB", "L", "LA", "P", "PA", "RGBA", "RGBa", "La"}
_REFUSED = {
    "CMYK": "CMYK image (colours would shift without its ICC profile)",
    "I;16": "16-bit image", "I;16B": "16-bit image", "I;16L": "16-bit image", "I;16N": "16-bit image",
    "I": "32-bit integer image", "F": "floating-point image", "1": "1-bit (black and white) image",
}


# -- model side ------------------------------------------------------------------------------------


class FlipTTA(nn.Module):
    """Average of the logits of x and of its mirror image, mirrored back: (B, C, H, W) -> same.

    The result is exactly flip-equivariant, and costs two forward passes. Averaged in float32 so bf16
    autocast logits do not lose their last bits in the sum.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.model(x).float()
        b = self.model(x.flip(-1)).float().flip(-1)
        return (a + b) / 2


def resolve_tta(tta: str | None) -> Tta:
    if tta in (None, "none"):
        return None
    if tta == "flip":
        return "flip"
    raise ValueError(f"--tta {tta}: expected none or flip")


def preprocess(photos: Sequence[np.ndarray], size: int, device: torch.device) -> torch.Tensor:
    """uint8 (H, W, 3) photos of any sizes -> normalised float32 (B, 3, size, size), channels-last.

    The same ops as the validation loader (`PairDataset.load` + `normalize_batch`), resized on
    `device` so full-size photos are shrunk on the GPU when there is one.
    """
    batch = torch.empty((len(photos), 3, size, size), dtype=torch.uint8, device=device,
                        memory_format=torch.channels_last)
    for i, photo in enumerate(photos):
        x = torch.from_numpy(np.array(photo, dtype=np.uint8)).to(device).permute(2, 0, 1)  # (3, H, W)
        if x.shape[-2:] != (size, size):
            x = F.resize(x, [size, size], antialias=True)
        batch[i].copy_(x)
    return normalize_batch(batch, device, torch.float32)


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


def upsampled_argmax(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1, C, h, w) logits -> (H, W) uint8 ids of the logits resized to `size` (no resize if equal)."""
    if tuple(logits.shape[-2:]) != tuple(size):
        # antialias matters only when shrinking (photos smaller than the training size).
        logits = nn.functional.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False,
                                           antialias=True)
    return logits[0].argmax(0).to(torch.uint8)


# -- inputs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputImage:
    name: str  # output file prefix
    path: Path
    photo: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray | None  # (H, W, 3) uint8 colour mask (--pairs only)


def list_inputs(paths: Sequence[str | os.PathLike], out_dir: Path | None = None) -> list[Path]:
    """Files and folders -> image files: folders expanded (sorted, .jpg/.jpeg/.png), duplicates dropped;
    in `out_dir`, the outputs of an earlier predict are not inputs."""
    if not paths:
        raise PairError(".", "no input: give photos or folders of photos")
    files: list[Path] = []
    out = out_dir.resolve() if out_dir is not None else None
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted((f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
                            and not (p.resolve() == out and is_own_output(f))), key=natural_key)
            if not found:
                raise PairError(p, "folder holds no .jpg/.jpeg/.png files")
            files += found
        elif not p.exists():
            raise PairError(p, "no such file or folder")
        elif p.suffix.lower() not in IMAGE_SUFFIXES:
            raise PairError(p, f"unsupported file type {p.suffix or '(none)'}, expected .jpg, .jpeg or .png")
        else:
            files.append(p)
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


OUTPUT_KINDS = ("ids", "color", "overlay")


def output_names(files: Sequence[Path]) -> list[str]:
    """File stems, made unique with -2, -3, ... (a/1.jpg and b/1.jpg must not overwrite each other,
    nor 1.png's second name "1-2" the outputs of a file named 1-2.jpg)."""
    taken = {f.stem for f in files}  # each file's own stem is reserved for it first
    used: set[str] = set()
    names = []
    for f in files:
        name, n = f.stem, 1
        while name in used or (n > 1 and name in taken):
            n += 1
            name = f"{f.stem}-{n}"
        used.add(name)
        names.append(name)
    return names


def is_own_output(path: Path) -> bool:
    """NAME_ids.png / NAME_color.png / NAME_overlay.png: what `predict` writes."""
    return path.suffix.lower() == ".png" and path.stem.rsplit("_", 1)[-1] in OUTPUT_KINDS and "_" in path.stem


def read_photo(path: str | os.PathLike) -> np.ndarray:
    """Decode one photo -> (H, W, 3) uint8 RGB, per the policy in the module docstring."""
    path = Path(path)
    check_readable(path)
    try:
        image = Image.open(path)
    except UnidentifiedImageError:
        raise PairError(path, "not an image (unrecognised or corrupt header)") from None
    except Image.DecompressionBombError:
        raise PairError(path, f"image too large (over {MAX_PIXELS:,} pixels)") from None
    except OSError as e:
        raise PairError(path, f"corrupt or truncated image header ({e})") from None
    with image:
        if image.format not in PHOTO_FORMATS:
            raise PairError(path, f"unsupported format {image.format}, expected JPEG or PNG")
        if image.mode not in _CONVERTIBLE:
            problem = _REFUSED.get(image.mode, f"mode {image.mode}")
            raise PairError(path, f"{problem}: expected an 8-bit RGB or grayscale photo")
        w, h = image.size
        if w * h > MAX_PIXELS:
            raise PairError(path, f"image too large ({w}x{h} pixels, limit {MAX_PIXELS:,})")
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
        except (OSError, SyntaxError, ValueError) as e:
            raise PairError(path, f"corrupt or truncated image data ({e})") from None
        return np.asarray(image.convert("RGB"))


def load_input(path: Path, name: str, pairs: bool) -> InputImage:
    if pairs:
        photo, mask = read_pair(path)
        return InputImage(name, path, photo, mask)
    return InputImage(name, path, read_photo(path), None)


def iter_inputs(paths: Sequence[str | os.PathLike], pairs: bool) -> Iterator[InputImage]:
    """Decoded inputs one by one; a bad file raises PairError (`PATH: problem`) when reached."""
    files = list_inputs(paths)
    for path, name in zip(files, output_names(files), strict=True):
        yield load_input(path, name, pairs)


# -- outputs ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow's bundled scalable font needs FreeType; builds without it only have the tiny bitmap font.
    return ImageFont.load_default(size=size) if features.check("freetype2") else ImageFont.load_default()


def legend_strip(width: int, class_ids: Sequence[int], palette: Palette) -> Image.Image | None:
    """A dark strip `width` wide listing the classes: colour square + name, wrapped into rows."""
    if not class_ids:
        return None
    fs = max(10, min(28, width // 48))  # font size follows the photo width
    pad, font = max(3, fs // 2), _font(fs)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    rows: list[list[tuple[int, int]]] = [[]]  # per row: (class id, x)
    x = pad
    for c in class_ids:
        entry = fs + pad // 2 + math.ceil(measure.textlength(palette.names[c], font=font)) + pad
        if x + entry > width and rows[-1]:
            rows.append([])
            x = pad
        rows[-1].append((c, x))
        x += entry
    row_h = fs + pad
    strip = Image.new("RGB", (width, pad + row_h * len(rows)), (32, 32, 32))
    draw = ImageDraw.Draw(strip)
    for r, row in enumerate(rows):
        y = pad + r * row_h
        for c, x in row:
            color = tuple(int(v) for v in palette.colors[c])
            draw.rectangle([x, y, x + fs - 1, y + fs - 1], fill=color, outline=(255, 255, 255))
            draw.text((x + fs + pad // 2, y + fs / 2), palette.names[c], fill=(255, 255, 255), font=font,
                      anchor="lm")
    return strip


def overlay_image(photo: np.ndarray, color: np.ndarray, ids: np.ndarray, palette: Palette) -> Image.Image:
    """Photo and colour mask blended 50/50, with the legend of the predicted classes below."""
    blend = ((photo.astype(np.uint16) + color.astype(np.uint16) + 1) // 2).astype(np.uint8)
    present = [int(c) for c in np.unique(ids) if c != IGNORE_INDEX and c < palette.num_classes]
    top = Image.fromarray(blend)
    strip = legend_strip(top.width, present, palette)
    if strip is None:
        return top
    out = Image.new("RGB", (top.width, top.height + strip.height))
    out.paste(top, (0, 0))
    out.paste(strip, (0, top.height))
    return out


def write_outputs(out_dir: Path, name: str, photo: np.ndarray, ids: np.ndarray, palette: Palette) -> dict[str, Path]:
    """NAME_ids.png, NAME_color.png, NAME_overlay.png in out_dir; returns their paths by kind."""
    color = colorize(torch.from_numpy(ids), palette).numpy()
    paths = {kind: out_dir / f"{name}_{kind}.png" for kind in OUTPUT_KINDS}
    Image.fromarray(ids.astype(np.uint8)).save(paths["ids"])  # 2-D uint8 -> mode L
    Image.fromarray(color).save(paths["color"])
    overlay_image(photo, color, ids, palette).save(paths["overlay"])
    return paths


def plot_confusion(confusion: Sequence[Sequence[int]] | torch.Tensor, names: Sequence[str], path: Path,
                   log: bool = False) -> None:
    """Heat map of the row-normalised confusion matrix (row = truth: each row sums to 1 = recall view).

    `log`: a log colour scale, which shows the small off-diagonal confusions next to a dominant class.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless; imported here to keep `predict` startup fast
    import matplotlib.pyplot as plt
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
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- the command -----------------------------------------------------------------------------------


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("predict", style="bold"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=False)


def _load_or_error(path: Path, name: str, pairs: bool, skip_bad: bool) -> InputImage | PairError:
    try:
        return load_input(path, name, pairs)
    except PairError as e:
        if skip_bad:
            return e
        raise


def run_predict(
    predictor: Predictor,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    pairs: bool = False,
    workers: int = 4,
    skip_bad: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    """Predict every input and write its three PNGs; with `pairs`, score and write metrics.json.

    Threads decode the next batch and encode the last batch's PNGs while the model runs (Pillow
    releases the GIL in both). Returns {"images", "skipped", "out", "metrics" (pairs only)}.
    """
    console = console or Console(markup=False, highlight=False)
    out_dir = Path(out_dir)
    files = list_inputs(inputs, out_dir)
    jobs = list(zip(files, output_names(files), strict=True))
    inputs_by_path = {f.resolve() for f in files}
    for _, name in jobs:
        for kind in OUTPUT_KINDS:
            if (out_dir / f"{name}_{kind}.png").resolve() in inputs_by_path:
                raise OutputError(f"{out_dir / f'{name}_{kind}.png'}: an input would be overwritten by an output; "
                                  "choose another --out")
    ensure_dir(out_dir, "output folder")
    palette = predictor.palette
    cm = ConfusionMatrix(palette.num_classes, ignore_index=IGNORE_INDEX) if pairs else None
    skipped: list[PairError] = []
    done = 0
    bs = predictor.batch_size
    with ThreadPoolExecutor(max(1, workers)) as pool, _progress(console) as bar:
        task = bar.add_task("predict", total=len(jobs))

        def submit(start: int) -> list[Future]:
            return [pool.submit(_load_or_error, p, n, pairs, skip_bad) for p, n in jobs[start : start + bs]]

        pending, writes = submit(0), []
        for start in range(0, len(jobs), bs):
            loaded = [f.result() for f in pending]
            pending = submit(start + bs)  # decode ahead while this batch runs
            good = [x for x in loaded if isinstance(x, InputImage)]
            skipped += [x for x in loaded if isinstance(x, PairError)]
            ids = predictor.predict_batch([x.photo for x in good]) if good else []
            for f in writes:  # the previous batch's PNGs: bounded memory, errors surface here
                f.result()
            writes = [pool.submit(write_outputs, out_dir, x.name, x.photo, y, palette)
                      for x, y in zip(good, ids, strict=True)]
            if cm is not None:
                for x, y in zip(good, ids, strict=True):
                    cm.update(torch.from_numpy(y)[None], mask_ids(x.mask, palette)[None])
            done += len(good)
            bar.update(task, advance=len(loaded))
        for f in writes:
            f.result()
    for e in skipped:
        console.print(f"skipped {e}", highlight=False, markup=False)
    result: dict[str, Any] = {"images": done, "skipped": [str(e) for e in skipped], "out": str(out_dir)}
    if cm is not None and done:
        metrics = cm.compute()
        result["metrics"] = write_pair_metrics(metrics, predictor, out_dir, done, console)
    return result


def mask_ids(mask: np.ndarray, palette: Palette) -> torch.Tensor:
    """Colour mask (H, W, 3) uint8 -> (H, W) uint8 class ids, the training mapping (LUT on CPU)."""
    return mask_to_class(torch.from_numpy(np.array(mask)), palette.centers, palette.classes, palette.max_dist,
                         out_dtype=torch.uint8)


def write_pair_metrics(metrics: SegMetrics, predictor: Predictor, out_dir: Path, images: int,
                       console: Console) -> dict[str, Any]:
    names = predictor.palette.names
    console.print(iou_table(metrics, names, title=f"{predictor.ckpt} on {images} pairs (photo size)"))
    result = {**metrics.to_dict(), "images": images, "checkpoint": str(predictor.ckpt), "tta": predictor.tta,
              "class_names": list(names)}
    write_json(out_dir / "metrics.json", result)
    plot_confusion(metrics.confusion, names, out_dir / "confusion.png")
    return result
