"""Cityscapes label colours -> train ids, and nearest-colour mapping of RGB masks to class ids.

The label table comes from `cityscapesscripts` (34 labels with id >= 0): each label colour is a class
centre mapped to its trainId (19 train classes) or to 255 (void). Two labels share a colour with
different trainIds (pole / polegroup): ties go to the lowest centre index, which is the train class.

Two implementations that agree exactly:
- `map_colors_reference`: plain torch, squared RGB distance to every centre, argmin (the torch
  reference of `kernels/mask_to_class.py`, shared).
- `map_colors_lut`: a 2^24-entry lookup table (one byte per RGB colour) built once with the
  reference and cached on disk; a gather per pixel, ~100x faster on CPU.
Integer-valued centres keep every squared distance an exact float32 integer, so the two paths (and
the Triton kernel in `kernels/mask_to_class.py`) can never disagree on rounding.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from cityscapesscripts.helpers.labels import labels as CITYSCAPES_LABELS

from cityseg.errors import OutputError
from cityseg.outputs import ensure_dir

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
    from kernels.mask_to_class import mask_to_class_reference  # the one torch reference; lazy: triton

    pixels = rgb.reshape(1, -1, 1, 3)
    return mask_to_class_reference(pixels, centers, classes, max_dist).reshape(rgb.shape[:-1])


def _cache_dir() -> Path:
    return Path(os.environ.get("CITYSEG_CACHE", Path.home() / ".cache" / "cityseg"))


def build_lut(palette: Palette) -> torch.Tensor:
    """All 2^24 colours through the reference: a (2^24,) uint8 table indexed by r<<16 | g<<8 | b."""
    codes = torch.arange(1 << 24, dtype=torch.int64)
    rgb = torch.stack([codes >> 16, (codes >> 8) & 255, codes & 255], dim=1).to(torch.uint8)
    return map_colors_reference(rgb, palette.centers, palette.classes, palette.max_dist).to(torch.uint8)


_LUTS: dict[str, torch.Tensor] = {}


def lookup_table(palette: Palette) -> torch.Tensor:
    """The palette's (2^24,) uint8 LUT, built on first use (a few seconds) and cached on disk."""
    if palette.classes.max() > 255 or palette.classes.min() < 0:
        raise ValueError("class ids must fit in a byte for the lookup table")
    key = palette.key()
    if key not in _LUTS:
        _LUTS[key] = _load_or_build_lut(palette, _cache_dir() / f"lut-{key}.npy")
    return _LUTS[key]


def _load_or_build_lut(palette: Palette, path: Path) -> torch.Tensor:
    if path.exists():
        table = np.load(path)
        if table.shape == (1 << 24,) and table.dtype == np.uint8:
            return torch.from_numpy(table)
    table = build_lut(palette).numpy()
    ensure_dir(path.parent, "cache folder ($CITYSEG_CACHE, default ~/.cache/cityseg)")
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, table)
        os.replace(tmp, path)  # atomic: DataLoader workers racing to build it never read half a file
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write the colour lookup table into the cache folder "
                          f"($CITYSEG_CACHE): {e.strerror or e}") from None
    return torch.from_numpy(table)


def map_colors_lut(rgb: torch.Tensor, palette: Palette, out_dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """RGB (..., 3) uint8 on CPU -> class ids (...) by table lookup; equals `map_colors_reference`."""
    if rgb.dtype != torch.uint8 or rgb.shape[-1] != 3:
        raise ValueError(f"expected (..., 3) uint8 RGB, got {rgb.dtype} {tuple(rgb.shape)}")
    from kernels.mask_to_class import mask_to_class_lut  # the tuned gather; lazy: it imports triton

    flat = rgb.reshape(1, -1, 1, 3) if rgb.dim() != 4 else rgb
    return mask_to_class_lut(flat, palette.centers, palette.classes, palette.max_dist, out_dtype=out_dtype).reshape(
        rgb.shape[:-1]
    )


def colorize(class_ids: torch.Tensor, palette: Palette) -> torch.Tensor:
    """Class ids (...) -> RGB (..., 3) uint8 in the palette's colours; ignore (255) drawn black."""
    table = torch.zeros(256, 3, dtype=torch.uint8)
    table[: palette.num_classes] = palette.colors
    return table[class_ids.to(torch.int64).clamp(0, 255)]


def far_share(rgb: torch.Tensor, palette: Palette, max_dist: float) -> float:
    """Share of pixels of `rgb` (..., 3) uint8 farther than `max_dist` from every centre of `palette`
    (void colours count as near: they are real palette colours)."""
    probe = Palette(palette.centers, torch.zeros_like(palette.classes), ("near",), palette.colors[:1], max_dist)
    return (map_colors_lut(rgb, probe, torch.uint8) == IGNORE_INDEX).float().mean().item()
