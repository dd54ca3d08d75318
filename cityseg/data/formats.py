"""The format layer: where a dataset's photos and labels are, and how one sample is read.

    dataset = find_dataset("DIR", "auto")            # -> Dataset(root, format, note saying what was detected)
    source = dataset.source("train", palette, "auto")  # what every loader reads
    photo, label = read_sample(source[0], source)     # (H, W, 3) uint8, label (H, W, 3) or (H, W) uint8

Layouts (`--format`; `auto` detects them in this order):

    cityscapes  DIR/leftImg8bit/{train,val}/CITY/X_leftImg8bit.png + DIR/gtFine/{train,val}/CITY/X_gtFine_labelIds.png
                (the official release, any subset of cities; labelIds -> the 19 trainIds, void 255)
    folders     DIR/images/{train,val}/NAME.jpg|png + DIR/masks/{train,val}/NAME.png (mmseg's img_dir/ann_dir),
                or DIR/{train,val}/images/ + DIR/{train,val}/masks/ ("annotations" also names the masks);
                photo and mask matched by file stem, of the same size; RGB colour masks (mapped by the
                palette) or 8-bit grayscale class-id masks (mapped by an id table)
    pairs       DIR/{train,val}/N.jpg: Kaggle's side-by-side photo | colour mask (cityseg/data/pairs.py)

A `Sample` is a photo file and its label file (a pair file is both). A `Source` is a split's samples
plus how its labels become class ids: colour masks by the palette (`map_colors`: the Triton kernel on a
GPU, the lookup table elsewhere), class-id masks by a 256-entry id table (label value -> class id,
255 void), gathered wherever the label is (CPU workers, the GPU). Everything after the reading -
resizing, augmentation, batching, the device cache - is the loaders' and the same for every format.

Every problem with a file is a `PairError` whose message is one line naming the file.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from cityscapesscripts.helpers.labels import labels as CITYSCAPES_LABELS
from PIL import Image

from cityseg.config import SETTINGS, SPLITS
from cityseg.data.pairs import (
    IMAGE_SUFFIXES,
    MaskCheck,
    PairError,
    PairInfo,
    check_image_header,
    check_pixels,
    check_suffix,
    decode,
    find_dataset_root,
    list_split,
    natural_key,
    open_header,
    open_pair_image,
    read_header,
    split_pair,
    validate_pair,
)
from cityseg.palette import IGNORE_INDEX, Palette, map_colors

FORMATS = tuple(f for f in SETTINGS["data.format"].choices if f != "auto")  # declared with the setting
ID_MAPS = SETTINGS["data.id_map"].choices
MASK_FOLDERS = ("masks", "annotations")
PHOTO_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


# ---------------------------------------------------------------- samples and sources


@dataclass(frozen=True)
class Sample:
    """One photo and its label. `label` None: a Kaggle pair file, photo left and colour mask right."""

    photo: Path
    label: Path | None = None

    def __fspath__(self) -> str:  # a sample is named by its photo file (messages, overlap checks)
        return str(self.photo)


@dataclass(frozen=True, eq=False)
class Source:
    """What a loader reads: the samples of one split in one format, and how labels become class ids."""

    samples: tuple[Sample, ...]
    format: str = "pairs"
    id_table: torch.Tensor | None = None  # (256,) uint8 label value -> class id (255 void); None: colour masks

    @property
    def paired(self) -> bool:
        """Photo and colour mask side by side in one file (the Kaggle layout)."""
        return self.format == "pairs"

    @property
    def ids(self) -> bool:
        """Labels are class-id masks (H, W), not colour masks (H, W, 3)."""
        return self.id_table is not None

    @property
    def label_channels(self) -> int:
        return 1 if self.ids else 3

    def with_samples(self, samples: Sequence[Sample]) -> Source:
        return dataclasses.replace(self, samples=tuple(samples))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)


def as_source(files: Source | Sequence[str | os.PathLike | Sample]) -> Source:
    """A loader's input: a Source as is, or a list of Kaggle pair files (the original contract)."""
    if isinstance(files, Source):
        return files
    return Source(tuple(f if isinstance(f, Sample) else Sample(Path(f)) for f in files))


# ---------------------------------------------------------------- id tables and label mapping


def cityscapes_id_table() -> torch.Tensor:
    """Cityscapes labelIds (0..33) -> trainIds (0..18), every other value -> 255, from the
    cityscapesscripts label table (the palette's own source)."""
    table = torch.full((256,), IGNORE_INDEX, dtype=torch.uint8)
    for label in CITYSCAPES_LABELS:
        if 0 <= label.id < 256 and 0 <= label.trainId < 256:
            table[label.id] = label.trainId
    return table


def train_id_table(num_classes: int) -> torch.Tensor:
    """Masks that already hold class ids: 0..num_classes-1 kept, every other value -> 255."""
    values = torch.arange(256)
    return torch.where(values < num_classes, values, IGNORE_INDEX).to(torch.uint8)


def id_table(name: str, fmt: str, num_classes: int) -> torch.Tensor:
    """`--id-map`: auto (cityscapes for the official layout, else train), train or cityscapes."""
    if name == "auto":
        name = "cityscapes" if fmt == "cityscapes" else "train"
    if name == "cityscapes":
        table = cityscapes_id_table()
        if int(table[table != IGNORE_INDEX].max()) >= num_classes:
            raise PairError("--id-map", f"cityscapes labelIds map to 19 classes but the palette has {num_classes}: "
                            "use --palette cityscapes")
        return table
    if name == "train":
        return train_id_table(num_classes)
    raise PairError("--id-map", f"unknown id map {name!r}: expected one of {', '.join(ID_MAPS)}")


_TABLES: dict[tuple[bytes, str], torch.Tensor] = {}


def _table_on(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The id table on `device`, copied there once (not a host-to-device copy per batch)."""
    key = (table.numpy().tobytes(), str(device))
    if key not in _TABLES:
        _TABLES[key] = table.to(device)
    return _TABLES[key]


def labels_to_ids(label: torch.Tensor, source: Source, palette: Palette,
                  out_dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Labels on any device -> class ids there: colour masks (..., H, W, 3) by the palette, class-id
    masks (..., H, W) or (..., H, W, 1) by the source's id table. The mapping of every loader."""
    if source.id_table is None:
        return map_colors(label, palette, out_dtype)
    if label.shape[-1] == 1 and label.dim() >= 3:
        label = label[..., 0]
    return _table_on(source.id_table, label.device)[label.to(torch.int64)].to(out_dtype)


# ---------------------------------------------------------------- reading one sample (Pillow)


def check_label_header(path: Path, image: Image.Image, ids: bool) -> tuple[int, int]:
    """A class-id mask must be a lossless 8-bit grayscale PNG; a colour mask an 8-bit RGB JPEG/PNG."""
    if not ids:
        return check_image_header(path, image)
    if image.format != "PNG":
        raise PairError(path, f"class-id mask stored as {image.format}: expected a lossless 8-bit grayscale PNG")
    if image.mode != "L":
        kind = "RGB colour mask" if image.mode == "RGB" else f"mode {image.mode} image"
        raise PairError(path, f"{kind} among class-id masks: expected 8-bit grayscale (mode L) PNG "
                        "(palette PNGs: save their indices as grayscale)")
    check_suffix(path, image)
    return check_pixels(path, image)


def _photo_image(path: Path) -> Image.Image:
    image = open_header(path)
    check_image_header(path, image)
    return image


def _label_image(path: Path, ids: bool, photo_size: tuple[int, int]) -> Image.Image:
    image = open_header(path)
    size = check_label_header(path, image, ids)
    if size != photo_size:
        image.close()
        raise PairError(path, f"mask is {size[0]}x{size[1]} but its photo is {photo_size[0]}x{photo_size[1]}")
    return image


def sample_sizes(sample: Sample, source: Source) -> tuple[tuple[int, int], tuple[int, int]]:
    """(photo (h, w), label (h, w)) from the headers alone (~0.1 ms a file), with the header checks."""
    if sample.label is None:
        h = read_header(sample.photo).height
        return (h, h), (h, h)
    with _photo_image(sample.photo) as photo:
        w, h = photo.size
    _label_image(sample.label, source.ids, (w, h)).close()
    return (h, w), (h, w)


def read_sample(sample: Sample, source: Source) -> tuple[np.ndarray, np.ndarray]:
    """Decode one sample -> (photo (H, W, 3) uint8, label: colour (H, W, 3) or class ids (H, W) uint8),
    both writable. Raises PairError naming the bad file."""
    if sample.label is None:
        _, image = open_pair_image(sample.photo)
        with image:
            return split_pair(np.array(image))  # views of one writable copy
    with _photo_image(sample.photo) as image:
        decode(sample.photo, image)
        photo = np.array(image)
    with _label_image(sample.label, source.ids, (photo.shape[1], photo.shape[0])) as image:
        decode(sample.label, image)
        label = np.array(image)
    return photo, label


def validate_sample(sample: Sample, source: Source, mask_check: MaskCheck | None = None) -> PairInfo:
    """Validate one sample completely (headers, full decode, and a colour mask's colours with
    `mask_check(path, mask)`). Returns the photo's PairInfo (a pair file's: its own size)."""
    if sample.label is None:
        return validate_pair(sample.photo, mask_check)
    photo, label = read_sample(sample, source)
    if mask_check is not None and not source.ids:
        mask_check(sample.label, label)
    return PairInfo(sample.photo, photo.shape[1], photo.shape[0])


# ---------------------------------------------------------------- layouts: detecting and listing


def folder_dirs(root: Path, split: str) -> tuple[Path, Path] | None:
    """(photo folder, mask folder) of a split in the `folders` layout, or None."""
    for masks in MASK_FOLDERS:
        for images_dir, masks_dir in ((root / "images" / split, root / masks / split),
                                      (root / split / "images", root / split / masks)):
            if images_dir.is_dir() and masks_dir.is_dir():
                return images_dir, masks_dir
    return None


def _is_cityscapes(root: Path) -> bool:
    return (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir()


def _is_folders(root: Path) -> bool:
    return any(folder_dirs(root, split) is not None for split in SPLITS)


DESCRIPTIONS = {
    "cityscapes": "the official Cityscapes layout (leftImg8bit/ + gtFine/ labelIds)",
    "folders": "image/mask folders (images/ + masks/, matched by name)",
    "pairs": "Kaggle pairs (photo | colour mask side by side)",
}


def detect_format(root: Path) -> str | None:
    if _is_cityscapes(root):
        return "cityscapes"
    if _is_folders(root):
        return "folders"
    if all((root / split).is_dir() for split in SPLITS):
        return "pairs"
    return None


def _detect_below(root: Path, fmt: str) -> tuple[Path, str, str | None]:
    """`root` or the one folder below it holding a dataset of format `fmt` (auto: any)."""
    def matches(folder: Path) -> str | None:
        found = detect_format(folder)
        return found if fmt in ("auto", found) else None

    found = matches(root)
    if found is not None:
        return root, found, None
    below = sorted(d for d in root.iterdir() if d.is_dir() and matches(d)) if root.is_dir() else []
    if len(below) == 1:
        return below[0], matches(below[0]), f"using {below[0]}: the folder below {root} that holds the dataset"
    pairs_only = fmt == "auto" and below and all(detect_format(d) == "pairs" for d in below)
    if fmt == "pairs" or pairs_only or (fmt == "auto" and not below and any((root / s).is_dir() for s in SPLITS)):
        folder, note = find_dataset_root(root)  # its own one-line errors (missing train/ or val/)
        return folder, "pairs", note
    if fmt == "auto" and not below:
        raise PairError(root, "no dataset here: expected train/ and val/ (Kaggle pairs), images/ + masks/ "
                        "(folders) or leftImg8bit/ + gtFine/ (cityscapes)")
    if below:
        raise PairError(root, f"several folders below it hold a dataset: {', '.join(d.name for d in below)} (pick one)")
    expect = {"cityscapes": "leftImg8bit/ and gtFine/",
              "folders": "images/{train,val}/ and masks/{train,val}/ (or train/images/, train/masks/, ...)"}[fmt]
    raise PairError(root, f"not a {fmt} dataset: expected {expect}")


@dataclass(frozen=True)
class Dataset:
    """A dataset folder and its layout; `note` says what was detected (one line for the user)."""

    root: Path
    format: str
    note: str | None = None

    def samples(self, split: str) -> list[Sample]:
        """The split's samples in a stable order (natural order of names). Raises PairError."""
        if self.format == "pairs":
            return [Sample(p) for p in list_split(self.root, split)]
        if self.format == "folders":
            return list_folders_split(self.root, split)
        return list_cityscapes_split(self.root, split)

    def label_kind(self, samples: Sequence[Sample]) -> str:
        """'colour' or 'ids': pairs are colour, the official layout ids; image/mask folders say so
        by their first mask's mode (RGB: colour, 8-bit grayscale: class ids)."""
        if self.format != "folders":
            return "ids" if self.format == "cityscapes" else "colour"
        first = samples[0].label
        with open_header(first) as image:
            if image.mode == "RGB":
                return "colour"
            if image.mode == "L":
                return "ids"
            raise PairError(first, f"mask of mode {image.mode}: expected an RGB colour mask or an 8-bit grayscale "
                            "(mode L) class-id PNG")

    def source(self, split: str, palette: Palette, id_map: str = "auto",
               samples: Sequence[Sample] | None = None) -> Source:
        """The split (or `samples` of it) as a loader's Source."""
        samples = self.samples(split) if samples is None else samples
        ids = self.label_kind(samples) == "ids" if samples else self.format == "cityscapes"
        table = id_table(id_map, self.format, palette.num_classes) if ids else None
        return Source(tuple(samples), self.format, table)


def find_dataset(path: str | os.PathLike, fmt: str = "auto") -> Dataset:
    """The dataset at `path` (or in the one folder below it) in format `fmt`, or detected (`auto`):
    the note names the layout found. Raises PairError with one line when there is none."""
    if fmt not in ("auto", *FORMATS):
        raise PairError(path, f"unknown format {fmt!r}: expected auto or one of {', '.join(FORMATS)}")
    root = Path(path)
    if not root.is_dir():
        raise PairError(root, "dataset folder not found")
    folder, found, note = _detect_below(root, fmt)
    if fmt == "auto":
        said = f"{DESCRIPTIONS[found]} (--format {found})"
        note = f"{note}: {said}" if note else f"{folder}: {said}"
    return Dataset(folder, found, note)


def _images_in(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=natural_key)


def list_folders_split(root: Path, split: str) -> list[Sample]:
    dirs = folder_dirs(root, split)
    if dirs is None:
        raise PairError(root / "images" / split, f"missing split folder (expected images/{split}/ and masks/{split}/,"
                        f" or {split}/images/ and {split}/masks/)")
    images_dir, masks_dir = dirs
    photos = _images_in(images_dir)
    if not photos:
        raise PairError(images_dir, "empty split: no .jpg/.jpeg/.png files")
    masks: dict[str, Path] = {}
    for mask in _images_in(masks_dir):
        if mask.stem in masks:
            raise PairError(mask, f"two masks named {mask.stem}: {masks[mask.stem].name} and {mask.name}")
        masks[mask.stem] = mask
    samples, seen = [], {}
    for photo in photos:
        if photo.stem in seen:
            raise PairError(photo, f"two photos named {photo.stem}: {seen[photo.stem].name} and {photo.name}")
        seen[photo.stem] = photo
        if photo.stem not in masks:
            raise PairError(photo, f"no mask named {photo.stem}.png in {masks_dir}")
        samples.append(Sample(photo, masks[photo.stem]))
    return samples


def list_cityscapes_split(root: Path, split: str) -> list[Sample]:
    photo_dir, label_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    for folder in (photo_dir, label_dir):
        if not folder.is_dir():
            raise PairError(folder, f"missing split folder (expected {folder.parent.name}/{split}/CITY/)")
    samples = []
    for city in sorted(d for d in photo_dir.iterdir() if d.is_dir()):
        for photo in sorted(city.glob(f"*{PHOTO_SUFFIX}")):
            label = label_dir / city.name / (photo.name[: -len(PHOTO_SUFFIX)] + LABEL_SUFFIX)
            if not label.exists() and not label.is_symlink():
                raise PairError(label, f"missing label of {photo.name} (expected gtFine/{split}/{city.name}/"
                                f"{label.name})")
            samples.append(Sample(photo, label))
    if not samples:
        raise PairError(photo_dir, f"empty split: no CITY/*{PHOTO_SUFFIX} files")
    return samples


def validate_samples(source: Source, workers: int = 4, mask_check: MaskCheck | None = None
                     ) -> tuple[list[tuple[Sample, PairInfo]], list[PairError]]:
    """Validate every sample in a thread pool (Pillow decodes outside the GIL): ([(sample, info)], errors)."""

    def check(sample: Sample) -> PairInfo | PairError:
        try:
            return validate_sample(sample, source, mask_check)
        except PairError as e:
            return e

    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(pool.map(check, source))
    good = [(s, r) for s, r in zip(source, results, strict=True) if isinstance(r, PairInfo)]
    return good, [r for r in results if isinstance(r, PairError)]
