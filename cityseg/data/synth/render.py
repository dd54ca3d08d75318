"""From scene to pair: `_render` lays out one scene and composes the planar photo | mask arrays in
buffers; the pair is then one RGB image and one JPEG (the Kaggle quality and chroma subsampling)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from cityseg.config import SPLITS
from cityseg.data.synth.canvas import _Canvas
from cityseg.data.synth.primitives import _AMP_MAX, _Rand, _Tiles, _tiles, _work
from cityseg.data.synth.scene import (
    _camera,
    _facades,
    _ground,
    _Look,
    _look,
    _side,
    _side_wall,
    _sky,
    _skyline,
    _sun_shadows,
    _tree_line,
)
from cityseg.data.synth.things import _bonnet, _shared, _street_things

GENERATOR_VERSION = 1  # bump whenever the output pixels change: it names the cache folder
JPEG_QUALITY = 95  # the Kaggle files carry libjpeg's standard tables scaled to quality 95
JPEG_SUBSAMPLING = "4:2:0"  # as the Kaggle files: mask colours bleed at edges as theirs do


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
