"""What `predict` reads: photos from files and folders (or with --pairs, labelled samples: Kaggle pair
files, or dataset folders of any layout, cityseg/data/formats.py), and the output name of each.

Photo policy (`read_photo`): JPEG or PNG; 8-bit RGB used as is; grayscale, palette and alpha images
are converted to RGB (a grayscale street photo is still a photo; alpha is dropped). CMYK and 16/32-bit
images are refused with a one-line error: Pillow's conversions of them are lossy or wrong (no ICC
colour management, 16-bit values clipped instead of scaled). The EXIF orientation is applied, so
outputs line up with the photo as viewers show it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cityseg.data.formats import Sample, Source, detect_format, find_dataset, read_sample
from cityseg.data.pairs import IMAGE_SUFFIXES, MAX_PIXELS, PairError, check_readable, natural_key
from cityseg.inference.overlay import OUTPUT_KINDS
from cityseg.palette import Palette

PAIRS = Source(())  # how a Kaggle pair file's right half is read: a colour mask

PHOTO_FORMATS = ("JPEG", "MPO", "PNG")  # MPO: the multi-picture JPEGs many phones write
_CONVERTIBLE = {"RGB", "L", "LA", "P", "PA", "RGBA", "RGBa", "La"}
_REFUSED = {
    "CMYK": "CMYK image (colours would shift without its ICC profile)",
    "I;16": "16-bit image", "I;16B": "16-bit image", "I;16L": "16-bit image", "I;16N": "16-bit image",
    "I": "32-bit integer image", "F": "floating-point image", "1": "1-bit (black and white) image",
}


@dataclass(frozen=True)
class InputImage:
    name: str  # output file prefix
    path: Path
    photo: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray | None  # the label (--pairs only): (H, W, 3) uint8 colour mask or (H, W) class ids
    source: Source | None = None  # how `mask` becomes class ids (its format's id table or the palette)


def list_pair_inputs(paths: Sequence[str | os.PathLike], palette: Palette, out_dir: Path | None = None,
                     fmt: str = "auto", id_map: str = "auto", split: str = "val") -> list[tuple[Sample, Source]]:
    """`predict --pairs` inputs: Kaggle pair files and folders of them, or dataset folders of any layout
    (`fmt`, detected by default: pairs, folders, cityscapes), which give their `split`'s samples."""
    found: list[tuple[Sample, Source]] = []
    for p in map(Path, paths):
        if p.is_dir() and (detect_format(p) is not None or fmt in ("folders", "cityscapes")):
            dataset = find_dataset(p, fmt)
            source = dataset.source(split, palette, id_map)
            found += [(sample, source) for sample in source]
        else:
            found += [(Sample(f), PAIRS) for f in list_inputs([p], out_dir)]
    seen: set[Path] = set()
    unique = []
    for sample, source in found:
        key = sample.photo.resolve()
        if key not in seen:
            seen.add(key)
            unique.append((sample, source))
    return unique


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


def load_input(path: Path | Sample, name: str, pairs: bool, source: Source | None = None) -> InputImage:
    """A photo, or with `pairs` a sample (a Kaggle pair file, or a photo and its label in `source`)."""
    if pairs:
        sample = path if isinstance(path, Sample) else Sample(Path(path))
        source = source or PAIRS
        photo, mask = read_sample(sample, source)
        return InputImage(name, sample.photo, photo, mask, source)
    return InputImage(name, Path(path), read_photo(path), None)

