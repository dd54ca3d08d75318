"""Procedural Cityscapes-like street scenes as Kaggle-format pairs (photo | colour-coded mask).

The embedded default data: `cityseg-fast train` with no `--data` trains on `default_dataset()`, so
the project runs end to end without a download. Each scene is drawn from a random layout seen by
a pinhole camera at height `cam_h` over a flat road: a ground point at depth z metres lies on row
y_h + cam_h * f / z, and an object `w` metres wide there is `w * ax * f / z` pixels wide (`ax` =
0.5 because Kaggle squeezed 2048x1024 frames to 256x256).

Every element is painted, far to near, as a *region* id into one uint8 map. A region carries its
Cityscapes label colour (for the mask) and its own photo colour and texture amplitudes (for the
photo), so the mask is one table lookup and the photo a lookup plus shading, texture and noise:
photo colour depends on the object, the scene lighting and the texture, not on the class alone.

    from cityseg.data.synth import write_dataset
    write_dataset(Path("data/synth"), n_train=2000, n_val=200, seed=0, workers=4)
"""

from __future__ import annotations

import functools
import io
import json
import math
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from cityscapesscripts.helpers.labels import labels as CITYSCAPES_LABELS
from PIL import Image

GENERATOR_VERSION = 1  # bump whenever output pixels change: names the cache folder
JPEG_QUALITY = 95  # the Kaggle files carry libjpeg's standard tables scaled to quality 95, 4:2:0 chroma
JPEG_SUBSAMPLING = "4:2:0"
SPLITS = ("train", "val")
MARKER = "synth.json"  # written last: a folder without it is an interrupted generation

# Exact label colours by name; 'license plate' (id -1) shares car's colour and is left out.
LABEL_COLORS: dict[str, tuple[int, int, int]] = {
    lab.name: tuple(lab.color) for lab in CITYSCAPES_LABELS if lab.id >= 0
}

_MAX_REGIONS = 256  # region ids are uint8


# ---------------------------------------------------------------------------------------------
# Precomputed per size: pixel-centre coordinates and noise tiles (cropped at a random offset per
# scene, so no per-pixel random numbers are drawn while rendering).


@dataclass(frozen=True)
class _Tiles:
    coords: np.ndarray  # (S,) float32 pixel centres 0.5, 1.5, ...
    smooth: np.ndarray  # (2S, 2S) float32, low-frequency noise, unit std
    grain: np.ndarray  # (2S, 2S) float32, pixel noise, unit std
    sensor: np.ndarray  # (2S, 2S, 3) float32, per-channel pixel noise, unit std
    vignette: np.ndarray  # (S, S) float32, squared distance from the centre, 0 .. 1


@functools.lru_cache(maxsize=4)
def _tiles(size: int) -> _Tiles:
    rng = np.random.default_rng(20240917)  # fixed: the textures are part of the generator version
    big = 2 * size
    smooth = np.zeros((big, big), np.float32)
    for cells, weight in ((4, 1.0), (8, 0.7), (16, 0.5), (32, 0.35), (64, 0.25)):
        coarse = rng.standard_normal((cells, cells)).astype(np.float32)
        img = Image.fromarray(coarse, mode="F").resize((big, big), Image.Resampling.BICUBIC)
        smooth += weight * np.asarray(img, dtype=np.float32)
    smooth /= smooth.std()
    grain = rng.standard_normal((big, big), dtype=np.float32)
    sensor = rng.standard_normal((big, big, 3), dtype=np.float32)
    coords = np.arange(size, dtype=np.float32) + 0.5
    r = (coords - size / 2) / (size / 2)
    vignette = ((r[:, None] ** 2 + r[None, :] ** 2) / 2).astype(np.float32)
    return _Tiles(coords, smooth, grain, sensor, vignette)


# ---------------------------------------------------------------------------------------------
# Camera and canvas.


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
    """Region-id map plus per-region tables; region 0 is the sky that everything covers."""

    def __init__(self, cam: _Camera, tiles: _Tiles) -> None:
        s = cam.size
        self.cam = cam
        self.c = tiles.coords
        self.region = np.zeros((s, s), np.uint8)
        self.shade = np.ones((s, s), np.float32)  # photo-only light: shadows, gradients
        self.mask_lut = np.zeros(_MAX_REGIONS, "<u4")  # packed r | g << 8 | b << 16
        self.photo_lut = np.zeros((_MAX_REGIONS, 3), np.float32)
        self.smooth_amp = np.zeros(_MAX_REGIONS, np.float32)
        self.grain_amp = np.zeros(_MAX_REGIONS, np.float32)
        self.labels: list[str] = []

    def new(self, label: str, rgb: np.ndarray | tuple[float, ...], smooth: float, grain: float) -> int:
        """A region with its label and photo look. A crowded scene reuses the first region of the
        same label rather than failing (the mask stays exact; only the photo colour repeats)."""
        if len(self.labels) == _MAX_REGIONS:
            return self.labels.index(label) if label in self.labels else 0
        rid = len(self.labels)
        r, g, b = LABEL_COLORS[label]
        self.mask_lut[rid] = r | (g << 8) | (b << 16)
        self.photo_lut[rid] = rgb
        self.smooth_amp[rid] = smooth
        self.grain_amp[rid] = grain
        self.labels.append(label)
        return rid

    def paint(self, box: _Box | None, rid: int, shade: float | np.ndarray = 1.0) -> None:
        """Cover the box (or its mask) with a region; its own shade replaces earlier shadows."""
        if box is None:
            return
        reg = self.region[box.y0 : box.y1, box.x0 : box.x1]
        sh = self.shade[box.y0 : box.y1, box.x0 : box.x1]
        if box.m is None:
            reg[...] = rid
            sh[...] = shade
        else:
            np.copyto(reg, rid, where=box.m, casting="unsafe")
            np.copyto(sh, shade, where=box.m)

    def darken(self, box: _Box | None, factor: float | np.ndarray) -> None:
        if box is None:
            return
        sh = self.shade[box.y0 : box.y1, box.x0 : box.x1]
        if box.m is None:
            sh *= factor
        else:
            np.multiply(sh, factor, out=sh, where=box.m)


# ---------------------------------------------------------------------------------------------
# Primitives: each returns the clipped bounding box and a boolean mask inside it (None if nothing
# is visible), computed by broadcasting row and column vectors over the small box only.


def _span(a: float, b: float, n: int) -> tuple[int, int]:
    """Pixel range covering [a, b); at least one pixel so thin far poles do not vanish."""
    i0 = int(round(a))
    i1 = max(int(round(b)), i0 + 1)
    return max(i0, 0), min(i1, n)


def _rect(s: int, x0: float, x1: float, y0: float, y1: float) -> _Box | None:
    c0, c1 = _span(x0, x1, s)
    r0, r1 = _span(y0, y1, s)
    if c0 >= c1 or r0 >= r1:
        return None
    return _Box(r0, r1, c0, c1, None)


def _front(cam: _Camera, lat0: float, lat1: float, h0: float, h1: float, z: float) -> _Box | None:
    """A rectangle facing the camera at depth z: lateral lat0..lat1, height h0..h1 (metres)."""
    return _rect(cam.size, cam.x(lat0, z), cam.x(lat1, z), cam.y(h1, z), cam.y(h0, z))


def _ellipse(c: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> _Box | None:
    s = c.shape[0]
    rx, ry = max(rx, 0.5), max(ry, 0.5)
    c0, c1 = _span(cx - rx, cx + rx, s)
    r0, r1 = _span(cy - ry, cy + ry, s)
    if c0 >= c1 or r0 >= r1:
        return None
    dx = ((c[c0:c1] - cx) / rx) ** 2
    dy = ((c[r0:r1] - cy) / ry) ** 2
    return _Box(r0, r1, c0, c1, dy[:, None] + dx[None, :] <= 1.0)


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
    hw = (c[r0:r1] - y_top) / max(height, 1.0) * half_w
    return _Box(r0, r1, c0, c1, np.abs(c[c0:c1] - cx)[None, :] <= hw[:, None] + 0.5)


class _Wall(NamedTuple):
    box: _Box
    t: np.ndarray  # (w,) vertical pixels per metre of each column
    h: np.ndarray  # (h, w) height above ground of each pixel, metres


def _wall(cam: _Camera, c: np.ndarray, lat: float, z0: float, z1: float, h0: float, h1: float) -> _Wall | None:
    """A vertical plane parallel to the street at lateral `lat`, from depth z0 to z1, heights h0..h1.

    Each column sees the plane at one depth (t = f / z follows from the column), so top and bottom
    edges are straight lines through the vanishing point."""
    if abs(lat) < 0.05:
        return None  # seen edge-on
    s = cam.size
    xa, xb = cam.x(lat, z0), cam.x(lat, z1)
    c0, c1 = _span(min(xa, xb), max(xa, xb), s)
    if c0 >= c1:
        return None
    t = (c[c0:c1] - cam.x_v) / (lat * cam.ax)
    t = np.clip(t, cam.t(z1), cam.t(z0))
    y_top = cam.y_h + (cam.cam_h - h1) * t
    y_bot = cam.y_h + (cam.cam_h - h0) * t
    r0, r1 = _span(float(y_top.min()), float(y_bot.max()), s)
    if r0 >= r1:
        return None
    rows = c[r0:r1, None]
    m = (rows >= y_top) & (rows < y_bot)
    h = cam.cam_h - (rows - cam.y_h) / t
    return _Wall(_Box(r0, r1, c0, c1, m), t, h)


def _ground_quad(cam: _Camera, c: np.ndarray, lat0: float, lat1: float, z0: float, z1: float) -> _Box | None:
    """A patch of road: lateral lat0..lat1 between depths z0 < z1."""
    s = cam.size
    r0, r1 = _span(cam.y(0.0, z1), cam.y(0.0, z0), s)
    if r0 >= r1:
        return None
    t = (c[r0:r1] - cam.y_h) / cam.cam_h
    xl, xr = cam.x_v + lat0 * cam.ax * t, cam.x_v + lat1 * cam.ax * t
    c0, c1 = _span(float(xl.min()), float(xr.max()), s)
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
    """One side of the street, from the road edge outward (metres, measured from the camera axis)."""

    sign: int  # -1 left, +1 right
    road: float  # road edge
    parked_lane: bool  # cars parked inside the road along this edge
    parking: float  # width of a parking strip (void 'parking') outside the road edge
    curb: float
    sidewalk: float
    terrain: float  # grass strip between sidewalk and facade
    park: bool  # trees instead of buildings

    @property
    def walk_in(self) -> float:
        return self.road + self.parking

    @property
    def walk_out(self) -> float:
        return self.walk_in + self.curb + self.sidewalk

    @property
    def facade(self) -> float:
        return self.walk_out + self.terrain


@dataclass(frozen=True)
class _Look:
    """Per-scene colour choices: the same class looks different from scene to scene."""

    light: np.ndarray  # (3,) global light colour x intensity
    road: np.ndarray
    sidewalk: np.ndarray
    green: np.ndarray  # vegetation
    grass: np.ndarray  # terrain
    pole: np.ndarray


def _gray(v: float, tint: float = 0.0) -> np.ndarray:
    return np.array([v * (1 + tint), v, v * (1 - tint)], np.float32)


_FACADES = (
    (120, 120, 118), (165, 150, 125), (140, 90, 70), (200, 195, 185), (95, 95, 100),
    (175, 160, 140), (120, 105, 90), (185, 175, 150), (150, 150, 155), (110, 80, 60),
)  # fmt: skip
_CAR_PAINT = (
    (25, 25, 28), (35, 35, 40), (200, 200, 205), (155, 158, 162), (110, 112, 115),
    (130, 20, 25), (25, 45, 110), (20, 30, 60), (40, 70, 45), (210, 180, 40), (90, 90, 95),
)  # fmt: skip


def _jitter(rng: np.random.Generator, rgb: tuple[float, ...] | np.ndarray, scale: float) -> np.ndarray:
    """Brightness and per-channel variation of a base colour."""
    k = rng.uniform(1 - scale, 1 + scale)
    return np.asarray(rgb, np.float32) * k * rng.uniform(1 - scale / 3, 1 + scale / 3, 3).astype(np.float32)


def _look(rng: np.random.Generator) -> _Look:
    light = rng.uniform(0.6, 1.15) * rng.uniform(0.93, 1.07, 3).astype(np.float32)
    road = _gray(rng.uniform(60, 115), rng.uniform(-0.04, 0.06))
    sidewalk = _gray(rng.uniform(75, 150), rng.uniform(-0.02, 0.12))
    green = _jitter(rng, (rng.uniform(55, 110), rng.uniform(80, 125), rng.uniform(25, 60)), 0.25)
    grass = _jitter(rng, rng.choice([(100, 135, 60), (120, 150, 80), (140, 130, 90), (90, 110, 55)]), 0.2)
    pole = _gray(rng.uniform(60, 170)) if rng.random() < 0.8 else np.array([40, 60, 50], np.float32)
    return _Look(light.astype(np.float32), road, sidewalk, green, grass, pole)


def _camera(rng: np.random.Generator, size: int) -> _Camera:
    return _Camera(
        size=size,
        y_h=rng.uniform(0.36, 0.5) * size,
        x_v=rng.uniform(0.38, 0.62) * size,
        cam_h=rng.uniform(1.15, 1.45),
        f=rng.uniform(520, 620) * size / 256,
    )


def _side(rng: np.random.Generator, sign: int, lane: float) -> _Side:
    lanes = int(rng.integers(0, 3)) if sign < 0 else int(rng.integers(0, 2))
    parked = bool(rng.random() < 0.55)
    park = bool(rng.random() < 0.2)
    return _Side(
        sign=sign,
        road=lane / 2 + lanes * lane + (2.2 if parked else 0.0),
        parked_lane=parked,
        parking=rng.uniform(2.0, 2.6) if (not parked and rng.random() < 0.25) else 0.0,
        curb=rng.uniform(0.15, 0.3),
        sidewalk=rng.uniform(2.0, 6.0),
        terrain=rng.uniform(1.0, 5.0) if (park or rng.random() < 0.2) else 0.0,
        park=park,
    )


# ---------------------------------------------------------------------------------------------
# Background: sky, ground bands with lane marks, far skyline, facades or park along each side.


def _sky(cv: _Canvas, rng: np.random.Generator) -> None:
    if rng.random() < 0.6:  # overcast, as most of Cityscapes
        rgb = _gray(rng.uniform(150, 235), rng.uniform(-0.08, 0.0))
    else:
        rgb = _jitter(rng, (110, 150, 205), 0.2)
    cv.new("sky", rgb, smooth=rng.uniform(0.03, 0.15), grain=0.01)


def _ground(cv: _Canvas, rng: np.random.Generator, left: _Side, right: _Side, look: _Look, lane: float) -> None:
    """Lateral bands (road, parking, curb, sidewalk, terrain) on every row below the horizon."""
    cam, c = cv.cam, cv.c
    road = cv.new("road", look.road, smooth=rng.uniform(0.04, 0.12), grain=rng.uniform(0.03, 0.1))
    bounds: list[float] = []
    ids: list[int] = []
    paved: list[bool] = []  # bands that get tile joints
    for side in (left, right):
        edges, band_ids, band_paved = _side_bands(cv, rng, side, look)
        if side.sign < 0:
            bounds += [-e for e in reversed(edges)]
            ids += list(reversed(band_ids))
            paved += list(reversed(band_paved))
            ids.append(road)
            paved.append(False)
        else:
            bounds += edges
            ids += band_ids
            paved += band_paved
    r0 = min(int(math.ceil(cam.y_h + 0.5)), cam.size)
    t_row = (c[r0:] - cam.y_h) / cam.cam_h
    lat = (c[None, :] - cam.x_v) / (cam.ax * t_row[:, None])  # lateral metres of each ground pixel
    band = np.searchsorted(np.asarray(bounds, np.float32), lat)
    cv.region[r0:] = np.asarray(ids, np.uint8)[band]
    z_row = cam.f / t_row
    _paving(cv, rng, r0, lat, z_row, np.asarray(paved)[band], band == ids.index(road))
    _lane_marks(cv, rng, r0, lat, z_row, left, right, lane)


def _side_bands(cv: _Canvas, rng: np.random.Generator, side: _Side, look: _Look):
    """Band edges (|lateral|, from the road edge out) and the region and paving of each band beyond."""
    walk = cv.new("sidewalk", _jitter(rng, look.sidewalk, 0.08), smooth=0.08, grain=0.06)
    curb = cv.new("sidewalk", _jitter(rng, look.sidewalk * 1.15, 0.1), smooth=0.05, grain=0.05)
    bands = [(side.curb, curb, False), (side.sidewalk, walk, True)]
    if side.parking > 0:
        parking = cv.new("parking", _jitter(rng, look.road * 1.1, 0.1), smooth=0.08, grain=0.07)
        bands.insert(0, (side.parking, parking, True))
    if side.terrain > 0:
        bands.append((side.terrain, cv.new("terrain", look.grass, smooth=0.3, grain=0.2), False))
    edges = [side.road]
    for width, _, _ in bands:
        edges.append(edges[-1] + width)
    outer = bands[-1] if side.park else bands[-2 if side.terrain > 0 else -1]  # hidden behind facades
    bands.append(outer)
    return edges, [b[1] for b in bands], [b[2] for b in bands]


def _paving(cv: _Canvas, rng: np.random.Generator, r0: int, lat, z_row, paved, road) -> None:
    """Tile joints on sidewalks (and cobbles on some roads), in the photo only."""
    period = rng.uniform(0.25, 0.5)
    area = paved & (((lat / period) % 1.0 < 0.12) | ((z_row / period) % 1.0 < 0.12)[:, None])
    if rng.random() < 0.2:
        cobble = rng.uniform(0.1, 0.18)
        area |= road & (((lat / cobble) % 1.0 < 0.2) | ((z_row / cobble) % 1.0 < 0.2)[:, None])
    sh = cv.shade[r0:]
    np.multiply(sh, rng.uniform(0.7, 0.9), out=sh, where=area)


def _lane_marks(cv: _Canvas, rng: np.random.Generator, r0: int, lat, z_row, left: _Side, right: _Side, lane: float):
    """White paint on the road; still class 'road' in the mask, as in Cityscapes."""
    paint = cv.new("road", _gray(rng.uniform(150, 210)), smooth=0.1, grain=0.05)
    cam = cv.cam
    lines = [k * lane + lane / 2 for k in range(-4, 4)]
    lines = [x for x in lines if -left.road + 0.5 < x < right.road - 0.5]
    if left.parked_lane:
        lines.append(-left.road + 2.2)
    if right.parked_lane:
        lines.append(right.road - 2.2)
    period, duty, phase = rng.uniform(6, 12), rng.uniform(0.3, 0.6), rng.random()
    dashes = ((z_row / period + phase) % 1.0) < duty
    reg = cv.region[r0:]
    for x_line in lines:
        width = rng.uniform(0.1, 0.16)
        x_far, x_near = cam.x_v, cam.x(x_line, cam.f * cam.cam_h / max(cam.size - cam.y_h, 1.0))
        c0, c1 = _span(min(x_far, x_near) - 2, max(x_far, x_near) + 2, cam.size)
        if c0 >= c1:
            continue
        m = np.abs(lat[:, c0:c1] - x_line) < width / 2
        if rng.random() < 0.7:
            m &= dashes[:, None]
        reg[:, c0:c1][m] = paint
    if rng.random() < 0.15:  # zebra crossing
        z0 = rng.uniform(8, 30)
        rows = slice(*_span(cam.y(0.0, z0 + 4), cam.y(0.0, z0), cam.size))
        rr = slice(max(rows.start - r0, 0), max(rows.stop - r0, 0))
        sub = lat[rr]
        m = ((sub / 1.0) % 1.0 < 0.5) & (sub > -left.road + 0.3) & (sub < right.road - 0.3)
        reg[rr][m] = paint


def _windows(wall: _Wall, z_or_lat: np.ndarray, spacing: float, fill: float, floor: float, lo: float, hi: float):
    """Window grid on a facade: columns every `spacing` metres along the facade, one row per floor."""
    along = (z_or_lat / spacing) % 1.0 < fill
    across = ((wall.h / floor) % 1.0 > 0.3) & ((wall.h / floor) % 1.0 < 0.8) & (wall.h > lo) & (wall.h < hi)
    return wall.box.m & across & along[None, :]


def _facade_look(rng: np.random.Generator, cv: _Canvas, light: float) -> tuple[int, int, dict]:
    base = _jitter(rng, _FACADES[int(rng.integers(len(_FACADES)))], 0.3) * light
    wall = cv.new("building", base, smooth=rng.uniform(0.04, 0.14), grain=rng.uniform(0.02, 0.06))
    glass = _jitter(rng, (45, 50, 60), 0.4)
    win = cv.new("building", glass, smooth=rng.uniform(0.15, 0.4), grain=0.03)
    style = {
        "spacing": rng.uniform(2.2, 4.0),
        "fill": rng.uniform(0.3, 0.6),
        "floor": rng.uniform(2.9, 3.6),
    }
    return wall, win, style


def _facade_block(cv: _Canvas, rng: np.random.Generator, lat: float, z0: float, z1: float, light: float) -> None:
    height = rng.uniform(7, 26)
    w = _wall(cv.cam, cv.c, lat, z0, z1, 0.0, height)
    if w is None:
        return
    wall, win, st = _facade_look(rng, cv, light)
    cv.paint(w.box, wall)
    zcol = cv.cam.f / w.t
    cv.paint(_sub(w.box, _windows(w, zcol - z0, st["spacing"], st["fill"], st["floor"], 3.0, height - 1.0)), win)
    if rng.random() < 0.6:  # shop fronts: wide ground-floor windows
        shop = cv.new("building", _jitter(rng, (40, 42, 48), 0.5), smooth=0.3, grain=0.03)
        m = w.box.m & (w.h > 0.4) & (w.h < 2.6) & (((zcol - z0) / rng.uniform(3, 6)) % 1.0 < 0.7)[None, :]
        cv.paint(_sub(w.box, m), shop)
    cv.darken(_sub(w.box, w.box.m & (w.h > height - 0.5)), 0.7)  # cornice shadow


def _facades(cv: _Canvas, rng: np.random.Generator, side: _Side, z_end: float) -> None:
    lat = side.sign * side.facade
    light = rng.uniform(0.7, 1.1)  # sunny and shaded sides of the street
    z = 1.0
    while z < z_end:
        length = rng.uniform(6, 28)
        if rng.random() < 0.1:  # alley: see through to the sky
            z += rng.uniform(3, 10)
            continue
        _facade_block(cv, rng, lat, z, min(z + length, z_end), light)
        z += length


def _park(cv: _Canvas, rng: np.random.Generator, side: _Side, z_end: float, look: _Look) -> None:
    """A tree line with an irregular top instead of buildings."""
    base, amp = rng.uniform(6, 12), rng.uniform(1, 4)
    w = _wall(cv.cam, cv.c, side.sign * side.facade, 1.0, z_end, 0.0, base + 2 * amp)
    if w is None:
        return
    z = cv.cam.f / w.t
    k1, k2, p1, p2 = rng.uniform(0.1, 0.3), rng.uniform(0.5, 1.2), rng.uniform(0, 6.3), rng.uniform(0, 6.3)
    top = base + amp * (np.sin(z * k1 + p1) + 0.5 * np.sin(z * k2 + p2))
    rid = cv.new("vegetation", _jitter(rng, look.green, 0.15), smooth=0.35, grain=0.25)
    cv.paint(_sub(w.box, w.box.m & (w.h < top[None, :])), rid)


def _skyline(cv: _Canvas, rng: np.random.Generator, z_far: float, look: _Look) -> None:
    """Buildings (and a few trees) facing the camera where the street ends."""
    cam = cv.cam
    t = cam.t(z_far)
    lat = (0.0 - cam.x_v) / (cam.ax * t) - 2
    lat_end = (cam.size - cam.x_v) / (cam.ax * t) + 2
    win = cv.new("building", _jitter(rng, (60, 62, 70), 0.3), smooth=0.2, grain=0.03)
    while lat < lat_end:
        width = rng.uniform(8, 35)
        kind = rng.random()
        if kind < 0.15:
            rid = cv.new("vegetation", _jitter(rng, look.green, 0.2), smooth=0.35, grain=0.25)
            cv.paint(_front_ellipse(cam, cv.c, lat + width / 2, 5, width / 2, 5, z_far), rid)
        elif kind < 0.95:
            height = rng.uniform(5, 35)
            base = _jitter(rng, _FACADES[int(rng.integers(len(_FACADES)))], 0.3)
            rid = cv.new("building", base, smooth=0.08, grain=0.03)
            box = _front(cam, lat, lat + width, 0.0, height, z_far)
            cv.paint(box, rid)
            floor = rng.uniform(2.9, 3.6)
            if box is not None and floor * t >= 4:
                cols = (cv.c[box.x0 : box.x1] - cam.x_v) / (cam.ax * t)
                hs = cam.cam_h - (cv.c[box.y0 : box.y1] - cam.y_h) / t
                across = ((hs / floor) % 1.0 > 0.35) & ((hs / floor) % 1.0 < 0.8) & (hs > 3) & (hs < height - 1)
                along = ((cols - lat) / rng.uniform(2.5, 4)) % 1.0 < 0.5
                cv.paint(_sub(box, across[:, None] & along[None, :]), win)
        lat += width


def _side_walls(cv: _Canvas, rng: np.random.Generator, side: _Side, look: _Look) -> None:
    """Now and then a hedge, wall or fence along the outer edge of the sidewalk."""
    u = rng.random()
    if u > 0.45:
        return
    z0 = rng.uniform(2, 30)
    z1 = z0 + rng.uniform(8, 40)
    lat = side.sign * (side.walk_out - 0.2)
    if u < 0.15:
        w = _wall(cv.cam, cv.c, lat, z0, z1, 0.0, rng.uniform(0.8, 1.8))
        if w is not None:
            cv.paint(w.box, cv.new("vegetation", _jitter(rng, look.green, 0.2), smooth=0.35, grain=0.3))
    elif u < 0.3:
        w = _wall(cv.cam, cv.c, lat, z0, z1, 0.0, rng.uniform(0.6, 2.2))
        if w is not None:
            cv.paint(w.box, cv.new("wall", _jitter(rng, (140, 135, 125), 0.35), smooth=0.1, grain=0.05))
    else:
        w = _wall(cv.cam, cv.c, lat, z0, z1, 0.0, rng.uniform(0.9, 1.8))
        if w is not None:
            cv.paint(w.box, cv.new("fence", _jitter(rng, (110, 105, 95), 0.4), smooth=0.1, grain=0.08))
            bars = ((cv.cam.f / w.t) / rng.uniform(0.1, 0.25)) % 1.0 < 0.4
            cv.darken(_sub(w.box, w.box.m & bars[None, :]), 0.55)


# ---------------------------------------------------------------------------------------------
# Objects, drawn far to near.


class _Shared(NamedTuple):
    """Regions that every object of a kind shares: keeps a busy scene under 256 regions."""

    glass: int
    tyre: int
    tail: int
    head: int
    skin: int
    trunk: int
    pole: int
    sign_back: int


def _shared(cv: _Canvas, rng: np.random.Generator, look: _Look) -> _Shared:
    return _Shared(
        glass=cv.new("car", _jitter(rng, (35, 40, 50), 0.4), smooth=0.3, grain=0.03),
        tyre=cv.new("car", _jitter(rng, (22, 22, 24), 0.3), smooth=0.05, grain=0.03),
        tail=cv.new("car", _jitter(rng, (170, 30, 30), 0.2), smooth=0.05, grain=0.02),
        head=cv.new("car", _jitter(rng, (210, 210, 190), 0.1), smooth=0.05, grain=0.02),
        skin=cv.new("person", _jitter(rng, (185, 145, 120), 0.25), smooth=0.05, grain=0.03),
        trunk=cv.new("vegetation", _jitter(rng, (70, 60, 50), 0.3), smooth=0.2, grain=0.15),
        pole=cv.new("pole", look.pole, smooth=0.05, grain=0.03),
        sign_back=cv.new("static", _gray(rng.uniform(90, 150)), smooth=0.05, grain=0.03),
    )


def _car(cv: _Canvas, rng: np.random.Generator, sh: _Shared, lat: float, z: float, facing: bool) -> None:
    """A car seen from behind (or the front, oncoming), plus its side if it is off-axis."""
    cam, c = cv.cam, cv.c
    r = rng.random()
    label, width, length, height = "car", rng.uniform(1.65, 1.95), rng.uniform(4.0, 4.9), rng.uniform(1.4, 1.6)
    if r < 0.08:
        label, width, length, height = "car", rng.uniform(1.9, 2.1), rng.uniform(4.8, 5.5), rng.uniform(1.9, 2.3)
    elif r < 0.12:
        label, width, length, height = str(rng.choice(["truck", "bus"])), 2.5, rng.uniform(7, 12), rng.uniform(3, 3.6)
    boxy = label != "car" or height > 1.8
    body = cv.new(label, _jitter(rng, _CAR_PAINT[int(rng.integers(len(_CAR_PAINT)))], 0.15), 0.06, 0.02)
    waist = height * (0.6 if boxy else 0.55)
    x0, x1 = lat - width / 2, lat + width / 2
    cv.darken(_ground_quad(cam, c, x0 - 0.15, x1 + 0.15, z - 0.3, z + length), rng.uniform(0.45, 0.7))
    near = x0 if x0 > 0.3 else (x1 if x1 < -0.3 else None)
    big = width * cam.ax * cam.t(z) >= 8  # details only where they cover pixels
    if near is not None:
        inward = 0.0 if boxy else (0.15 if near < 0 else -0.15)
        cv.paint(_wall_box(cam, c, near, z, z + length, 0.25, waist), body, 0.85)
        cv.paint(_wall_box(cam, c, near + inward, z + (0.2 if boxy else 0.9), z + length - (0.1 if boxy else 0.8), waist, height), body, 0.9)
        if big:
            cv.paint(_wall_box(cam, c, near + inward, z + (0.4 if boxy else 1.1), z + length - (0.3 if boxy else 1.0), waist + 0.08, height - 0.1), sh.glass)
            for zw in (z + 0.6, z + length - 1.3):
                cv.paint(_wall_box(cam, c, near, zw, zw + 0.7, 0.0, 0.65), sh.tyre)
    grad = np.linspace(1.05, 0.7, 8, dtype=np.float32)
    lower = _front(cam, x0, x1, 0.25, waist, z)
    if lower is not None:
        rows = np.interp(np.arange(lower.y1 - lower.y0), [0, max(lower.y1 - lower.y0 - 1, 1)], [grad[0], grad[-1]])
        cv.paint(lower, body, rows.astype(np.float32)[:, None])
    inset = 0.0 if boxy else 0.15
    cv.paint(_front(cam, x0 + inset, x1 - inset, waist, height, z + (0.0 if boxy else 0.5)), body)
    cv.paint(_front(cam, x0 + 0.05, x0 + 0.35, 0.0, 0.3, z + 0.3), sh.tyre)
    cv.paint(_front(cam, x1 - 0.35, x1 - 0.05, 0.0, 0.3, z + 0.3), sh.tyre)
    if big:
        zg = z + (0.0 if boxy else 0.5)
        top = height - (0.1 if boxy else 0.08)
        cv.paint(_front(cam, x0 + inset + 0.12, x1 - inset - 0.12, waist + (0.6 if boxy else 0.08), top, zg), sh.glass)
        lamp = sh.head if facing else sh.tail
        cv.paint(_front(cam, x0 + 0.05, x0 + 0.3, waist - 0.25, waist - 0.08, z), lamp)
        cv.paint(_front(cam, x1 - 0.3, x1 - 0.05, waist - 0.25, waist - 0.08, z), lamp)


def _wall_box(cam: _Camera, c: np.ndarray, lat: float, z0: float, z1: float, h0: float, h1: float) -> _Box | None:
    w = _wall(cam, c, lat, z0, z1, h0, h1)
    return None if w is None else w.box


def _person(cv: _Canvas, rng: np.random.Generator, sh: _Shared, lat: float, z: float) -> None:
    cam = cv.cam
    h = rng.uniform(1.5, 1.92)
    legs = cv.new("person", _jitter(rng, (45, 45, 55), 0.5), smooth=0.05, grain=0.03)
    top = cv.new("person", _jitter(rng, rng.uniform(30, 170, 3), 0.3), smooth=0.08, grain=0.03)
    stride = rng.uniform(0.0, 0.12)
    cv.paint(_front(cam, lat - 0.17 - stride, lat - 0.01, 0.0, 0.48 * h, z), legs)
    cv.paint(_front(cam, lat + 0.01, lat + 0.17 + stride, 0.0, 0.48 * h, z), legs)
    cv.paint(_front(cam, lat - 0.22, lat + 0.22, 0.46 * h, 0.83 * h, z), top, np.float32(rng.uniform(0.85, 1.05)))
    cv.paint(_front(cam, lat - 0.27, lat - 0.2, 0.5 * h, 0.8 * h, z), top, 0.8)
    cv.paint(_front(cam, lat + 0.2, lat + 0.27, 0.5 * h, 0.8 * h, z), top, 0.8)
    cv.paint(_front_ellipse(cam, cv.c, lat, 0.91 * h, 0.1, 0.12, z), sh.skin)
    if rng.random() < 0.5:  # hair or hat
        cv.paint(_front_ellipse(cam, cv.c, lat, 0.95 * h, 0.1, 0.07, z), legs)


def _pole(cv: _Canvas, rng: np.random.Generator, sh: _Shared, lat: float, z: float) -> None:
    """A plain pole or street lamp, or one carrying a traffic sign or a traffic light."""
    cam, c = cv.cam, cv.c
    kind = rng.random()
    height = rng.uniform(2.6, 3.5) if kind < 0.45 else rng.uniform(3.5, 8.0)
    hw = rng.uniform(0.05, 0.1)
    cv.paint(_front(cam, lat - hw, lat + hw, 0.0, height, z), sh.pole)
    if kind < 0.45:
        back = rng.random() < 0.2  # backs of signs are 'static' void in Cityscapes
        rgb = [(190, 35, 35), (35, 70, 170), (225, 225, 220), (230, 195, 40)][int(rng.integers(4))]
        rid = sh.sign_back if back else cv.new("traffic sign", _jitter(rng, rgb, 0.15), smooth=0.05, grain=0.03)
        size = rng.uniform(0.3, 0.45)
        shape = rng.random()
        hc = height - size
        if shape < 0.4:
            cv.paint(_front_ellipse(cam, c, lat, hc, size, size, z), rid)
        elif shape < 0.7:
            t = cam.t(z)
            cv.paint(_triangle(c, cam.x(lat, z), cam.y(hc + size, z), size * cam.ax * t * 1.1, 2 * size * t), rid)
        else:
            cv.paint(_front(cam, lat - size, lat + size, hc - size * 0.7, hc + size * 0.7, z), rid)
    elif kind < 0.6:
        box = cv.new("traffic light", _gray(rng.uniform(25, 50)), smooth=0.05, grain=0.03)
        top = height + 0.9
        cv.paint(_front(cam, lat - 0.15, lat + 0.15, height, top, z), box)
        lamp = [(220, 40, 30), (230, 170, 30), (60, 200, 90)][int(rng.integers(3))]
        hl = [top - 0.2, top - 0.45, top - 0.7][int(rng.integers(3))]
        cv.paint(_front_ellipse(cam, c, lat, hl, 0.08, 0.08, z), cv.new("traffic light", np.asarray(lamp), 0.05, 0.03))
    elif kind < 0.85:  # street lamp: arm over the road and a lamp head, all 'pole'
        arm = -np.sign(lat) * rng.uniform(0.8, 1.8)
        cv.paint(_front(cam, min(lat, lat + arm), max(lat, lat + arm), height - 0.12, height, z), sh.pole)
        cv.paint(_front(cam, lat + arm - 0.25, lat + arm + 0.25, height - 0.3, height, z), sh.pole)


def _tree(cv: _Canvas, rng: np.random.Generator, sh: _Shared, look: _Look, lat: float, z: float) -> None:
    cam, c = cv.cam, cv.c
    trunk_h, r = rng.uniform(1.8, 3.5), rng.uniform(1.4, 3.2)
    cv.paint(_front(cam, lat - 0.14, lat + 0.14, 0.0, trunk_h + r, z), sh.trunk)
    crown = cv.new("vegetation", _jitter(rng, look.green, 0.2), smooth=rng.uniform(0.25, 0.45), grain=0.25)
    for _ in range(int(rng.integers(3, 7))):
        dl, dh = rng.normal(0, 0.45 * r), rng.normal(0, 0.35 * r)
        rl, rh = r * rng.uniform(0.55, 1.0), r * rng.uniform(0.55, 1.0)
        cv.paint(_front_ellipse(cam, c, lat + dl, trunk_h + r + dh, rl, rh, z), crown, np.float32(rng.uniform(0.8, 1.1)))


def _bush(cv: _Canvas, rng: np.random.Generator, look: _Look, lat: float, z: float) -> None:
    r = rng.uniform(0.5, 1.2)
    rid = cv.new("vegetation", _jitter(rng, look.green, 0.25), smooth=0.4, grain=0.3)
    cv.paint(_front_ellipse(cv.cam, cv.c, lat, r * 0.7, r * rng.uniform(1, 2), r, z), rid)


def _clutter(cv: _Canvas, rng: np.random.Generator, lat: float, z: float) -> None:
    """Bins, bollards, boxes: void classes 'dynamic' and 'static'."""
    if rng.random() < 0.5:
        rid = cv.new("dynamic", _jitter(rng, rng.choice([(60, 80, 60), (50, 50, 55), (120, 90, 40)]), 0.3), 0.1, 0.05)
        cv.paint(_front(cv.cam, lat - 0.35, lat + 0.35, 0.0, rng.uniform(0.9, 1.3), z), rid)
    else:
        rid = cv.new("static", _gray(rng.uniform(30, 140)), 0.1, 0.05)
        cv.paint(_front(cv.cam, lat - 0.1, lat + 0.1, 0.0, rng.uniform(0.6, 1.0), z), rid)


def _objects(
    rng: np.random.Generator, left: _Side, right: _Side, lane: float, z_far: float
) -> list[tuple[float, Callable[..., None], tuple]]:
    """(depth, draw function, arguments) for everything standing on the street."""
    objs: list[tuple[float, Callable[..., None], tuple]] = []
    zmax = min(z_far, 90.0)
    for side in (left, right):
        s = side.sign
        walk0 = side.walk_in + side.curb
        if side.parked_lane or side.parking > 0:
            lat = s * (side.road - 1.1) if side.parked_lane else s * (side.road + side.parking / 2)
            z = rng.uniform(3, 15)
            while z < zmax and rng.random() < 0.85:
                objs.append((z, _car, (lat + rng.normal(0, 0.1), z, s < 0 and rng.random() < 0.3)))
                z += rng.uniform(4.6, 9.0)
        if rng.random() < 0.6 and not side.park:
            z = rng.uniform(4, 12)
            lat = s * (side.walk_out - rng.uniform(0.6, 1.0))
            while z < zmax:
                objs.append((z, _tree, (lat, z)))
                z += rng.uniform(8, 16)
        if side.park or side.terrain > 0:
            for _ in range(int(rng.integers(1, 5))):
                z = rng.uniform(4, zmax)
                place = side.walk_out + rng.uniform(0.3, max(side.terrain, 0.4))
                objs.append((z, _tree if rng.random() < 0.6 else _bush, (s * place, z)))
        for _ in range(int(rng.integers(1, 6))):
            z = rng.uniform(4, zmax)
            objs.append((z, _pole, (s * (walk0 + 0.35), z)))
        for _ in range(int(rng.integers(0, 5))):
            z = rng.uniform(4, 50)
            objs.append((z, _person, (s * (walk0 + rng.uniform(0.3, side.sidewalk - 0.3)), z)))
        for _ in range(int(rng.integers(0, 3))):
            z = rng.uniform(4, 50)
            objs.append((z, _clutter, (s * (walk0 + rng.uniform(0.2, side.sidewalk - 0.2)), z)))
    lanes = [k * lane for k in range(-3, 3) if -left.road < k * lane < right.road]
    for _ in range(int(rng.integers(0, 4))):
        k = lanes[int(rng.integers(len(lanes)))]
        z = rng.uniform(7 if k == 0 else 4, zmax)
        objs.append((z, _car, (k + rng.normal(0, 0.2), z, k < 0)))
    if rng.random() < 0.15:  # someone crossing the road
        z = rng.uniform(6, 30)
        objs.append((z, _person, (rng.uniform(-left.road, right.road), z)))
    return objs


def _bonnet(cv: _Canvas, rng: np.random.Generator) -> None:
    """The ego-vehicle bonnet at the bottom: void (0, 0, 0), with the car's star now and then."""
    s, c = cv.cam.size, cv.c
    edge, bulge = rng.uniform(0.03, 0.08) * s, rng.uniform(0.01, 0.05) * s
    cx = s / 2 + rng.normal(0, 0.03 * s)
    y_top = s - edge - bulge * (1 - ((c - cx) / (0.65 * s)) ** 2)
    r0 = max(int(y_top.min()) - 1, 0)
    box = _Box(r0, s, 0, s, c[r0:, None] >= y_top[None, :])
    rid = cv.new("ego vehicle", _gray(rng.uniform(15, 45)), smooth=0.15, grain=0.02)
    rows = np.linspace(1.5, 0.8, s - r0, dtype=np.float32)[:, None]
    cv.paint(box, rid, rows)
    if rng.random() < 0.5:
        star = cv.new("ego vehicle", _gray(rng.uniform(110, 170)), smooth=0.05, grain=0.02)
        r = 0.012 * s
        cv.paint(_ellipse(c, cx, s - edge - bulge - r * 1.3, r, r * 1.4), star)


# ---------------------------------------------------------------------------------------------
# Compose.


def _compose(cv: _Canvas, rng: np.random.Generator, tiles: _Tiles, look: _Look) -> tuple[np.ndarray, np.ndarray]:
    s = cv.cam.size
    oy, ox, ny, nx = (int(v) for v in rng.integers(0, s, 4))
    reg = cv.region
    lum = np.take(cv.smooth_amp, reg)
    lum *= tiles.smooth[oy : oy + s, ox : ox + s]
    grain = np.take(cv.grain_amp, reg)
    grain *= tiles.grain[ny : ny + s, nx : nx + s]
    lum += grain
    lum += 1.0
    lum *= cv.shade
    lum *= 1.0 - rng.uniform(0.0, 0.5) * tiles.vignette
    gain = 1.0 + rng.uniform(-0.25, 0.1) * (cv.c / s - 0.5)  # light falls off towards the bottom
    lum *= gain[:, None].astype(np.float32)
    lut = cv.photo_lut * look.light
    photo = np.take(lut, reg, axis=0)
    photo *= lum[..., None]
    _soften(photo)
    photo += tiles.sensor[nx : nx + s, oy : oy + s] * np.float32(rng.uniform(2.0, 6.0))
    np.clip(photo, 0, 255, out=photo)
    mask = np.take(cv.mask_lut, reg).view(np.uint8).reshape(s, s, 4)[..., :3]
    return photo.astype(np.uint8), np.ascontiguousarray(mask)


def _soften(img: np.ndarray) -> None:
    """In place [1 2 1] / 4 blur along both axes: camera optics are not pixel-sharp."""
    for axis in (0, 1):
        a = img.swapaxes(0, axis)
        inner = a[1:-1] * 0.5
        inner += a[:-2] * 0.25
        inner += a[2:] * 0.25
        a[1:-1] = inner


# ---------------------------------------------------------------------------------------------
# Public API.


def render_pair(rng: np.random.Generator, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """One random street scene: (photo, mask), each (size, size, 3) uint8; mask in exact label colours."""
    tiles = _tiles(size)
    cam = _camera(rng, size)
    cv = _Canvas(cam, tiles)
    look = _look(rng)
    lane = rng.uniform(2.8, 3.6)
    left, right = _side(rng, -1, lane), _side(rng, 1, lane)
    z_far = rng.uniform(60, 250)
    _sky(cv, rng)
    _ground(cv, rng, left, right, look, lane)
    _skyline(cv, rng, z_far, look)
    for side in (left, right):
        z_end = z_far if rng.random() < 0.7 else rng.uniform(30, z_far)
        if side.park:
            _park(cv, rng, side, z_end, look)
        else:
            _facades(cv, rng, side, z_end)
        _side_walls(cv, rng, side, look)
    shared = _shared(cv, rng, look)
    for _, draw, args in sorted(_objects(rng, left, right, lane, z_far), key=lambda o: -o[0]):
        if draw in (_car, _person, _pole):
            draw(cv, rng, shared, *args)
        elif draw is _tree:
            draw(cv, rng, shared, look, *args)
        elif draw is _bush:
            draw(cv, rng, look, *args)
        else:
            draw(cv, rng, *args)
    if rng.random() < 0.85:
        _bonnet(cv, rng)
    return _compose(cv, rng, tiles, look)


def encode_pair(photo: np.ndarray, mask: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """Photo left, mask right, as one JPEG (the Kaggle layout and chroma subsampling)."""
    pair = np.concatenate([photo, mask], axis=1)
    buf = io.BytesIO()
    Image.fromarray(pair, "RGB").save(buf, "JPEG", quality=quality, subsampling=JPEG_SUBSAMPLING)
    return buf.getvalue()


def pair_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of pair `index` (1-based) of a split: independent of order and worker count."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


def _write_one(split_dir: Path, split: str, seed: int, size: int, index: int) -> None:
    photo, mask = render_pair(pair_rng(seed, split, index), size)
    (split_dir / f"{index}.jpg").write_bytes(encode_pair(photo, mask))


def write_split(out_dir: Path, split: str, n: int, seed: int, size: int = 256, workers: int = 1) -> Path:
    """Write out_dir/split/1.jpg .. n.jpg; numbered files beyond n from an earlier run are removed."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    split_dir = Path(out_dir) / split
    split_dir.mkdir(parents=True, exist_ok=True)
    for old in split_dir.glob("*.jpg"):
        if old.stem.isdigit() and int(old.stem) > n:
            old.unlink()
    job = functools.partial(_write_one, split_dir, split, seed, size)
    if workers > 1 and n > 1:
        # spawn: the caller may hold threads (torch, DALI) that make fork unsafe
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
    """Both splits, then the marker `synth.json` last: its presence means the folder is complete."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).unlink(missing_ok=True)  # an old marker must not vouch for a half-rewritten folder
    write_split(out_dir, "train", n_train, seed, size, workers)
    write_split(out_dir, "val", n_val, seed, size, workers)
    tmp = out_dir / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(_meta(n_train, n_val, seed, size), indent=1) + "\n")
    os.replace(tmp, out_dir / MARKER)
    return out_dir


def _complete(folder: Path, meta: dict) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()) == meta
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def _cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("CITYSEG_CACHE", Path.home() / ".cache" / "cityseg"))


def default_dataset(
    n_train: int = 2000, n_val: int = 200, seed: int = 0, size: int = 256, cache_dir: Path | None = None
) -> Path:
    """The cached synthetic set used when no data folder is given: generated once, then reused.

    Generation goes to a temporary sibling renamed into place, so concurrent callers (DDP ranks)
    and interrupted runs never see a half-written folder under the final name."""
    root = _cache_root(cache_dir)
    final = root / f"synth-v{GENERATOR_VERSION}-train{n_train}-val{n_val}-seed{seed}-{size}px"
    meta = _meta(n_train, n_val, seed, size)
    if _complete(final, meta):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        workers = 1 if n_train + n_val < 1000 else min(len(os.sched_getaffinity(0)), 8)
        write_dataset(tmp, n_train, n_val, seed, size, workers)
        if _complete(final, meta):  # another process finished first
            shutil.rmtree(tmp)
            return final
        if final.exists():
            shutil.rmtree(final)  # incomplete or stale leftovers
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
