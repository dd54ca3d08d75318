"""The Kaggle "cityscapes-image-pairs" format: DIR/{train,val}/N.jpg, each W x H = 2H x H with the
photo in the left half and its colour-coded mask in the right half.

Every problem with the input becomes a `PairError` whose message is one line, `PATH: problem`, so
the CLI can print it as is instead of a traceback from deep inside a decoder.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from cityseg.config import SPLITS
from cityseg.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MAX_PIXELS = 64_000_000  # far above any real pair; stops a forged header from allocating gigabytes

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not decode as grey
Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # Pillow errors past 2x this, and we check 1x ourselves


class PairError(UserError):
    """A bad input file or folder. str(error) is the one-line message `PATH: problem`."""

    def __init__(self, path: str | os.PathLike, problem: str | None = None) -> None:
        if problem is None:
            # A DataLoader worker's error comes back as PairError(<formatted traceback>): recover
            # "PATH: problem" from its last line so the user still gets one line.
            message = str(path).strip().splitlines()[-1].split("PairError: ", 1)[-1]
            path, _, problem = message.partition(": ")
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def natural_key(path: Path) -> tuple[int, int | str]:
    # Kaggle names are 1.jpg .. 2975.jpg: sort them as numbers, anything else after by name. ASCII
    # digits only: str.isdigit() is also true for '²' or '٣', which int() then rejects or misreads.
    stem = path.stem
    return (0, int(stem)) if stem.isascii() and stem.isdigit() else (1, path.name)


def find_dataset_root(path: str | os.PathLike) -> tuple[Path, str | None]:
    """The folder holding train/ and val/: `path` itself, or the one folder below it that does (the
    Kaggle archive unpacks to cityscapes_data/ with train/, val/ and a nested copy of both). Returns
    (folder, a note saying which one was picked, or None)."""
    root = Path(path)
    if not root.is_dir():
        raise PairError(root, "dataset folder not found")
    if all((root / split).is_dir() for split in SPLITS):
        return root, None
    below = sorted(d for d in root.iterdir() if d.is_dir() and all((d / s).is_dir() for s in SPLITS))
    if len(below) == 1:
        return below[0], f"using {below[0]}: the folder below {root} that holds train/ and val/"
    missing = next(s for s in SPLITS if not (root / s).is_dir())
    hint = f"; folders below it that hold both: {', '.join(d.name for d in below)} (pick one)" if below else ""
    raise PairError(root / missing, f"missing split folder (expected {missing}/ with the image pairs{hint})")


def list_split(root: str | os.PathLike, split: str) -> list[Path]:
    """The image files of `root/split`, in natural order. Raises PairError for a missing/empty split."""
    folder = Path(root) / split
    if not Path(root).is_dir():
        raise PairError(root, "dataset folder not found")
    if not folder.is_dir():
        raise PairError(folder, f"missing split folder (expected {split}/ with the image pairs)")
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise PairError(folder, "empty split: no .jpg/.jpeg/.png files")
    return sorted(files, key=natural_key)


def check_readable(path: Path) -> None:
    if path.is_symlink() and not path.exists():
        raise PairError(path, "broken symbolic link")
    if path.is_dir():
        raise PairError(path, "is a directory, not an image")
    try:
        st = path.stat()
    except OSError as e:
        raise PairError(path, f"cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise PairError(path, "not a regular file")
    if st.st_size == 0:
        raise PairError(path, "empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise PairError(path, "cannot read: permission denied")


_MODE_PROBLEMS = {
    "L": "grayscale image, expected 8-bit RGB",
    "LA": "grayscale image with alpha, expected 8-bit RGB",
    "1": "1-bit image, expected 8-bit RGB",
    "CMYK": "CMYK image, expected 8-bit RGB",
    "I;16": "16-bit image, expected 8-bit RGB",
    "I;16B": "16-bit image, expected 8-bit RGB",
    "I": "32-bit integer image, expected 8-bit RGB",
    "F": "floating-point image, expected 8-bit RGB",
    "P": "palette (indexed-colour) image, expected 8-bit RGB",
    "RGBA": "RGBA image with alpha, expected 8-bit RGB",
    "YCbCr": "YCbCr image, expected 8-bit RGB",
}


@dataclass(frozen=True)
class PairInfo:
    path: Path
    width: int
    height: int


def check_image_header(path: Path, image: Image.Image) -> tuple[int, int]:
    """Format, mode and size checks of an 8-bit RGB JPEG/PNG (a pair file, a photo, a colour mask)
    that need only the header. Returns (width, height)."""
    if image.format not in ("JPEG", "PNG"):
        raise PairError(path, f"unsupported format {image.format}, expected JPEG or PNG")
    if image.mode != "RGB":
        raise PairError(path, _MODE_PROBLEMS.get(image.mode, f"mode {image.mode}, expected 8-bit RGB"))
    check_suffix(path, image)
    return check_pixels(path, image)


def check_suffix(path: Path, image: Image.Image) -> None:
    suffix = path.suffix.lower()
    if (image.format == "PNG") != (suffix == ".png"):
        raise PairError(path, f"file holds {image.format} data but is named {suffix}: rename it to match")


def check_pixels(path: Path, image: Image.Image) -> tuple[int, int]:
    w, h = image.size
    if w * h > MAX_PIXELS:
        raise PairError(path, f"image too large ({w}x{h} pixels, limit {MAX_PIXELS:,})")
    return w, h


def check_header(path: Path, image: Image.Image) -> PairInfo:
    """Format, mode and shape checks of a pair file that need only the header."""
    w, h = check_image_header(path, image)
    if w != 2 * h:
        raise PairError(
            path, f"wrong shape {w}x{h}: expected width = 2 x height (photo left, mask right), e.g. 512x256"
        )
    return PairInfo(path, w, h)


def open_header(path: Path) -> Image.Image:
    """Open a file's image header (lazily: no pixels decoded). Raises PairError."""
    check_readable(path)
    try:
        return Image.open(path)
    except UnidentifiedImageError:
        raise PairError(path, "not an image (unrecognised or corrupt header)") from None
    except Image.DecompressionBombError:
        raise PairError(path, f"image too large (over {MAX_PIXELS:,} pixels)") from None
    except OSError as e:  # Pillow reports a cut-off header as OSError("Truncated File Read")
        raise PairError(path, f"corrupt or truncated image header ({e})") from None


def read_header(path: str | os.PathLike) -> PairInfo:
    """The checks that need only the file and its header (~0.1 ms): everything but a full decode."""
    path = Path(path)
    with open_header(path) as image:
        return check_header(path, image)


def open_pair_image(path: str | os.PathLike) -> tuple[PairInfo, Image.Image]:
    """Open and fully decode one pair file, validating it. Raises PairError with a one-line message."""
    path = Path(path)
    image = open_header(path)
    info = check_header(path, image)
    decode(path, image)
    return info, image


def decode(path: Path, image: Image.Image) -> None:
    """Decode an opened image's pixels; a corrupt or cut-off file is a PairError naming it."""
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise PairError(path, f"corrupt or truncated image data ({e})") from None


MaskCheck = Callable[[Path, np.ndarray], None]


def validate_pair(path: str | os.PathLike, mask_check: MaskCheck | None = None) -> PairInfo:
    """Validate one pair file completely (header and full decode), and optionally its mask colours
    with `mask_check(path, mask)`, which raises PairError."""
    info, image = open_pair_image(path)
    if mask_check is not None:
        mask_check(info.path, split_pair(np.asarray(image))[1])
    image.close()
    return info


def read_pair(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Decode one pair file -> (photo, mask), each H x H x 3 uint8 (views into one array)."""
    info, image = open_pair_image(path)
    pixels = np.asarray(image)
    return split_pair(pixels)


def split_pair(pixels: np.ndarray | torch.Tensor) -> tuple:
    """H x 2H x 3 -> (photo, mask) halves, as views (no copy)."""
    w = pixels.shape[1]
    return pixels[:, : w // 2], pixels[:, w // 2 :]


def validate_files(
    files: Sequence[Path], workers: int = 4, mask_check: MaskCheck | None = None
) -> tuple[list[PairInfo], list[PairError]]:
    """Validate many files in a thread pool (Pillow decodes outside the GIL)."""

    def check(path: Path) -> PairInfo | PairError:
        try:
            return validate_pair(path, mask_check)
        except PairError as e:
            return e

    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(pool.map(check, files))
    good = [r for r in results if isinstance(r, PairInfo)]
    bad = [r for r in results if isinstance(r, PairError)]
    return good, bad


def shared_files(a: Sequence[Path], b: Sequence[Path]) -> int:
    """How many files of `b` are also in `a` once links are resolved (e.g. val/ a link to train/)."""
    resolved = {os.path.realpath(p) for p in a}
    return sum(os.path.realpath(p) in resolved for p in b)


def overlap_warning(train: Sequence[Path], val: Sequence[Path]) -> str | None:
    shared = shared_files(train, val)
    if not shared:
        return None
    return (f"warning: {shared} of the {len(val)} val files are also train files (links or the same folder): "
            "validation on them flatters the model")
