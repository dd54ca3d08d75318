"""Camera, canvas and primitives: the pinhole camera, the region map with its per-region tables,
and shape masks (rectangles, ellipses, triangles, walls along the street, ground patches) as boxes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from cityscapesscripts.helpers.labels import labels as CITYSCAPES_LABELS

from cityseg.data.synth.primitives import RGB, _Tiles, _Work

# Exact label colours by name; 'license plate' (id -1) shares car's colour and is left out.
LABEL_COLORS: dict[str, tuple[int, int, int]] = {lab.name: tuple(lab.color) for lab in CITYSCAPES_LABELS if lab.id >= 0}

_LABEL_CODES = {name: r | (g << 8) | (b << 16) for name, (r, g, b) in LABEL_COLORS.items()}  # RGBX bytes

_MAX_REGIONS = 256  # region ids are uint8


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
