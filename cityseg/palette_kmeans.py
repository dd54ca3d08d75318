"""Learned palettes for colour-coded datasets other than Cityscapes: `--palette kmeans:K`.

K class colours are learned by k-means (k-means++ init, Lloyd iterations, in torch) on a sample of
mask pixels; each centre becomes its own class 0..K-1, ordered by frequency. Centres are rounded to
integer RGB so the Triton kernel, the lookup table and the reference agree bit for bit (see
`kernels/mask_to_class.py`). The palette is saved as JSON in the run folder so evaluation and
prediction map masks exactly as training did (`cityseg.palette.save_palette`):

    palette = parse_palette_spec("kmeans:12", lambda: sample_masks)   # or "cityscapes", or a .json
    save_palette(palette, run_dir / "palette.json")
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cityseg.options import check_palette_spec
from cityseg.palette import Palette, cityscapes_palette, load_palette
from cityseg.settings import PALETTE_MAX

MAX_K = PALETTE_MAX  # the kernel unrolls its loop over centres; 64 bounds compile time and registers


def _nearest(x: torch.Tensor, centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, 3) float32 pixels -> squared distance to, and index of, the nearest of (K, 3) centres."""
    best = torch.empty(x.shape[0], dtype=torch.float32)
    idx = torch.empty(x.shape[0], dtype=torch.int64)
    c = centers.t().contiguous()  # (3, K)
    for s in range(0, x.shape[0], 1 << 14):  # (K, chunk) matrices stay in cache
        p = x[s : s + (1 << 14)].t()
        d = (c[0, :, None] - p[0]) ** 2 + (c[1, :, None] - p[1]) ** 2 + (c[2, :, None] - p[2]) ** 2
        best[s : s + (1 << 14)], idx[s : s + (1 << 14)] = d.min(dim=0)
    return best, idx


def kmeans_centers(masks: torch.Tensor, k: int, iters: int = 20, seed: int = 0, sample: int = 200_000) -> torch.Tensor:
    """Learn k colour centres from uint8 RGB masks (..., 3): a (k', 3) float32 tensor of integer RGB.

    Deterministic per seed. Centres are rounded, deduplicated and ordered by the number of sampled
    pixels nearest to each (most frequent first); k' < k only when rounding merges centres or the
    masks hold fewer than k distinct colours.
    """
    if masks.dtype != torch.uint8 or masks.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB masks (..., 3), got {masks.dtype} {tuple(masks.shape)}")
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be in 1..{MAX_K}, got {k}")
    flat = masks.detach().cpu().reshape(-1, 3)
    if flat.shape[0] == 0:
        raise ValueError("no mask pixels to learn a palette from")
    gen = torch.Generator().manual_seed(seed)
    if flat.shape[0] > sample:
        flat = flat[torch.randint(0, flat.shape[0], (sample,), generator=gen)]
    x = flat.to(torch.float32)

    # k-means++: each next centre drawn with probability proportional to its squared distance.
    centers = x[torch.randint(0, x.shape[0], (1,), generator=gen)]
    d2 = _nearest(x, centers)[0]
    while centers.shape[0] < k and d2.sum() > 0:
        pick = torch.multinomial(d2.double(), 1, generator=gen)
        centers = torch.cat([centers, x[pick]])
        d2 = torch.minimum(d2, _nearest(x, x[pick])[0])

    assign = None
    for _ in range(iters):
        new_assign = _nearest(x, centers)[1]
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        counts = torch.bincount(assign, minlength=centers.shape[0]).to(torch.float64)
        sums = torch.zeros(centers.shape[0], 3, dtype=torch.float64).index_add_(0, assign, x.double())
        filled = counts > 0  # an emptied cluster keeps its centre
        centers[filled] = (sums[filled] / counts[filled, None]).to(torch.float32)

    centers = torch.unique(centers.round().clamp(0, 255), dim=0)
    counts = torch.bincount(_nearest(x, centers)[1], minlength=centers.shape[0])
    keep = counts > 0
    centers, counts = centers[keep], counts[keep]
    # Most frequent first; equal counts by colour (unique() sorted them), so the order is stable.
    order = torch.sort(-counts, stable=True).indices
    return centers[order].contiguous()


def kmeans_palette(
    masks: torch.Tensor,
    k: int,
    iters: int = 20,
    seed: int = 0,
    sample: int = 200_000,
    max_dist: float | None = None,
) -> Palette:
    """A palette whose classes are the k learned colours: class i = centre i, drawn in its colour."""
    centers = kmeans_centers(masks, k, iters=iters, seed=seed, sample=sample)
    n = centers.shape[0]
    names = tuple(f"cluster {i}" for i in range(n))
    return Palette(centers, torch.arange(n, dtype=torch.int64), names, centers.to(torch.uint8), max_dist)


def parse_palette_spec(
    spec: str,
    sample_masks_fn: Callable[[], torch.Tensor],
    max_dist: float | None = None,
    seed: int = 0,
) -> Palette:
    """`--palette` value -> Palette: "cityscapes", "kmeans:K" (K in 2..64, learned from
    `sample_masks_fn()`, uint8 (N, H, W, 3), called only for this case), or a saved palette .json.
    `max_dist` overrides a saved palette's threshold when given. A bad value is an OptionError."""
    check_palette_spec(spec)
    if spec == "cityscapes":
        return cityscapes_palette(max_dist)
    if spec.startswith("kmeans:"):
        return kmeans_palette(sample_masks_fn(), int(spec.removeprefix("kmeans:")), seed=seed, max_dist=max_dist)
    palette = load_palette(spec)
    if max_dist is None:
        return palette
    return Palette(palette.centers, palette.classes, palette.names, palette.colors, max_dist)


def palette_class_count(spec: str) -> int:
    """How many classes the `--palette` value makes, without learning it: 19 for cityscapes, K for
    kmeans:K, a saved palette's own count (read and checked). A bad value is an OptionError."""
    check_palette_spec(spec)
    if spec == "cityscapes":
        return cityscapes_palette().num_classes
    if spec.startswith("kmeans:"):
        return int(spec.removeprefix("kmeans:"))
    return load_palette(spec).num_classes
