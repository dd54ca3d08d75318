"""Things on the street, drawn far to near: vehicles, people, poles with signs, lamps and traffic
lights, trees, bushes, bins and bollards, and the ego-vehicle bonnet along the bottom."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from cityseg.data.synth.canvas import (
    _Box,
    _Canvas,
    _ellipse,
    _ellipses,
    _front,
    _front_ellipse,
    _rect,
    _span,
    _sub,
    _triangle,
    _wall_columns,
)
from cityseg.data.synth.primitives import RGB, _Rand
from cityseg.data.synth.scene import _gray, _jitter, _Look, _Side

_CAR_PAINT: tuple[RGB, ...] = (
    (25, 25, 28), (35, 35, 40), (200, 200, 205), (155, 158, 162), (110, 112, 115),
    (130, 20, 25), (25, 45, 110), (20, 30, 60), (40, 70, 45), (210, 180, 40), (90, 90, 95),
)  # fmt: skip


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
