"""Randomness, textures and buffers: the low-level helpers every drawing step shares (a block-drawing
RNG wrapper, texture tiles cropped per scene, per-thread full-image buffers, a fast x mod 1)."""

from __future__ import annotations

import functools
import itertools
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from PIL import Image

RGB = tuple[float, float, float]
T = TypeVar("T")
_AMP_MAX = 0.5  # largest texture amplitude, relative to a region's base colour


class _Rand:
    """Uniforms from a numpy Generator drawn 512 at a time: a Generator call costs ~1.5 µs and a
    scene needs hundreds of draws. Deterministic given the Generator's state."""

    def __init__(self, rng: np.random.Generator) -> None:
        blocks = iter(lambda: rng.random(512).tolist(), None)  # endless: a list is never None
        self.random = itertools.chain.from_iterable(blocks).__next__  # a float in [0, 1)

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * self.random()

    def integers(self, lo: int, hi: int) -> int:
        """An int in [lo, hi)."""
        return lo + int(self.random() * (hi - lo))

    def choice(self, seq: Sequence[T]) -> T:
        return seq[int(self.random() * len(seq))]

    def normal(self, sd: float) -> float:
        return sd * math.sqrt(-2.0 * math.log(1.0 - self.random())) * math.cos(2 * math.pi * self.random())


@dataclass(frozen=True)
class _Tiles:
    """Per size, built once: cropped at random offsets per scene instead of drawing pixel noise.
    Scaled so that a region's amplitude byte (0..255 for 0.._AMP_MAX) multiplies them directly."""

    coords: np.ndarray  # (S,) float32 pixel centres 0.5, 1.5, ...
    smooth: np.ndarray  # (2S, 2S) float32 low-frequency noise
    grain: np.ndarray  # (2S, 2S) float32 pixel noise


@functools.lru_cache(maxsize=4)
def _tiles(size: int) -> _Tiles:
    rng = np.random.default_rng(20240917)  # fixed: the textures are part of the generator version
    big = 2 * size
    smooth = np.zeros((big, big), np.float32)
    for cells, weight in ((4, 1.0), (8, 0.7), (16, 0.5), (32, 0.35), (64, 0.25)):
        coarse = rng.standard_normal((cells, cells)).astype(np.float32)
        img = Image.fromarray(coarse, mode="F").resize((big, big), Image.Resampling.BICUBIC)
        smooth += weight * np.asarray(img, dtype=np.float32)
    smooth *= _AMP_MAX / 255 / smooth.std()
    grain = rng.standard_normal((big, big), dtype=np.float32) * np.float32(_AMP_MAX / 255)
    return _Tiles(np.arange(size, dtype=np.float32) + 0.5, smooth, grain)


class _Work:
    """Full-image buffers reused from scene to scene (one set per thread and size)."""

    def __init__(self, s: int) -> None:
        self.region = np.zeros((s, s), np.uint8)
        self.f1 = np.empty((s, s), np.float32)
        self.f2 = np.empty((s, s), np.float32)
        self.idx = np.empty((s, s), np.intp)
        self.mask32 = np.empty((s, s), "<u4")  # RGBX: mask colour + smooth-texture amplitude
        self.base32 = np.empty((s, s), "<u4")  # photo base colour + grain amplitude
        self.photo = np.empty((3, s, s), np.float32)  # planar: numpy's loops prefer long rows
        self.tmp3 = np.empty((3, s, s), np.float32)
        self.pair = np.empty((3, s, 2 * s), np.uint8)  # planar photo | mask, for Image.merge


_LOCAL = threading.local()


def _work(size: int) -> _Work:
    cache = _LOCAL.__dict__.setdefault("work", {})
    if size not in cache:
        cache[size] = _Work(size)
    return cache[size]


def _frac(x: np.ndarray) -> np.ndarray:
    """x mod 1 for x of any sign; np.mod is ~40x slower (fmod with sign fix-ups)."""
    return x - np.floor(x)
