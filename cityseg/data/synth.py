"""Procedural Cityscapes-like street scenes as Kaggle-format pairs (photo | colour-coded mask).

The embedded default data: `cityseg-fast train` with no `--data` trains on `default_dataset()`, so
the project runs end to end without a download. Each scene is a random street seen by a pinhole
camera at height `cam_h` over a flat road: a ground point at depth z metres lies on row
y_h + cam_h * f / z, and something `w` metres wide there is `w * ax * f / z` pixels wide (`ax` = 0.5
because Kaggle squeezed 2048x1024 frames into 256x256).

Everything is painted far to near as a *region* id into one uint8 map. A region carries its exact
Cityscapes label colour (mask) and its own photo colour and texture amplitudes (photo); shadows and
paving joints are darker twin regions of the ground they fall on. The mask is then one table
lookup, and the photo a lookup times texture and light, blurred: photo colour depends on the
object, the scene light and the texture, not on the class alone.

Speed (≥ 200 pairs/s on one core, JPEG included): shapes are boolean masks over their own small
bounding box; long structures (ground bands, facades, skyline) are drawn once per side with
per-column tables; per-pixel work runs in preallocated buffers (fresh large temporaries cost page
faults); random numbers are drawn from numpy in blocks.

    from cityseg.data.synth import write_dataset
    write_dataset(Path("data/synth"), n_train=2000, n_val=200, seed=0, workers=4)
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import math
import multiprocessing
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np
from cityscapesscripts.helpers.labels import labels as CITYSCAPES_LABELS
from PIL import Image

from cityseg.errors import OutputError
from cityseg.outputs import ensure_dir

GENERATOR_VERSION = 1  # bump whenever the output pixels change: it names the cache folder
JPEG_QUALITY = 95  # the Kaggle files carry libjpeg's standard tables scaled to quality 95
JPEG_SUBSAMPLING = "4:2:0"  # as the Kaggle files: mask colours bleed at edges as theirs do
SPLITS = ("train", "val")
MARKER = "synth.json"  # written last: a folder without it is an interrupted generation
PARTIAL = "synth.partial"  # written first: a folder with it is ours, if not (yet) complete

# Exact label colours by name; 'license plate' (id -1) shares car's colour and is left out.
LABEL_COLORS: dict[str, tuple[int, int, int]] = {lab.name: tuple(lab.color) for lab in CITYSCAPES_LABELS if lab.id >= 0}

_LABEL_CODES = {name: r | (g << 8) | (b << 16) for name, (r, g, b) in LABEL_COLORS.items()}  # RGBX bytes

RGB = tuple[float, float, float]
T = TypeVar("T")
_MAX_REGIONS = 256  # region ids are uint8
_AMP_MAX = 0.5  # largest texture amplitude, relative to a region's base colour


# ---------------------------------------------------------------------------------------------
# Randomness, textures and buffers.


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


# ---------------------------------------------------------------------------------------------
# Camera, canvas and primitives.


@dataclass(frozen=True)
class _Camera:
    size: int
    y_h: float  # horizon row
    x_v: float  # vanishing-point column
    cam_h: float  # camera height above the road, metres
    f: float  # vertical focal length, pixels
    ax: float = 0.5  # horizontal / vertical pixel scale

    def t(self, z: float) -> float:
        """Vertical pixels per metre at depth z."""
        return self.f / z

    def x(self, lateral: float, z: float) -> float:
        return self.x_v + lateral * self.ax * self.f / z

    def y(self, h: float, z: float) -> float:
        return self.y_h + (self.cam_h - h) * self.f / z


class _Box(NamedTuple):
    y0: int
    y1: int
    x0: int
    x1: int
    m: np.ndarray | None  # (y1-y0, x1-x0) bool inside the box; None = the whole box


class _Canvas:
    """Region map plus per-region tables; region 0 is the sky that everything covers."""

    def __init__(self, cam: _Camera, tiles: _Tiles, work: _Work) -> None:
        self.cam = cam
        self.c = tiles.coords
        self.work = work
        self.region = work.region
        self.region.fill(0)
        # Per region, as lists (a numpy item write costs ~1 µs; tables() converts them once).
        self.labels: list[str] = []
        self.rgb: list[RGB] = []  # photo base colour before the scene's light
        self.amps: list[tuple[float, float]] = []  # smooth and grain texture amplitudes
        self.shadow = np.arange(_MAX_REGIONS, dtype=np.uint8)  # region in shadow; only ground changes

    def new(self, label: str, rgb: RGB, smooth: float, grain: float) -> int:
        """A region with its label and photo look. A crowded scene reuses the first region of the
        same label rather than failing: the mask stays exact, only a photo colour repeats."""
        if len(self.labels) == _MAX_REGIONS:
            return self.labels.index(label) if label in self.labels else 0
        self.labels.append(label)
        self.rgb.append(rgb)
        self.amps.append((smooth, grain))
        return len(self.labels) - 1

    def twin(self, rid: int, light: float) -> int:
        """The same label and texture in different light: shadows, joints, car sides."""
        r, g, b = self.rgb[rid]
        return self.new(self.labels[rid], (r * light, g * light, b * light), *self.amps[rid])

    def tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(256,) packed mask colours r | g << 8 | b << 16, (256, 3) photo colours, and (256,)
        smooth and grain amplitudes; unused regions are zero."""
        n = len(self.labels)
        mask = np.zeros(_MAX_REGIONS, "<u4")
        mask[:n] = [_LABEL_CODES[label] for label in self.labels]
        rgb = np.zeros((_MAX_REGIONS, 3), np.float32)
        rgb[:n] = self.rgb
        amps = np.zeros((_MAX_REGIONS, 2), np.float32)
        amps[:n] = self.amps
        return mask, rgb, amps[:, 0], amps[:, 1]

    def paint(self, box: _Box | None, rid: int | np.ndarray) -> None:
        """Cover the box (or its mask) with a region, or with one region per column."""
        if box is None:
            return
        reg = self.region[box.y0 : box.y1, box.x0 : box.x1]
        if box.m is None:
            reg[...] = rid
        else:
            np.copyto(reg, rid, where=box.m, casting="unsafe")

    def relight(self, box: _Box | None, lut: np.ndarray) -> None:
        """Swap regions in the box for their twins in `lut` (e.g. `shadow`); others map to themselves."""
        if box is None:
            return
        reg = self.region[box.y0 : box.y1, box.x0 : box.x1]
        if box.m is None:
            np.take(lut, reg, out=reg)
        else:
            reg[box.m] = lut[reg[box.m]]


def _span(a: float, b: float, n: int) -> tuple[int, int]:
    """Pixel range covering [a, b); at least one pixel so thin far poles do not vanish."""
    i0 = round(a)
    i1 = max(round(b), i0 + 1)
    return max(i0, 0), min(i1, n)


def _rect(s: int, x0: float, x1: float, y0: float, y1: float) -> _Box | None:
    c0, c1 = _span(x0, x1, s)
    r0, r1 = _span(y0, y1, s)
    return _Box(r0, r1, c0, c1, None) if c0 < c1 and r0 < r1 else None


def _front(cam: _Camera, lat0: float, lat1: float, h0: float, h1: float, z: float) -> _Box | None:
    """A rectangle facing the camera at depth z: lateral lat0..lat1, height h0..h1 (metres)."""
    t = cam.f / z
    tx = t * cam.ax
    return _rect(
        cam.size,
        cam.x_v + lat0 * tx,
        cam.x_v + lat1 * tx,
        cam.y_h + (cam.cam_h - h1) * t,
        cam.y_h + (cam.cam_h - h0) * t,
    )


def _ellipse(c: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> _Box | None:
    s = c.shape[0]
    rx, ry = max(rx, 0.5), max(ry, 0.5)
    c0, c1 = _span(cx - rx, cx + rx, s)
    r0, r1 = _span(cy - ry, cy + ry, s)
    if c0 >= c1 or r0 >= r1:
        return None
    if c1 - c0 <= 2 and r1 - r0 <= 2:
        return _Box(r0, r1, c0, c1, None)
    dx = (c[c0:c1] - cx) * (1.0 / rx)
    dy = (c[r0:r1, None] - cy) * (1.0 / ry)
    return _Box(r0, r1, c0, c1, dy * dy + dx * dx <= 1.0)


def _ellipses(c: np.ndarray, cx: np.ndarray, cy: np.ndarray, rx: np.ndarray, ry: np.ndarray) -> _Box | None:
    """The union of several ellipses (pixel units), in one broadcast over their common box."""
    s = c.shape[0]
    c0, c1 = _span(float((cx - rx).min()), float((cx + rx).max()), s)
    r0, r1 = _span(float((cy - ry).min()), float((cy + ry).max()), s)
    if c0 >= c1 or r0 >= r1:
        return None
    dx = (c[None, None, c0:c1] - cx[:, None, None]) / rx[:, None, None]  # (n, 1, w)
    dy = (c[None, r0:r1, None] - cy[:, None, None]) / ry[:, None, None]  # (n, h, 1)
    return _Box(r0, r1, c0, c1, (dx * dx + dy * dy <= 1.0).any(axis=0))


def _front_ellipse(cam: _Camera, c: np.ndarray, lat: float, h: float, r_lat: float, r_h: float, z: float):
    t = cam.t(z)
    return _ellipse(c, cam.x(lat, z), cam.y(h, z), r_lat * cam.ax * t, r_h * t)


def _triangle(c: np.ndarray, cx: float, y_top: float, half_w: float, height: float) -> _Box | None:
    """Upward-pointing triangle: apex at (cx, y_top), base half-width half_w."""
    s = c.shape[0]
    c0, c1 = _span(cx - half_w, cx + half_w, s)
    r0, r1 = _span(y_top, y_top + height, s)
    if c0 >= c1 or r0 >= r1:
        return None
    hw = (c[r0:r1] - y_top) * (half_w / max(height, 1.0)) + 0.5
    return _Box(r0, r1, c0, c1, np.abs(c[c0:c1] - cx)[None, :] <= hw[:, None])


class _Wall(NamedTuple):
    box: _Box
    t: np.ndarray  # (w,) vertical pixels per metre in each column


def _wall_columns(cam: _Camera, c: np.ndarray, lat: float, z0: float, z1: float) -> tuple[int, int, np.ndarray] | None:
    """Columns covered by a vertical plane along the street at lateral `lat` from depth z0 to z1,
    and the pixels per metre in each (each column sees the plane at one depth)."""
    if abs(lat) < 0.05:
        return None  # seen edge-on
    xa, xb = cam.x(lat, z0), cam.x(lat, z1)
    c0, c1 = _span(min(xa, xb), max(xa, xb), cam.size)
    if c0 >= c1:
        return None
    t = (c[c0:c1] - cam.x_v) * (1.0 / (lat * cam.ax))
    return c0, c1, np.maximum(t, cam.t(z1))  # a column half a pixel past the far end must not see t <= 0


def _wall(cam: _Camera, c: np.ndarray, lat: float, z0: float, z1: float, h0: float, h1: float) -> _Wall | None:
    """The plane of `_wall_columns` between heights h0 and h1: top and bottom edges are lines
    through the vanishing point."""
    cols = _wall_columns(cam, c, lat, z0, z1)
    if cols is None:
        return None
    c0, c1, t = cols
    t_lo, t_hi = (float(t[0]), float(t[-1])) if lat > 0 else (float(t[-1]), float(t[0]))
    top = cam.y_h + (cam.cam_h - h1) * (t_hi if h1 > cam.cam_h else t_lo)
    bot = cam.y_h + (cam.cam_h - h0) * (t_hi if h0 < cam.cam_h else t_lo)
    r0, r1 = _span(top, bot, cam.size)
    if r0 >= r1:
        return None
    rows = c[r0:r1, None]
    m = (rows >= cam.y_h + (cam.cam_h - h1) * t) & (rows < cam.y_h + (cam.cam_h - h0) * t)
    return _Wall(_Box(r0, r1, c0, c1, m), t)


def _ground_quad(cam: _Camera, c: np.ndarray, lat0: float, lat1: float, z0: float, z1: float) -> _Box | None:
    """A patch of ground: lateral lat0..lat1 between depths z0 < z1."""
    s = cam.size
    r0, r1 = _span(cam.y(0.0, z1), cam.y(0.0, z0), s)
    if r0 >= r1:
        return None
    t = (c[r0:r1] - cam.y_h) * (cam.ax / cam.cam_h)
    xl, xr = cam.x_v + lat0 * t, cam.x_v + lat1 * t
    c0, c1 = _span(min(float(xl[0]), float(xl[-1])), max(float(xr[0]), float(xr[-1])), s)
    if c0 >= c1:
        return None
    cols = c[None, c0:c1]
    return _Box(r0, r1, c0, c1, (cols >= xl[:, None]) & (cols < xr[:, None]))


def _sub(box: _Box, m: np.ndarray) -> _Box:
    return _Box(box.y0, box.y1, box.x0, box.x1, m)


# ---------------------------------------------------------------------------------------------
# Scene layout and colours.


@dataclass(frozen=True)
class _Side:
    """One side of the street, from the road edge outward (metres from the camera axis)."""

    sign: int  # -1 left, +1 right
    road: float  # road edge
    parked_lane: bool  # cars parked inside the road along this edge
    parking: float  # width of a 'parking' strip (void) outside the road edge, 0 = none
    curb: float
    sidewalk: float
    terrain: float  # grass strip between sidewalk and facades, 0 = none
    park: bool  # a tree line instead of buildings

    @property
    def walk_in(self) -> float:
        return self.road + self.parking + self.curb

    @property
    def walk_out(self) -> float:
        return self.walk_in + self.sidewalk

    @property
    def facade(self) -> float:
        return self.walk_out + self.terrain


@dataclass(frozen=True)
class _Look:
    """Per-scene colours: the same class looks different from scene to scene."""

    light: np.ndarray  # (3,) light colour x intensity, applied to every region
    gamma: float  # camera response: contrast differs from scene to scene
    haze: float  # share of the sky colour mixed into every colour: low-contrast days
    grain: float  # sensor noise: scales every region's grain amplitude
    sunny: bool  # blue sky, hard shadows across the street
    road: RGB
    sidewalk: RGB
    green: RGB  # vegetation
    grass: RGB  # terrain
    pole: RGB


_FACADES: tuple[RGB, ...] = (
    (120, 120, 118), (165, 150, 125), (140, 90, 70), (200, 195, 185), (95, 95, 100),
    (175, 160, 140), (120, 105, 90), (185, 175, 150), (150, 150, 155), (110, 80, 60),
)  # fmt: skip
_CAR_PAINT: tuple[RGB, ...] = (
    (25, 25, 28), (35, 35, 40), (200, 200, 205), (155, 158, 162), (110, 112, 115),
    (130, 20, 25), (25, 45, 110), (20, 30, 60), (40, 70, 45), (210, 180, 40), (90, 90, 95),
)  # fmt: skip


def _gray(v: float, tint: float = 0.0) -> RGB:
    return (v * (1 + tint), v, v * (1 - tint))


def _jitter(r: _Rand, rgb: RGB, scale: float) -> RGB:
    """A base colour varied in brightness and, less, per channel."""
    k = r.uniform(1 - scale, 1 + scale)
    lo, hi = 1 - scale / 3, 1 + scale / 3
    return (rgb[0] * k * r.uniform(lo, hi), rgb[1] * k * r.uniform(lo, hi), rgb[2] * k * r.uniform(lo, hi))


def _look(r: _Rand) -> _Look:
    # Dim and a little green on average, as the Kaggle photos (mean RGB about 55, 65, 55).
    tint = (r.uniform(0.9, 1.04), r.uniform(0.97, 1.1), r.uniform(0.9, 1.04))
    light = np.array(tint, np.float32) * np.float32(r.uniform(0.45, 0.9))
    road = _gray(r.uniform(60, 115), r.uniform(-0.04, 0.06))
    # Sidewalks paved much like the road in some towns: then only the layout tells them apart.
    sidewalk = _jitter(r, road, 0.1) if r.random() < 0.35 else _gray(r.uniform(75, 150), r.uniform(-0.02, 0.12))
    return _Look(
        light=light,
        gamma=r.uniform(0.75, 1.35),
        haze=r.uniform(0.0, 0.35) if r.random() < 0.5 else 0.0,
        grain=r.uniform(0.6, 1.8),
        sunny=r.random() < 0.4,
        road=road,
        sidewalk=sidewalk,
        green=_jitter(r, (r.uniform(55, 110), r.uniform(80, 125), r.uniform(25, 60)), 0.25),
        grass=_jitter(r, r.choice([(100, 135, 60), (120, 150, 80), (140, 130, 90), (90, 110, 55)]), 0.2),
        pole=_gray(r.uniform(60, 170)) if r.random() < 0.8 else (40, 60, 50),
    )


def _camera(r: _Rand, size: int) -> _Camera:
    return _Camera(
        size=size,
        y_h=r.uniform(0.36, 0.5) * size,
        x_v=r.uniform(0.38, 0.62) * size,
        cam_h=r.uniform(1.15, 1.45),
        f=r.uniform(520, 620) * size / 256,
    )


def _side(r: _Rand, sign: int, lane: float) -> _Side:
    lanes = r.integers(0, 3) if sign < 0 else r.integers(0, 2)
    parked = r.random() < 0.55
    park = r.random() < 0.2
    return _Side(
        sign=sign,
        road=lane / 2 + lanes * lane + (2.2 if parked else 0.0),
        parked_lane=parked,
        parking=r.uniform(2.0, 2.6) if (not parked and r.random() < 0.25) else 0.0,
        curb=r.uniform(0.15, 0.3),
        sidewalk=r.uniform(2.0, 6.0),
        terrain=r.uniform(1.0, 5.0) if (park or r.random() < 0.2) else 0.0,
        park=park,
    )


# ---------------------------------------------------------------------------------------------
# Background: sky, ground bands, far skyline, facades or trees along each side.


def _sky(cv: _Canvas, r: _Rand, look: _Look) -> None:
    """Mostly overcast and often overexposed (colours past 255 clip to white), as in Cityscapes."""
    rgb = _jitter(r, (140, 190, 260), 0.2) if look.sunny else _gray(r.uniform(190, 330), r.uniform(-0.08, 0.0))
    cv.new("sky", rgb, smooth=r.uniform(0.03, 0.15), grain=0.01)


def _sun_shadows(cv: _Canvas, r: _Rand, left: _Side, right: _Side) -> None:
    """On sunny days the buildings of one side shade part of the street, block by block."""
    side = r.choice((left, right))
    z = r.uniform(2, 10)
    for _ in range(r.integers(1, 5)):
        z1 = z + r.uniform(8, 40)
        reach = side.facade - r.uniform(3, 14)  # lateral where the shade ends
        lo, hi = sorted((side.sign * (side.facade + 1), side.sign * reach))
        cv.relight(_ground_quad(cv.cam, cv.c, lo, hi, z, z1), cv.shadow)
        z = z1 + r.uniform(2, 15)


def _side_bands(cv: _Canvas, r: _Rand, side: _Side, look: _Look, period: float) -> tuple[list[float], ...]:
    """One side's ground, road edge outward: band edges (|lateral| metres), the region beyond each
    edge, and that region on the rows of joints across the street. Paved bands are cut by joint
    stripes every `period` metres: tile joints are bands too, so np.repeat draws them for free."""
    walk = cv.new("sidewalk", _jitter(r, look.sidewalk, 0.08), smooth=0.08, grain=0.06)
    curb = cv.new("sidewalk", _jitter(r, look.sidewalk, 0.15), smooth=0.05, grain=0.05)
    bands = [(side.curb, curb, False), (side.sidewalk, walk, True)]
    if side.parking > 0:
        parking = cv.new("parking", _jitter(r, look.road, 0.12), smooth=0.08, grain=0.07)
        bands.insert(0, (side.parking, parking, True))
    if side.terrain > 0:
        bands.append((side.terrain, cv.new("terrain", look.grass, smooth=0.3, grain=0.2), False))
    edges: list[float] = []
    ids: list[int] = []
    row_ids: list[int] = []
    start, joint = side.road, 0.12 * period
    for width, rid, paved in bands:
        twin = cv.twin(rid, r.uniform(0.7, 0.9)) if paved else rid
        edges.append(start)
        ids.append(rid)
        row_ids.append(twin)
        x = math.ceil(start / period) * period if paved else math.inf
        while x + joint < start + width:
            edges += [x, x + joint]
            ids += [twin, rid]
            row_ids += [twin, twin]
            x += period
        start += width
    edges.append(start)  # beyond: hidden behind the facades, or the park's grass
    ids.append(bands[-1][1])
    row_ids.append(bands[-1][1])
    return edges, ids, row_ids


def _lane_lines(r: _Rand, left: _Side, right: _Side, lane: float) -> list[tuple[float, float, bool]]:
    """Painted lines as (lateral centre, half width, dashed), sorted left to right."""
    centres = [k * lane + lane / 2 for k in range(-4, 4)]
    lines = [(x, True) for x in centres if -left.road + 0.5 < x < right.road - 0.5]
    for side in (left, right):
        if side.parked_lane:
            lines.append((side.sign * (side.road - 2.2), False))
        elif r.random() < 0.5:  # edge line
            lines.append((side.sign * (side.road - 0.3), False))
    kept: list[tuple[float, float, bool]] = []
    for x, dashed in sorted(lines):
        if not kept or x - kept[-1][0] > 0.5:  # a parking line can fall on a lane line
            kept.append((x, r.uniform(0.05, 0.08), dashed and r.random() < 0.8))
    return kept


def _ground(cv: _Canvas, r: _Rand, left: _Side, right: _Side, look: _Look, lane: float) -> None:
    """Lateral bands on every row below the horizon: sidewalks with tile joints, curbs, parking,
    terrain, and the road with its painted lines (still 'road' in the mask, as in Cityscapes)."""
    cam, c = cv.cam, cv.c
    cobbled = r.random() < 0.2  # cobbles: a coarser, blotchier surface
    smooth, grain = (0.12, 0.14) if cobbled else (r.uniform(0.04, 0.12), r.uniform(0.03, 0.1))
    road = cv.new("road", look.road, smooth=smooth, grain=grain)
    paint = cv.new("road", _gray(r.uniform(140, 210)), smooth=0.1, grain=0.05)
    period = r.uniform(0.25, 0.5)
    edges_l, ids_l, row_ids_l = _side_bands(cv, r, left, look, period)
    edges_r, ids_r, row_ids_r = _side_bands(cv, r, right, look, period)
    bounds = [-e for e in reversed(edges_l)]
    ids, row_ids = [*ids_l[::-1], road], [*row_ids_l[::-1], road]
    dashed = []  # index of the left edge of each dashed line
    for x, half, dash in _lane_lines(r, left, right, lane):
        if dash:
            dashed.append(len(bounds))
        bounds += [x - half, x + half]
        ids += [paint, road]
        row_ids += [paint, road]
    bounds += edges_r
    ids += ids_r
    row_ids += row_ids_r
    r0 = min(int(math.ceil(cam.y_h + 0.5)), cam.size)
    t_row = (c[r0:] - cam.y_h) / cam.cam_h
    z_row = cam.f / t_row
    # Band edges cross each row at known columns, so each row is a run of bands that np.repeat
    # paints at once (pixel i lies beyond an edge when its centre i + 0.5 does).
    rows, width = len(t_row), cam.size
    cross = np.floor(cam.x_v - 0.5 + np.multiply.outer(cam.ax * t_row, np.asarray(bounds, np.float32))) + 1
    cross = np.clip(cross, 0, width).astype(np.intp)
    gaps = _frac(z_row / r.uniform(6, 12) + r.random()) >= r.uniform(0.3, 0.6)
    for j in dashed:
        cross[gaps, j + 1] = cross[gaps, j]  # zero-width paint between dashes
    runs = np.diff(cross, axis=1, prepend=0, append=width).ravel()
    joint_rows = (_frac(z_row / period) < 0.12)[:, None]
    table = np.where(joint_rows, np.asarray(row_ids, np.uint8), np.asarray(ids, np.uint8))
    cv.region[r0:] = np.repeat(table.ravel(), runs).reshape(rows, width)
    if r.random() < 0.15:
        _zebra(cv, r, left, right, paint)
    for rid in sorted({*ids, *row_ids}):
        cv.shadow[rid] = cv.twin(rid, r.uniform(0.45, 0.65))


def _zebra(cv: _Canvas, r: _Rand, left: _Side, right: _Side, paint: int) -> None:
    """A pedestrian crossing: 0.5 m stripes across the road, 4 m deep."""
    cam, c = cv.cam, cv.c
    z0 = r.uniform(8, 30)
    y0, y1 = _span(cam.y(0.0, z0 + 4), cam.y(0.0, z0), cam.size)
    lat = (c[None, :] - cam.x_v) * (cam.cam_h / cam.ax / (c[y0:y1, None] - cam.y_h))
    m = (_frac(lat) < 0.5) & (lat > -left.road + 0.3) & (lat < right.road - 0.3)
    cv.region[y0:y1][m] = paint


def _plan_blocks(cv: _Canvas, r: _Rand, z_end: float) -> np.ndarray:
    """Buildings along one side, one row each: z0, z1, height, floor height, window spacing,
    window fill, and the regions of wall, windows and shop fronts (-1 = none)."""
    light = r.uniform(0.7, 1.1)  # sunny and shaded sides of the street
    rows = []
    z = 1.0
    while z < z_end:
        length = r.uniform(8, 30) * max(1.0, z / 20)  # far blocks are thin slivers: fewer, longer
        if r.random() < 0.1:  # alley: see through to the sky
            z += r.uniform(3, 10)
            continue
        base = _jitter(r, r.choice(_FACADES), 0.3)
        wall = cv.new("building", (base[0] * light, base[1] * light, base[2] * light), r.uniform(0.04, 0.14), 0.04)
        win = cv.new("building", _jitter(r, (45, 50, 60), 0.4), r.uniform(0.15, 0.4), 0.03)
        shop = cv.new("building", _jitter(r, (40, 42, 48), 0.5), 0.3, 0.03) if z < 40 and r.random() < 0.6 else -1
        spacing, fill = r.uniform(2.2, 4.0), r.uniform(0.3, 0.6)
        rows.append((z, min(z + length, z_end), r.uniform(7, 26), r.uniform(2.9, 3.6), spacing, fill, wall, win, shop))
        z += length
    return np.array(rows, np.float32).reshape(-1, 9)


def _facades(cv: _Canvas, r: _Rand, side: _Side, z_end: float) -> None:
    """All buildings along one side in one pass: each building is a range of columns of one
    plane, so the per-pixel work runs once per side (numpy calls cost ~1 µs each)."""
    cam, c = cv.cam, cv.c
    blocks = _plan_blocks(cv, r, z_end)
    cols = _wall_columns(cam, c, side.sign * side.facade, 1.0, z_end)
    if len(blocks) == 0 or cols is None:
        return
    c0, c1, t = cols
    z0, z1, height, floor, spacing, fill, wall, win, shop = blocks.T
    zc = cam.f / t  # depth seen in each column
    b = np.maximum(np.searchsorted(z0, zc, side="right") - 1, 0)  # building in each column
    ht = np.where(zc < z1[b], height[b], 0.0)  # alleys between buildings stay open
    y_top, y_bot = cam.y_h + (cam.cam_h - ht) * t, cam.y_h + cam.cam_h * t
    r0, r1 = _span(float(y_top.min()), float(y_bot.max()), cam.size)
    if r0 >= r1:
        return
    rows = c[r0:r1, None]
    m = (rows >= y_top) & (rows < y_bot)
    cv.paint(_Box(r0, r1, c0, c1, m), wall[b].astype(np.uint8))
    h = cam.cam_h - (rows - cam.y_h) / t  # height above the ground of every pixel
    fl = floor[b]
    level = _frac(h / fl)
    along = (_frac((zc - z0[b]) / spacing[b]) < fill[b]) & (fl * t >= 3)  # no sub-pixel windows
    windows = m & (level > 0.3) & (level < 0.8) & (h > 3.0) & (h < ht - 1.0) & along
    cv.paint(_Box(r0, r1, c0, c1, windows), win[b].astype(np.uint8))
    shops = (shop[b] >= 0) & (_frac((zc - z0[b]) / 4.5) < 0.7)
    if shops.any():  # wide ground-floor windows
        cv.paint(_Box(r0, r1, c0, c1, m & (h > 0.4) & (h < 2.6) & shops), np.maximum(shop[b], 0).astype(np.uint8))


def _tree_line(cv: _Canvas, r: _Rand, side: _Side, z_end: float, look: _Look) -> None:
    """A park: a wall of trees with a wavy top instead of buildings."""
    cam, c = cv.cam, cv.c
    base, amp = r.uniform(6, 12), r.uniform(1, 4)
    w = _wall(cam, c, side.sign * side.facade, 1.0, z_end, 0.0, base + 1.5 * amp)
    if w is None:
        return
    z = cam.f / w.t
    k1, k2, p1, p2 = r.uniform(0.1, 0.3), r.uniform(0.5, 1.2), r.uniform(0, 6.3), r.uniform(0, 6.3)
    top = base + amp * (np.sin(z * k1 + p1) + 0.5 * np.sin(z * k2 + p2))
    y_top = cam.y_h + (cam.cam_h - top) * w.t
    rid = cv.new("vegetation", _jitter(r, look.green, 0.15), smooth=0.35, grain=0.25)
    cv.paint(_sub(w.box, w.box.m & (c[w.box.y0 : w.box.y1, None] >= y_top)), rid)


def _skyline(cv: _Canvas, r: _Rand, z_far: float, look: _Look) -> None:
    """Buildings and a few trees facing the camera where the street ends, in one pass: each
    building is a range of columns of one rectangle."""
    cam, c = cv.cam, cv.c
    t = cam.t(z_far)
    lat = -cam.x_v / (cam.ax * t) - 2
    lat_end = (cam.size - cam.x_v) / (cam.ax * t) + 2
    starts, heights, rids, trees = [], [], [], []
    while lat < lat_end:
        width, kind = r.uniform(8, 35), r.random()
        starts.append(lat)
        if kind < 0.85:
            heights.append(r.uniform(5, 35))
            rids.append(cv.new("building", _jitter(r, r.choice(_FACADES), 0.3), 0.08, 0.03))
        else:  # a gap, maybe with trees
            heights.append(0.0)
            rids.append(0)
            if kind < 0.95:
                trees.append((lat + width / 2, width / 2))
        lat += width
    box = _front(cam, starts[0], lat, 0.0, max(heights) + 0.1, z_far)
    if box is not None:
        cols = (c[box.x0 : box.x1] - cam.x_v) / (cam.ax * t)
        b = np.searchsorted(np.asarray(starts, np.float32), cols, side="right") - 1
        ht = np.asarray(heights, np.float32)[b]
        hs = cam.cam_h - (c[box.y0 : box.y1, None] - cam.y_h) / t  # (rows, 1): one depth
        m = hs < ht
        cv.paint(_sub(box, m), np.asarray(rids, np.uint8)[b])
        floor = r.uniform(2.9, 3.6)
        if floor * t >= 4:
            level = _frac(hs / floor)
            across = (level > 0.35) & (level < 0.8) & (hs > 3)
            along = _frac(cols / r.uniform(2.5, 4)) < 0.5
            win = cv.new("building", _jitter(r, (60, 62, 70), 0.3), smooth=0.2, grain=0.03)
            cv.paint(_sub(box, m & across & (hs < ht - 1) & along), win)
    for lat_c, rad in trees:
        rid = cv.new("vegetation", _jitter(r, look.green, 0.2), smooth=0.35, grain=0.25)
        cv.paint(_front_ellipse(cam, c, lat_c, 5, rad, 5, z_far), rid)


def _side_wall(cv: _Canvas, r: _Rand, side: _Side, look: _Look) -> None:
    """Now and then a hedge, wall or fence along the outer edge of the sidewalk."""
    u = r.random()
    if u > 0.45:
        return
    z0 = r.uniform(2, 30)
    lat = side.sign * (side.walk_out - 0.2)
    if u < 0.15:
        label, rgb, smooth, grain, top = "vegetation", _jitter(r, look.green, 0.2), 0.35, 0.3, r.uniform(0.8, 1.8)
    elif u < 0.3:
        label, rgb, smooth, grain, top = "wall", _jitter(r, (140, 135, 125), 0.35), 0.1, 0.05, r.uniform(0.6, 2.2)
    else:
        label, rgb, smooth, grain, top = "fence", _jitter(r, (110, 105, 95), 0.4), 0.1, 0.08, r.uniform(0.9, 1.8)
    w = _wall(cv.cam, cv.c, lat, z0, z0 + r.uniform(8, 40), 0.0, top)
    if w is None:
        return
    rid = cv.new(label, rgb, smooth, grain)
    cv.paint(w.box, rid)
    if label == "fence":  # bars with the street showing dimly between them, all 'fence'
        bars = _frac((cv.cam.f / w.t) / r.uniform(0.1, 0.25)) < 0.4
        cv.paint(_sub(w.box, w.box.m & bars[None, :]), cv.twin(rid, 0.55))


# ---------------------------------------------------------------------------------------------
# Things on the street, drawn far to near.


class _Shared(NamedTuple):
    """Regions every object of a kind shares, so a busy scene stays under 256 regions."""

    glass: int
    tyre: int
    tail: int
    head: int
    skin: int
    trunk: int
    pole: int
    sign_back: int


def _shared(cv: _Canvas, r: _Rand, look: _Look) -> _Shared:
    return _Shared(
        glass=cv.new("car", _jitter(r, (35, 40, 50), 0.4), smooth=0.3, grain=0.03),
        tyre=cv.new("car", _jitter(r, (22, 22, 24), 0.3), smooth=0.05, grain=0.03),
        tail=cv.new("car", _jitter(r, (170, 30, 30), 0.2), smooth=0.05, grain=0.02),
        head=cv.new("car", _jitter(r, (210, 210, 190), 0.1), smooth=0.05, grain=0.02),
        skin=cv.new("person", _jitter(r, (185, 145, 120), 0.25), smooth=0.05, grain=0.03),
        trunk=cv.new("vegetation", _jitter(r, (70, 60, 50), 0.3), smooth=0.2, grain=0.15),
        pole=cv.new("pole", look.pole, smooth=0.05, grain=0.03),
        # Cityscapes labels the backs of signs 'static' (void)
        sign_back=cv.new("static", _gray(r.uniform(90, 150)), smooth=0.05, grain=0.03),
    )


class _Vehicle(NamedTuple):
    label: str
    width: float
    length: float
    height: float
    waist: float  # where the glass begins
    boxy: bool  # van, truck, bus: no separate cabin
    body: int
    dark: int  # the body in less light: its sides and the band above the road


def _vehicle(cv: _Canvas, r: _Rand) -> _Vehicle:
    """A car most of the time, now and then a van, a truck or a bus."""
    u = r.random()
    label, width, length, height = "car", r.uniform(1.65, 1.95), r.uniform(4.0, 4.9), r.uniform(1.4, 1.6)
    if u < 0.08:
        width, length, height = r.uniform(1.9, 2.1), r.uniform(4.8, 5.5), r.uniform(1.9, 2.3)
    elif u < 0.12:
        label, width, length, height = r.choice(("truck", "bus")), 2.5, r.uniform(7, 12), r.uniform(3, 3.6)
    boxy = height > 1.8
    body = cv.new(label, _jitter(r, r.choice(_CAR_PAINT), 0.15), 0.06, 0.02)
    return _Vehicle(label, width, length, height, height * (0.6 if boxy else 0.55), boxy, body, cv.twin(body, 0.7))


def _car(cv: _Canvas, r: _Rand, sh: _Shared, lat: float, z: float, oncoming: bool) -> None:
    """A vehicle seen from behind or, oncoming, from the front, with its near side when it is
    off-axis. Small far ones get fewer parts: they would cover no pixels, and each costs time."""
    cam = cv.cam
    v = _vehicle(cv, r)
    x0, x1 = lat - v.width / 2, lat + v.width / 2
    pixels = v.width * cam.ax * cam.t(z)
    inset, cab_z = (0.0, 0.0) if v.boxy else (0.15, 0.5)
    if pixels >= 8:
        # Shade on the road under and just behind the car (its sides hide the rest).
        shade = _rect(cam.size, cam.x(x0 - 0.1, z), cam.x(x1 + 0.1, z), cam.y(0.0, z + v.length), cam.y(0.0, z - 0.3))
        cv.relight(shade, cv.shadow)
        near = x0 if x0 > 0.3 else (x1 if x1 < -0.3 else None)
        if near is not None:
            _car_side(cv, sh, v, near, z, pixels >= 20)
    # The body, and the boot lid behind it: seen from above the waist, the set-back cabin rises
    # from higher rows than the body's top edge.
    cv.paint(_rect(cam.size, cam.x(x0, z), cam.x(x1, z), cam.y(v.waist, z + cab_z), cam.y(0.25, z)), v.body)
    cv.paint(_front(cam, x0, x1, 0.25, 0.5, z), v.dark)
    cv.paint(_front(cam, x0 + inset, x1 - inset, v.waist, v.height, z + cab_z), v.body)
    if pixels < 8:
        return
    cv.paint(_front(cam, x0 + 0.05, x0 + 0.35, 0.0, 0.3, z + 0.3), sh.tyre)
    cv.paint(_front(cam, x1 - 0.35, x1 - 0.05, 0.0, 0.3, z + 0.3), sh.tyre)
    top = v.height - (0.1 if v.boxy else 0.08)
    glass_h = v.waist + (0.6 if v.boxy else 0.08)
    cv.paint(_front(cam, x0 + inset + 0.12, x1 - inset - 0.12, glass_h, top, z + cab_z), sh.glass)
    if pixels >= 20:
        lamp = sh.head if oncoming else sh.tail
        cv.paint(_front(cam, x0 + 0.05, x0 + 0.3, v.waist - 0.25, v.waist - 0.08, z), lamp)
        cv.paint(_front(cam, x1 - 0.3, x1 - 0.05, v.waist - 0.25, v.waist - 0.08, z), lamp)


def _car_side(cv: _Canvas, sh: _Shared, v: _Vehicle, near: float, z: float, detail: bool) -> None:
    """The side facing the camera axis, at lateral `near` from depth z to z + length, in one pass:
    each pixel's height and each column's place along the car pick body, glass, wheel or nothing."""
    cam, c = cv.cam, cv.c
    cols = _wall_columns(cam, c, near, z, z + v.length)
    if cols is None:
        return
    c0, c1, t = cols
    along = cam.f / t - z  # metres from the rear
    cab0, cab1 = (0.2, v.length - 0.1) if v.boxy else (0.9, v.length - 0.8)
    cabin = (along > cab0) & (along < cab1)
    top = np.where(cabin, v.height, v.waist)
    r0, r1 = _span(float((cam.y_h + (cam.cam_h - top) * t).min()), float(cam.y_h + cam.cam_h * t.max()), cam.size)
    if r0 >= r1:
        return
    h = cam.cam_h - (c[r0:r1, None] - cam.y_h) / t  # height of every pixel on the car's side plane
    box = _Box(r0, r1, c0, c1, None)
    cv.paint(_sub(box, (h >= 0.25) & (h < v.waist)), v.dark)
    cv.paint(_sub(box, (h >= v.waist) & (h < top)), v.body)
    if detail:
        glass = cabin & (along > cab0 + 0.2) & (along < cab1 - 0.2)
        cv.paint(_sub(box, (h > v.waist + 0.08) & (h < v.height - 0.1) & glass), sh.glass)
        wheels = ((along > 0.5) & (along < 1.2)) | ((along > v.length - 1.3) & (along < v.length - 0.6))
        cv.paint(_sub(box, (h >= 0.0) & (h < 0.6) & wheels), sh.tyre)


def _person(cv: _Canvas, r: _Rand, sh: _Shared, lat: float, z: float) -> None:
    cam = cv.cam
    h = r.uniform(1.5, 1.92)
    legs = cv.new("person", _jitter(r, (45, 45, 55), 0.5), smooth=0.05, grain=0.03)
    top = cv.new("person", _jitter(r, (r.uniform(30, 170), r.uniform(30, 170), r.uniform(30, 170)), 0.3), 0.08, 0.03)
    stride = r.uniform(0.0, 0.12)
    cv.paint(_front(cam, lat - 0.17 - stride, lat - 0.01, 0.0, 0.48 * h, z), legs)
    cv.paint(_front(cam, lat + 0.01, lat + 0.17 + stride, 0.0, 0.48 * h, z), legs)
    cv.paint(_front(cam, lat - 0.27, lat + 0.27, 0.46 * h, 0.83 * h, z), top)
    cv.paint(_front_ellipse(cam, cv.c, lat, 0.91 * h, 0.1, 0.12, z), sh.skin)
    if r.random() < 0.5:  # hair or a hat
        cv.paint(_front_ellipse(cam, cv.c, lat, 0.95 * h, 0.1, 0.07, z), legs)


def _pole(cv: _Canvas, r: _Rand, sh: _Shared, lat: float, z: float) -> None:
    """A plain pole, a street lamp, or a pole carrying a traffic sign or a traffic light."""
    cam = cv.cam
    kind = r.random()
    height = r.uniform(2.6, 3.5) if kind < 0.45 else r.uniform(3.5, 8.0)
    half = r.uniform(0.05, 0.1)
    cv.paint(_front(cam, lat - half, lat + half, 0.0, height, z), sh.pole)
    if kind < 0.45:
        _sign(cv, r, sh, lat, z, height)
    elif kind < 0.6:
        box = cv.new("traffic light", _gray(r.uniform(25, 50)), smooth=0.05, grain=0.03)
        top = height + 0.9
        cv.paint(_front(cam, lat - 0.15, lat + 0.15, height, top, z), box)
        lamp = cv.new("traffic light", r.choice([(220, 40, 30), (230, 170, 30), (60, 200, 90)]), 0.05, 0.03)
        cv.paint(_front_ellipse(cam, cv.c, lat, top - r.choice((0.2, 0.45, 0.7)), 0.08, 0.08, z), lamp)
    elif kind < 0.85:  # street lamp: an arm over the road and a head, all 'pole'
        arm = -math.copysign(r.uniform(0.8, 1.8), lat)
        cv.paint(_front(cam, min(lat, lat + arm), max(lat, lat + arm), height - 0.12, height, z), sh.pole)
        cv.paint(_front(cam, lat + arm - 0.25, lat + arm + 0.25, height - 0.3, height, z), sh.pole)


def _sign(cv: _Canvas, r: _Rand, sh: _Shared, lat: float, z: float, height: float) -> None:
    cam, c = cv.cam, cv.c
    face = _jitter(r, r.choice([(190, 35, 35), (35, 70, 170), (225, 225, 220), (230, 195, 40)]), 0.15)
    rid = sh.sign_back if r.random() < 0.2 else cv.new("traffic sign", face, smooth=0.05, grain=0.03)
    size = r.uniform(0.3, 0.45)
    mid = height - size
    shape = r.random()
    if shape < 0.4:
        cv.paint(_front_ellipse(cam, c, lat, mid, size, size, z), rid)
    elif shape < 0.7:
        t = cam.t(z)
        cv.paint(_triangle(c, cam.x(lat, z), cam.y(mid + size, z), 1.1 * size * cam.ax * t, 2 * size * t), rid)
    else:
        cv.paint(_front(cam, lat - size, lat + size, mid - 0.7 * size, mid + 0.7 * size, z), rid)


def _tree(cv: _Canvas, r: _Rand, sh: _Shared, green: RGB, lat: float, z: float) -> None:
    cam, c = cv.cam, cv.c
    trunk_h, rad = r.uniform(1.8, 3.5), r.uniform(1.4, 3.2)
    cv.paint(_front(cam, lat - 0.14, lat + 0.14, 0.0, trunk_h + rad, z), sh.trunk)
    crown = cv.new("vegetation", _jitter(r, green, 0.2), smooth=r.uniform(0.25, 0.45), grain=0.25)
    if rad * cam.t(z) <= 12:  # a small far crown: one blob
        cv.paint(_front_ellipse(cam, c, lat, trunk_h + rad, rad, rad, z), crown)
        return
    n = r.integers(2, 5)
    lats = np.array([lat + r.normal(0.45 * rad) for _ in range(n)], np.float32)
    hs = np.array([trunk_h + rad + r.normal(0.35 * rad) for _ in range(n)], np.float32)
    radii = np.array([rad * r.uniform(0.55, 1.0) for _ in range(2 * n)], np.float32).reshape(2, n)
    t = cam.t(z)
    cx, cy = cam.x_v + lats * (cam.ax * t), cam.y_h + (cam.cam_h - hs) * t
    cv.paint(_ellipses(c, cx, cy, radii[0] * (cam.ax * t), radii[1] * t), crown)


def _bush(cv: _Canvas, r: _Rand, sh: _Shared, green: RGB, lat: float, z: float) -> None:
    rad = r.uniform(0.5, 1.2)
    rid = cv.new("vegetation", _jitter(r, green, 0.25), smooth=0.4, grain=0.3)
    cv.paint(_front_ellipse(cv.cam, cv.c, lat, rad * 0.7, rad * r.uniform(1, 2), rad, z), rid)


def _clutter(cv: _Canvas, r: _Rand, sh: _Shared, lat: float, z: float) -> None:
    """Bins and bollards: the void classes 'dynamic' and 'static'."""
    if r.random() < 0.5:
        rgb = _jitter(r, r.choice([(60, 80, 60), (50, 50, 55), (120, 90, 40)]), 0.3)
        cv.paint(_front(cv.cam, lat - 0.35, lat + 0.35, 0.0, r.uniform(0.9, 1.3), z), cv.new("dynamic", rgb, 0.1, 0.05))
    else:
        rid = cv.new("static", _gray(r.uniform(30, 140)), 0.1, 0.05)
        cv.paint(_front(cv.cam, lat - 0.1, lat + 0.1, 0.0, r.uniform(0.6, 1.0), z), rid)


class _Thing(NamedTuple):
    z: float
    draw: Callable[..., None]  # called as draw(canvas, rand, shared, *args)
    args: tuple


def _street_things(r: _Rand, left: _Side, right: _Side, lane: float, z_far: float, look: _Look) -> list[_Thing]:
    """Parked and moving cars, trees, poles, people and clutter, with their depths."""
    things: list[_Thing] = []
    zmax = min(z_far, 80.0)
    for side in (left, right):
        s = side.sign
        if side.parked_lane or side.parking > 0:
            lat = s * (side.road - 1.1) if side.parked_lane else s * (side.road + side.parking / 2)
            z, cars = r.uniform(3, 15), 0
            while z < zmax and cars < 6 and r.random() < 0.8:
                things.append(_Thing(z, _car, (lat + r.normal(0.1), z, s < 0 and r.random() < 0.3)))
                z, cars = z + r.uniform(4.8, 10.0), cars + 1
        if r.random() < 0.5 and not side.park:
            z, lat = r.uniform(4, 12), s * (side.walk_out - r.uniform(0.6, 1.0))
            while z < zmax:
                things.append(_Thing(z, _tree, (look.green, lat, z)))
                z += r.uniform(12, 24)
        if side.terrain > 0:
            for _ in range(r.integers(1, 4)):
                z = r.uniform(4, zmax)
                place = s * (side.walk_out + r.uniform(0.3, side.terrain))
                things.append(_Thing(z, _tree if r.random() < 0.6 else _bush, (look.green, place, z)))
        for _ in range(r.integers(1, 5)):
            z = r.uniform(4, zmax)
            things.append(_Thing(z, _pole, (s * (side.walk_in + 0.35), z)))
        for _ in range(r.integers(0, 5)):
            z = r.uniform(4, 50)
            things.append(_Thing(z, _person, (s * (side.walk_in + r.uniform(0.3, side.sidewalk - 0.3)), z)))
        for _ in range(r.integers(0, 3)):
            z = r.uniform(4, 50)
            things.append(_Thing(z, _clutter, (s * (side.walk_in + r.uniform(0.2, side.sidewalk - 0.2)), z)))
    lanes = [k * lane for k in range(-3, 3) if -left.road < k * lane < right.road]
    for _ in range(r.integers(0, 4)):
        k = r.choice(lanes)
        z = r.uniform(7 if k == 0 else 4, zmax)
        things.append(_Thing(z, _car, (k + r.normal(0.2), z, k < 0)))
    if r.random() < 0.15:  # someone crossing the road
        z = r.uniform(6, 30)
        things.append(_Thing(z, _person, (r.uniform(-left.road, right.road), z)))
    return things


def _bonnet(cv: _Canvas, r: _Rand) -> None:
    """The ego-vehicle bonnet along the bottom: void (0, 0, 0), now and then with the car's star."""
    s, c = cv.cam.size, cv.c
    edge, bulge = r.uniform(0.03, 0.08) * s, r.uniform(0.01, 0.05) * s
    cx = s / 2 + r.normal(0.03 * s)
    y_top = s - edge - bulge * (1 - ((c - cx) / (0.65 * s)) ** 2)
    r0 = max(int(y_top.min()) - 1, 0)
    rid = cv.new("ego vehicle", _gray(r.uniform(15, 45)), smooth=0.15, grain=0.02)
    cv.paint(_Box(r0, s, 0, s, c[r0:, None] >= y_top[None, :]), rid)
    if r.random() < 0.5:
        star = cv.new("ego vehicle", _gray(r.uniform(110, 170)), smooth=0.05, grain=0.02)
        rad = 0.012 * s
        cv.paint(_ellipse(c, cx, s - edge - bulge - rad * 1.3, rad, rad * 1.4), star)


# ---------------------------------------------------------------------------------------------
# Compose the photo, in buffers.


def _packed(rgb: np.ndarray, extra: np.ndarray) -> np.ndarray:
    """(256, 3) colours and (256,) bytes -> (256,) '<u4' r | g << 8 | b << 16 | extra << 24."""
    v = np.clip(np.rint(rgb), 0, 255).astype("<u4")
    return v[:, 0] | (v[:, 1] << 8) | (v[:, 2] << 16) | (extra.astype("<u4") << 24)


def _graded(photo_lut: np.ndarray, look: _Look) -> np.ndarray:
    """Region colours under the scene's light, haze and camera response (per region, not pixel)."""
    rgb = np.clip(photo_lut * look.light, 0, 255)
    rgb += look.haze * (np.minimum(photo_lut[0], 255) - rgb)  # region 0 is the sky
    return 255 * (rgb / 255) ** look.gamma


def _amp_bytes(amp: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(amp * (255 / _AMP_MAX)), 0, 255)


def _soften(img: np.ndarray, tmp: np.ndarray) -> None:
    """In-place [1 2 1] blur along columns and rows of a planar (3, H, W) image, at 16x its scale
    (the caller folds the 1/16 into its light factor): optics are not pixel-sharp."""
    np.add(img[:, :-1], img[:, 1:], out=tmp[:, :-1])
    np.add(tmp[:, :-2], tmp[:, 1:-1], out=img[:, 1:-1])
    img[:, 0] *= 4.0
    img[:, -1] *= 4.0
    # Along rows as one flat array (4x faster than strided slices); the first and last column
    # would mix with the neighbouring row, so they keep their unblurred values.
    edges = img[:, :, [0, -1]] * 4.0
    flat, t = img.reshape(-1), tmp.reshape(-1)
    np.add(flat[:-1], flat[1:], out=t[:-1])
    np.add(t[:-2], t[1:-1], out=flat[1:-1])
    img[:, :, [0, -1]] = edges


def _compose(cv: _Canvas, r: _Rand, tiles: _Tiles, look: _Look) -> np.ndarray:
    """The pair as planar uint8 (3, S, 2S): photo left, mask right, in the thread's buffer.

    Two 4-byte gathers per pixel carry everything per region: the mask colour with the smooth
    texture amplitude, and the photo base colour with the grain amplitude, each in the otherwise
    unused fourth byte."""
    s, w = cv.cam.size, cv.work
    idx = w.idx
    np.copyto(idx, cv.region)  # np.take is faster with native-width indices
    mask_lut, photo_lut, smooth_amp, grain_amp = cv.tables()
    np.take(mask_lut | (_amp_bytes(smooth_amp).astype("<u4") << 24), idx, out=w.mask32)
    np.take(_packed(_graded(photo_lut, look), _amp_bytes(grain_amp * look.grain)), idx, out=w.base32)
    mask4 = w.mask32.view(np.uint8).reshape(s, s, 4)
    base4 = w.base32.view(np.uint8).reshape(s, s, 4)
    oy, ox, gy, gx = (r.integers(0, s) for _ in range(4))
    light, tmp = w.f1, w.f2  # 1 + texture, times a vertical fall-off, over 16 for the blur
    np.multiply(mask4[..., 3], tiles.smooth[oy : oy + s, ox : ox + s], out=light)
    np.multiply(base4[..., 3], tiles.grain[gy : gy + s, gx : gx + s], out=tmp)
    light += tmp
    light += 1.0
    light *= ((1.0 + r.uniform(-0.25, 0.1) * (cv.c / s - 0.5)) / 16)[:, None]
    photo = w.photo
    for k in range(3):
        np.multiply(base4[..., k], light, out=photo[k])
    _soften(photo, w.tmp3)
    np.clip(photo, 0, 255, out=photo)
    np.copyto(w.pair[:, :, :s], photo, casting="unsafe")
    for k in range(3):
        w.pair[k, :, s:] = mask4[..., k]
    return w.pair


def _render(rng: np.random.Generator, size: int) -> np.ndarray:
    """One scene, background first and then far to near: the planar (3, S, 2S) pair, in this
    thread's buffer (overwritten by the thread's next call)."""
    r = _Rand(rng)
    tiles = _tiles(size)
    cam = _camera(r, size)
    cv = _Canvas(cam, tiles, _work(size))
    look = _look(r)
    lane = r.uniform(2.8, 3.6)
    left, right = _side(r, -1, lane), _side(r, 1, lane)
    z_far = r.uniform(60, 250)
    _sky(cv, r, look)
    _ground(cv, r, left, right, look, lane)
    if look.sunny:
        _sun_shadows(cv, r, left, right)
    _skyline(cv, r, z_far, look)
    for side in (left, right):
        z_end = z_far if r.random() < 0.7 else r.uniform(30, z_far)
        if side.park:
            _tree_line(cv, r, side, z_end, look)
        else:
            _facades(cv, r, side, z_end)
        _side_wall(cv, r, side, look)
    shared = _shared(cv, r, look)
    for thing in sorted(_street_things(r, left, right, lane, z_far, look), key=lambda t: -t.z):
        thing.draw(cv, r, shared, *thing.args)
    if r.random() < 0.85:
        _bonnet(cv, r)
    return _compose(cv, r, tiles, look)


def _pair_image(pair: np.ndarray) -> Image.Image:
    """(3, S, 2S) planar uint8 -> one RGB image, interleaved by Pillow's C code."""
    _, h, w = pair.shape
    return Image.merge("RGB", [Image.frombuffer("L", (w, h), pair[k], "raw", "L", 0, 1) for k in range(3)])


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality, subsampling=JPEG_SUBSAMPLING)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Public API.


def render_pair(rng: np.random.Generator, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """One random street scene: (photo, mask), each (size, size, 3) uint8; mask in exact label colours."""
    pair = np.asarray(_pair_image(_render(rng, size)))
    return pair[:, :size].copy(), pair[:, size:].copy()


def encode_pair(photo: np.ndarray, mask: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """Photo left, mask right, as one JPEG (the Kaggle layout and chroma subsampling)."""
    return _jpeg(Image.fromarray(np.concatenate([photo, mask], axis=1), "RGB"), quality)


def pair_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of pair `index` (1-based) of a split: independent of order and worker count."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


def _write_one(split_dir: Path, split: str, seed: int, size: int, index: int) -> None:
    # The bytes of encode_pair(*render_pair(...)), without the round trip through arrays.
    data = _jpeg(_pair_image(_render(pair_rng(seed, split, index), size)), JPEG_QUALITY)
    (split_dir / f"{index}.jpg").write_bytes(data)


def write_split(out_dir: Path, split: str, n: int, seed: int, size: int = 256, workers: int = 1) -> Path:
    """Write out_dir/split/1.jpg .. n.jpg; numbered files beyond n left by an earlier generation are
    removed (`write_dataset` makes sure the folder is one this module wrote)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    split_dir = ensure_dir(Path(out_dir) / split, "split folder")
    for old in split_dir.glob("*.jpg"):
        if old.stem.isascii() and old.stem.isdigit() and int(old.stem) > n:
            old.unlink()
    job = functools.partial(_write_one, split_dir, split, seed, size)
    if workers > 1 and n > 1:
        # spawn, not fork: the caller may hold threads (torch, DALI) that make fork unsafe
        with multiprocessing.get_context("spawn").Pool(min(workers, n)) as pool:
            pool.map(job, range(1, n + 1), chunksize=max(1, min(64, n // (4 * workers))))
    else:
        for i in range(1, n + 1):
            job(i)
    return split_dir


def _meta(n_train: int, n_val: int, seed: int, size: int) -> dict:
    return {
        "generator": "cityseg.data.synth",
        "version": GENERATOR_VERSION,
        "n_train": n_train,
        "n_val": n_val,
        "seed": seed,
        "size": size,
        "jpeg_quality": JPEG_QUALITY,
    }


def write_dataset(out_dir: Path, n_train: int, n_val: int, seed: int, size: int = 256, workers: int = 1) -> Path:
    """Both splits, then the marker `synth.json` last: its presence means the folder is complete.

    `out_dir` must be new, empty, or a set this function wrote (it holds `synth.json`, or
    `synth.partial` while a generation is under way): anything else is refused untouched, so a real
    dataset (Kaggle names its files 1.jpg .. N.jpg, as this does) can never be overwritten."""
    out_dir = Path(out_dir)
    check_synth_target(out_dir)
    ensure_dir(out_dir, "output folder")
    # Ours from now on, even if interrupted: a rerun may rewrite it.
    (out_dir / PARTIAL).write_text(json.dumps(_meta(n_train, n_val, seed, size)) + "\n")
    (out_dir / MARKER).unlink(missing_ok=True)  # an old marker must not vouch for a half-rewritten folder
    write_split(out_dir, "train", n_train, seed, size, workers)
    write_split(out_dir, "val", n_val, seed, size, workers)
    tmp = out_dir / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(_meta(n_train, n_val, seed, size), indent=1) + "\n")
    os.replace(tmp, out_dir / MARKER)
    (out_dir / PARTIAL).unlink()
    return out_dir


def check_synth_target(out_dir: Path) -> None:
    """Refuse (OutputError) a target that is a file, or a non-empty folder this module did not write."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: is a file, not a folder")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not ((out_dir / MARKER).is_file() or (out_dir / PARTIAL).is_file()):
        raise OutputError(f"{out_dir}: not empty and not a set written by `cityseg-fast synth` (no {MARKER}): "
                          "refusing to write into it; choose a new or empty folder")


def _complete(folder: Path, meta: dict) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()) == meta
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return False


def default_cache_dir() -> Path:
    """$CITYSEG_CACHE, else ~/.cache/cityseg: where `default_dataset` keeps its folders."""
    return Path(os.environ.get("CITYSEG_CACHE", Path.home() / ".cache" / "cityseg"))


def default_dataset(
    n_train: int = 2000, n_val: int = 200, seed: int = 0, size: int = 256, cache_dir: Path | None = None
) -> Path:
    """The cached synthetic set used when no data folder is given: generated once, then reused.

    Generation goes to a temporary sibling that is renamed into place, so concurrent callers (DDP
    ranks) and interrupted runs never leave a half-written folder under the final name."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / f"synth-v{GENERATOR_VERSION}-train{n_train}-val{n_val}-seed{seed}-{size}px"
    meta = _meta(n_train, n_val, seed, size)
    if _complete(final, meta):
        return final
    ensure_dir(root, "cache folder ($CITYSEG_CACHE, default ~/.cache/cityseg)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        workers = 1 if n_train + n_val < 1000 else min(os.cpu_count() or 1, 8)  # a pool takes ~1 s to start
        write_dataset(tmp, n_train, n_val, seed, size, workers)
        _move_into_place(tmp, final, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # already gone after a successful move
    return final


def _move_into_place(tmp: Path, final: Path, meta: dict) -> None:
    """Rename a finished folder to its final name; a complete one that appeared meanwhile wins."""
    if _complete(final, meta):
        return
    if final.exists():
        shutil.rmtree(final)  # an interrupted or mismatched earlier attempt
    try:
        os.replace(tmp, final)
    except OSError:
        if not _complete(final, meta):  # only acceptable if another process renamed theirs first
            raise
