"""Cityscapes label colours -> train ids, and nearest-colour mapping of RGB masks to class ids.

The label table comes from `cityscapesscripts` (34 labels with id >= 0): each label colour is a class
centre mapped to its trainId (19 train classes) or to 255 (void). Two labels share a colour with
different trainIds (pole / polegroup): ties go to the lowest centre index, which is the train class.

Mapping (`map_colors`, what the loaders use) goes through `kernels/mask_to_class.py`: the Triton
kernel on a GPU, or a 2^24-entry lookup table (one byte per RGB colour; a gather per pixel, ~100x
faster than the reference on CPU) that this module builds once with the kernel's torch reference
and caches on disk (`lookup_table`). `map_colors_reference` is that reference on (..., 3) pixels.
Integer-valued centres keep every squared distance an exact float32 integer, so the two paths (and
the Triton kernel in `kernels/mask_to_class.py`) can never disagree on rounding.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from cityscapesscripts.helpers.labels import labels as CITYSCAPES_LABELS

from cityseg.errors import OutputError
from cityseg.options import read_palette_file
from cityseg.outputs import atomic_file, atomic_write, cache_dir, ensure_dir
from cityseg.progress import stage
from kernels.mask_to_class import build_lut, mask_to_class, mask_to_class_lut, mask_to_class_reference

IGNORE_INDEX = 255


@dataclass(frozen=True)
class Palette:
    """Class centres in RGB and what they mean."""

    centers: torch.Tensor  # (K, 3) float32, integer-valued RGB colours
    classes: torch.Tensor  # (K,) int64, class id of each centre (IGNORE_INDEX for void)
    names: tuple[str, ...]  # class name of each class id 0..num_classes-1
    colors: torch.Tensor  # (num_classes, 3) uint8, the colour drawn for each class id
    max_dist: float | None = None  # pixels farther than this from every centre map to IGNORE_INDEX

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def to_state(self) -> dict:
        """Plain tensors, lists and numbers: what a weights-only checkpoint may hold."""
        return {"centers": self.centers, "classes": self.classes, "names": list(self.names), "colors": self.colors,
                "max_dist": self.max_dist}

    @classmethod
    def from_state(cls, s: dict) -> Palette:
        """Inverse of `to_state`; raises ValueError when the parts do not fit together."""
        centers = torch.as_tensor(s["centers"], dtype=torch.float32).reshape(-1, 3)
        classes = torch.as_tensor(s["classes"], dtype=torch.int64)
        colors = torch.as_tensor(s["colors"], dtype=torch.uint8).reshape(-1, 3)
        names = tuple(str(n) for n in s["names"])
        if classes.shape != (centers.shape[0],) or colors.shape[0] != len(names) or not names:
            raise ValueError(f"{centers.shape[0]} centres, {classes.numel()} class ids, {len(names)} names, "
                             f"{colors.shape[0]} colours")
        return cls(centers, classes, names, colors, s["max_dist"])

    def key(self) -> str:
        """A short hash identifying the mapping (centres, classes, max_dist): names the LUT cache."""
        h = hashlib.sha1(self.centers.numpy().tobytes())
        h.update(self.classes.numpy().tobytes())
        h.update(repr(self.max_dist).encode())
        return h.hexdigest()[:16]


def save_palette(palette: Palette, path: str | Path) -> None:
    """Write the palette as JSON, `to_state` as lists (atomically: a run folder never holds half one)."""
    path = Path(path)
    state = {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in palette.to_state().items()}
    ensure_dir(path.parent, "folder of the palette file")
    atomic_write(path, json.dumps(state, indent=1), "palette file")


def load_palette(path: str | Path) -> Palette:
    """Read a palette written by `save_palette`, checked (`options.palette_problem`): a bad file is
    one OptionError naming it."""
    data = read_palette_file(Path(path))
    return Palette.from_state({**data, "max_dist": data.get("max_dist")})


def cityscapes_palette(max_dist: float | None = None) -> Palette:
    """The 34 Cityscapes label colours as centres, 19 train classes, void -> 255."""
    labels = [lab for lab in CITYSCAPES_LABELS if lab.id >= 0]  # drops 'license plate' (id -1)
    centers = torch.tensor([lab.color for lab in labels], dtype=torch.float32)
    classes = torch.tensor([lab.trainId for lab in labels], dtype=torch.int64)
    train = sorted({lab.trainId: lab for lab in reversed(labels) if lab.trainId != IGNORE_INDEX}.items())
    names = tuple(lab.name for _, lab in train)
    colors = torch.tensor([lab.color for _, lab in train], dtype=torch.uint8)
    return Palette(centers, classes, names, colors, max_dist)


def map_colors_reference(
    rgb: torch.Tensor, centers: torch.Tensor, classes: torch.Tensor, max_dist: float | None = None
) -> torch.Tensor:
    """RGB (..., 3) uint8 -> class ids (...) int64 by nearest centre; ties -> lowest centre index."""
    if rgb.shape[-1] != 3:
        raise ValueError(f"expected (..., 3) RGB values, got shape {tuple(rgb.shape)}")
    pixels = rgb.reshape(1, -1, 1, 3)
    return mask_to_class_reference(pixels, centers, classes, max_dist).reshape(rgb.shape[:-1])


_LUTS: dict[tuple[str, str], torch.Tensor] = {}  # (palette key, device) -> table
LUT_FORMAT = b"cityseg-lut 1"  # the first line of a cached table; bump when the file layout changes
LUT_SIZE = 1 << 24
SPOT_CHECKS = 1 << 16  # random colours compared with the reference on every load (a few ms)
# The SHA-256 of the table `build_lut` makes for the stock palettes, by palette key. A cached table of
# these palettes must be exactly that table: a header is easy to rewrite, and a random spot check
# misses a handful of wrong entries most of the time. tests/test_lut_cache.py builds the table and
# checks the pin (a change to the builder's output fails there, not here at a user's).
BUILT_TABLE_SHA256 = {
    "e426b7f7e4f4fe9b": "5216ef1f76adc19b96fbbad0c381cb1e669ac859653b3b4926ed460534b4fc04",  # cityscapes
}
_SAID: set[str] = set()  # cache notes already printed by this process


def lookup_table(palette: Palette, device: torch.device | str = "cpu") -> torch.Tensor:
    """The palette's (2^24,) uint8 table on `device`: built on first use (a few seconds, kernels'
    `build_lut`), cached on disk under $CITYSEG_CACHE and in memory, one copy per device."""
    key = (palette.key(), str(torch.device(device)))
    if key not in _LUTS:
        cpu = (palette.key(), "cpu")
        if cpu not in _LUTS:
            _LUTS[cpu] = _load_or_build_lut(palette, cache_dir() / f"lut-{palette.key()}.bin")
        _LUTS[key] = _LUTS[cpu].to(device)
    return _LUTS[key]


@functools.cache
def _builder_digest() -> str:
    """What builds a table: the source of kernels/mask_to_class.py (build_lut and the reference it
    runs) and the file layout. A new version of either makes every older cached table stale."""
    import kernels.mask_to_class as builder

    return hashlib.sha256(LUT_FORMAT + Path(builder.__file__).read_bytes()).hexdigest()


def _content_digest(table: np.ndarray) -> str:
    return hashlib.sha256(table.tobytes()).hexdigest()


def _lut_header(palette: Palette, table: np.ndarray) -> bytes:
    return _header_line(palette, _content_digest(table))


def _header_line(palette: Palette, content_digest: str) -> bytes:
    """The first line of a cached table: what built it (code and palette) and its content's digest."""
    made_by = hashlib.sha256(f"{_builder_digest()} {palette.key()}".encode()).hexdigest()
    return LUT_FORMAT + f" {made_by} {content_digest}\n".encode()


def _read_cached_lut(palette: Palette, path: Path) -> tuple[np.ndarray | None, str]:
    """(the verified table, "") or (None, why it is not usable). Verified: the header names this code
    and palette, the content matches its digest, and random colours map as the reference maps them
    (a table written by someone else with a matching digest is still caught: every entry for the
    stock palettes, whose whole table's digest is pinned, random ones for the others)."""
    try:
        with open(path, "rb") as f:
            header = f.readline(256)
            table = np.frombuffer(f.read(LUT_SIZE + 1), dtype=np.uint8)
    except FileNotFoundError:
        return None, ""
    except OSError as e:
        return None, f"unreadable ({e.strerror or e})"
    if not header.startswith(LUT_FORMAT) or table.size != LUT_SIZE:
        return None, "not a lookup table of this version (corrupt or truncated)"
    digest = _content_digest(table)  # 16 MB: hashed once, for the header and the pin
    if header != _header_line(palette, digest):
        return None, "built by another version or for another palette, or corrupt"
    pinned = BUILT_TABLE_SHA256.get(palette.key())
    if pinned is not None and digest != pinned:
        return None, "its content differs from the table the builder makes (tampered with)"
    if not _agrees_with_reference(table, palette):
        return None, "its classes differ from the reference mapping (tampered with)"
    return table, ""


def _agrees_with_reference(table: np.ndarray, palette: Palette) -> bool:
    """Random colours (unpredictable: drawn from the OS each time) plus every centre's colour map to
    the same class in `table` as in the reference."""
    rng = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))
    codes = rng.integers(0, LUT_SIZE, SPOT_CHECKS)
    c = palette.centers.to(torch.int64).numpy()
    codes = np.concatenate([codes, (c[:, 0] << 16) | (c[:, 1] << 8) | c[:, 2]])
    rgb = torch.from_numpy(np.stack([codes >> 16, (codes >> 8) & 255, codes & 255], axis=1).astype(np.uint8))
    want = map_colors_reference(rgb, palette.centers, palette.classes, palette.max_dist).numpy()
    return bool(np.array_equal(table[codes], want.astype(np.uint8)))


def _say_once(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        print(f"note: {message}", file=sys.stderr, flush=True)


def _load_or_build_lut(palette: Palette, path: Path) -> torch.Tensor:
    table, problem = _read_cached_lut(palette, path)
    if table is not None:
        return torch.from_numpy(table.copy())
    with stage(f"colour lookup table: building it for {path}", "once: later runs read it; ~1-3 s"):
        table = build_lut(palette.centers, palette.classes, palette.max_dist).numpy()
    if problem:
        _say_once(f"{path}: cached colour lookup table {problem}: rebuilt")
    ensure_dir(path.parent, "cache folder ($CITYSEG_CACHE, default ~/.cache/cityseg)")
    try:
        with atomic_file(path) as f:  # DataLoader workers racing to build it never read half a file
            f.write(_lut_header(palette, table))
            f.write(table.tobytes())
    except IsADirectoryError:  # a folder holds the name: keep it, use the table from memory
        _say_once(f"{path}: a folder is in the way of the colour lookup table: used without caching it")
    except OSError as e:
        raise OutputError(f"{path}: cannot write the colour lookup table into the cache folder "
                          f"($CITYSEG_CACHE): {e.strerror or e}") from None
    return torch.from_numpy(table)


@functools.cache
def _triton_runs_on(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (7, 0)


def map_colors(mask: torch.Tensor, palette: Palette, out_dtype: torch.dtype = torch.int64,
               layout: str = "nhwc") -> torch.Tensor:
    """Masks (N, H, W, 3) / (H, W, 3) uint8 (or channels-first with layout="nchw"), any strides ->
    class ids on the mask's device: the Triton kernel on GPUs it supports (compute capability 7.0+),
    the lookup table everywhere else. How every loader and `predict` map masks."""
    p = palette
    if _triton_runs_on(mask.device):
        return mask_to_class(mask, p.centers, p.classes, p.max_dist, out_dtype=out_dtype, layout=layout)
    return mask_to_class_lut(mask, lookup_table(p, mask.device), out_dtype=out_dtype, layout=layout)


def map_colors_lut(rgb: torch.Tensor, palette: Palette, out_dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """RGB (..., 3) uint8 -> class ids (...) by table lookup; equals `map_colors_reference`."""
    if rgb.dtype != torch.uint8 or rgb.shape[-1] != 3:
        raise ValueError(f"expected (..., 3) uint8 RGB, got {rgb.dtype} {tuple(rgb.shape)}")
    flat = rgb.reshape(1, -1, 1, 3) if rgb.dim() != 4 else rgb
    return mask_to_class_lut(flat, lookup_table(palette, rgb.device), out_dtype=out_dtype).reshape(rgb.shape[:-1])


def colorize(class_ids: torch.Tensor, palette: Palette) -> torch.Tensor:
    """Class ids (...) -> RGB (..., 3) uint8 in the palette's colours; ignore (255) drawn black."""
    table = torch.zeros(256, 3, dtype=torch.uint8)
    table[: palette.num_classes] = palette.colors
    return table[class_ids.to(torch.int64).clamp(0, 255)]


def far_share(rgb: torch.Tensor, palette: Palette, max_dist: float) -> float:
    """Share of pixels of `rgb` (..., 3) uint8 farther than `max_dist` from every centre of `palette`
    (void colours count as near: they are real palette colours). Measured on the distinct colours
    (a mask holds a few thousand at most) through the reference: no 2^24-entry table per distance."""
    codes = rgb.reshape(-1, 3).to(torch.int32)
    if codes.shape[0] == 0:
        return float("nan")
    colours, counts = torch.unique((codes[:, 0] << 16) | (codes[:, 1] << 8) | codes[:, 2], return_counts=True)
    rgb_unique = torch.stack([colours >> 16, (colours >> 8) & 255, colours & 255], dim=1).to(torch.uint8)
    near_all = torch.zeros_like(palette.classes)
    far = map_colors_reference(rgb_unique, palette.centers, near_all, max_dist) == IGNORE_INDEX
    return counts[far].sum().item() / codes.shape[0]
