"""The scene layout: per-scene colours, camera and street sides, and the background painted first
(sky, ground bands with their lines and joints, sun shadows, far skyline, facades or trees along
each side, walls and fences)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cityseg.data.synth.canvas import (
    _Box,
    _Camera,
    _Canvas,
    _front,
    _front_ellipse,
    _ground_quad,
    _span,
    _sub,
    _wall,
    _wall_columns,
)
from cityseg.data.synth.primitives import RGB, _frac, _Rand

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
