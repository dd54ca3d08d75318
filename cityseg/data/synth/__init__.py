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

Modules, each importing only those above it:

    primitives  randomness, texture tiles, per-thread buffers
    canvas      camera, region map, shape masks
    scene       per-scene look, street sides, background (sky, ground, skyline, facades, walls)
    things      things on the street, far to near (vehicles, people, poles, signs, trees, clutter)
    render      scene -> planar photo | mask pair -> JPEG bytes (`render_pair`, `encode_pair`)
    dataset     numbered files per split, the marker, the cached default set (`write_dataset`)
"""

from __future__ import annotations

from cityseg.data.synth.canvas import LABEL_COLORS
from cityseg.data.synth.dataset import (
    MARKER,
    PARTIAL,
    check_synth_target,
    default_cache_dir,
    default_dataset,
    write_dataset,
    write_split,
)
from cityseg.data.synth.render import (
    GENERATOR_VERSION,
    JPEG_QUALITY,
    JPEG_SUBSAMPLING,
    SPLITS,
    encode_pair,
    pair_rng,
    render_pair,
)

__all__ = [
    "GENERATOR_VERSION",
    "JPEG_QUALITY",
    "JPEG_SUBSAMPLING",
    "LABEL_COLORS",
    "MARKER",
    "PARTIAL",
    "SPLITS",
    "check_synth_target",
    "default_cache_dir",
    "default_dataset",
    "encode_pair",
    "pair_rng",
    "render_pair",
    "write_dataset",
    "write_split",
]
