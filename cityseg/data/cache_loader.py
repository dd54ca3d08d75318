"""The device-resident cache (`--cache device`): decode the split once into device memory, augment on
the device every epoch.

    loader = CacheLoader(files, palette, LoaderSpec(image_size=256, batch_size=32, augment=AugmentConfig(),
                                                    shuffle=True, drop_last=True, device=torch.device("cuda"),
                                                    dtype=torch.bfloat16))
    for image, target in loader: ...

Decoding happens once, in the constructor: DALI ("mixed" nvJPEG) on a CUDA device when DALI is
importable, else the plain loader's Pillow decode in DataLoader workers. Photos are kept as
(N, S, S, 3) uint8 and targets as (N, S, S) uint8 class ids, 4 bytes a pixel (Kaggle train at 256:
0.73 GiB). The constructor refuses with a `CacheError` when that exceeds 80 % of free memory.

Every batch is then a gather by index and a few batched tensor ops, with no per-sample Python and no
host-device copy: flip, rotation, zoom and shift as one `affine_grid` and two `grid_sample` calls
(photo bilinear, black fill; mask nearest, fill 255), photo-only colour jitter, normalisation to
`dtype` in channels-last memory.

Same contract and epoch as `TorchPairLoader`: the epoch order, shards, length and last partial batch
come from its `EpochSampler`, so without augmentation both loaders yield identical batches. A
shuffled split with several shards caches the whole split on every rank (the sampler's global
permutation can give any sample to any rank); an unshuffled one caches only its shard.

Augmentation has the plain loader's distributions (torchvision `RandomHorizontalFlip` +
`RandomAffine` + `ColorJitter`) but not its numbers: the draws come from one device generator per
(seed, epoch, shard), all drawn at the start of the epoch so a mid-epoch start sees the same draws.
Colour jitter applies brightness, contrast, saturation, hue in that fixed order (torchvision picks a
random order) and shifts hue by rotating chroma in YIQ space (DALI `color_twist`'s method; torchvision
goes through HSV), in float without rounding to uint8 between steps.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf
from torch.utils.data import DataLoader

from cityseg.config import AugmentConfig
from cityseg.data.contract import LoaderSpec, PairLoader, dali_available, normalize, size_hw
from cityseg.data.formats import Source, as_source, labels_to_ids
from cityseg.data.sampler import EpochSampler
from cityseg.data.torch_loader import (
    PairDataset,
    collate_uint8,
    init_worker,
    one_pass,
)
from cityseg.errors import UserError
from cityseg.palette import IGNORE_INDEX, Palette, lookup_table
from cityseg.runtime import free_memory

MAX_SHARE = 0.8  # of free memory: leaves room for the model, activations and allocator slack
_DECODE_BATCH = 64
_GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, torchvision's rgb_to_grayscale weights
# RGB -> YIQ (NTSC): hue is the angle in the I-Q plane.
_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
# Columns of the per-sample random draws: all are drawn whatever is on, so switching one option
# on or off leaves the others' numbers unchanged.
FLIP, ANGLE, SCALE, SHIFT_X, SHIFT_Y, BRIGHTNESS, CONTRAST, SATURATION, HUE = range(9)


class CacheError(UserError):
    """The cache does not fit in free memory; the message says what to do instead."""


def cache_bytes(n: int, size: int, target_size: int | tuple[int, int] | None = None) -> int:
    """Device bytes to cache `n` samples: uint8 RGB photos at `size` + uint8 class ids at `target_size`."""
    h, w = size_hw(target_size or size)
    return n * (3 * size * size + h * w)


def check_fits(n: int, size: int, device: torch.device, target_size: int | tuple[int, int] | None = None) -> None:
    """Raise `CacheError` when the cache would take more than MAX_SHARE of free memory."""
    need, free = cache_bytes(n, size, target_size), free_memory(device)
    if need > MAX_SHARE * free:
        raise CacheError(
            f"cache needs {need / 2**30:.2f} GiB for {n} images at {size}x{size} but only {free / 2**30:.2f} GiB "
            f"is free on {device} (the cache may take {MAX_SHARE:.0%} of it): "
            "use --cache none or a smaller --image-size"
        )


# ---------------------------------------------------------------- one-time decode


def decode_plain(
    files: Source, indices: Sequence[int], palette: Palette, spec: LoaderSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain loader's decode (`PairDataset.load`) in DataLoader workers, copied to the device:
    photos (n, S, S, 3) uint8 and targets (n, Th, Tw) uint8, in the order of `indices`."""
    if not files.ids and palette.classes.max() <= 255:
        lookup_table(palette)  # build/load once here so workers find it cached
    device, size = spec.device, spec.image_size
    photos = torch.empty((len(indices), size, size, 3), dtype=torch.uint8, device=device)
    targets = torch.empty((len(indices), *spec.label_hw), dtype=torch.uint8, device=device)
    loader = DataLoader(
        PairDataset(files, palette, size, augment=None, target_size=spec.label_size),
        batch_size=_DECODE_BATCH,
        sampler=[(i, None) for i in indices],
        num_workers=spec.workers,
        collate_fn=collate_uint8,
        pin_memory=device.type == "cuda",
        worker_init_fn=init_worker,
    )
    start = 0
    with one_pass(loader) as batches:
        for photo, target in batches:
            end = start + photo.shape[0]
            photos[start:end].copy_(photo.permute(0, 2, 3, 1), non_blocking=True)  # channels-last = NHWC memory
            targets[start:end].copy_(target, non_blocking=True)
            start = end
    return photos, targets


def decode_dali(
    files: Source, indices: Sequence[int], palette: Palette, spec: LoaderSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `decode_plain`, with the DALI loader's readers, decode and resize: nvJPEG on a CUDA
    device (labels mapped there: the Triton kernel or the id table), DALI's CPU operators otherwise."""
    from nvidia.dali import pipeline_def
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    from cityseg.data import dali_loader as dl

    device, size, workers = spec.device, spec.image_size, spec.workers
    gpu = device.type == "cuda"
    photo_sizes, label_sizes = dl.source_sizes(files.with_samples([files[i] for i in indices]))
    max_hw = (max(h for h, _ in photo_sizes), max(w for _, w in photo_sizes))

    @pipeline_def
    def pipeline():
        encoded, labels, index, _ = dl.read_source(files, list(indices), shuffle=False, seed=0, shard_id=0,
                                                   num_shards=1)
        photo, mask = dl.decode_source(encoded, labels, ids=files.ids, gpu=gpu, hw_decoder_load=spec.hw_decoder_load,
                                       max_hw=max_hw)
        if photo_sizes != {(size, size)}:
            photo = dl.resize_photo(photo, size)
        if label_sizes != {spec.label_hw}:
            mask = dl.resize_mask(mask, spec.label_size, max(max_hw))
        return photo, mask, index

    device_id = (device.index if device.index is not None else torch.cuda.current_device()) if gpu else None
    pipe = pipeline(
        batch_size=min(_DECODE_BATCH, len(indices)), num_threads=max(1, workers), device_id=device_id, seed=0
    )
    try:
        iterator = DALIGenericIterator(
            pipe, ["photo", "mask", "index"], reader_name=dl.READER, last_batch_policy=LastBatchPolicy.PARTIAL
        )
        slot_of = torch.full((len(files),), -1, dtype=torch.int64)
        slot_of[torch.as_tensor(list(indices))] = torch.arange(len(indices))
        photos = torch.empty((len(indices), size, size, 3), dtype=torch.uint8, device=device)
        targets = torch.empty((len(indices), *spec.label_hw), dtype=torch.uint8, device=device)
        for (out,) in iterator:
            slots = slot_of[out["index"].reshape(-1).long().cpu()].to(device)
            photos.index_copy_(0, slots, out["photo"])
            ids = labels_to_ids(out["mask"], files, palette, torch.uint8)
            targets.index_copy_(0, slots, ids)
    finally:
        pipe._shutdown()  # its decode threads end here, not at interpreter exit
        if gpu:
            # DALI keeps its device memory pool after the one-time decode: hand it back, so the model
            # (and the next cache's fit check) see it free.
            from nvidia.dali.backend import ReleaseUnusedMemory

            ReleaseUnusedMemory()
    return photos, targets


# ---------------------------------------------------------------- batched augmentation


def draw_params(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(n, 9) uniform [0, 1) draws, one row per sample of the epoch (columns: FLIP .. HUE)."""
    return torch.rand((n, 9), generator=generator, device=device)


def _between(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * u


def affine_theta(u: torch.Tensor, aug: AugmentConfig, size: int) -> torch.Tensor:
    """(B, 9) draws -> (B, 2, 3) `affine_grid` matrices with RandomAffine's distributions: angle
    U(-deg, deg), zoom U(lo, hi), shift U(-t, t) * size rounded to whole pixels, t = (hi - 1) / 2
    (the room a zoom leaves to slide the crop), and a flip with probability hflip."""
    angle = _between(u[:, ANGLE], -aug.rotate_deg, aug.rotate_deg)
    scale = _between(u[:, SCALE], *aug.scale)
    max_shift = max(0.0, (aug.scale[1] - 1.0) / 2.0) * size
    shift = torch.round(_between(u[:, SHIFT_X : SHIFT_Y + 1], -max_shift, max_shift))
    return theta_from(u[:, FLIP] < aug.hflip, angle, scale, shift, size)


def theta_from(
    flip: torch.Tensor, angle: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, size: int
) -> torch.Tensor:
    """Flip (B,) bool, then torchvision's `affine(angle (B,) degrees, translate shift (B, 2) pixels,
    scale (B,))` as (B, 2, 3) output -> input matrices in normalised coordinates.

    torchvision maps output pixel p (centred coordinates, y down) to input pixel R(-angle) (p - t) / s;
    the flip before it negates the input x. On a square image normalised coordinates are pixels
    times 2 / S in both axes, so the same matrix holds with t scaled by 2 / S."""
    rad = torch.deg2rad(angle)
    cos, sin = torch.cos(rad) / scale, torch.sin(rad) / scale
    m = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], 1)  # (B, 2, 2)
    sign = torch.where(flip, -1.0, 1.0)
    m = m * torch.stack([sign, torch.ones_like(sign)], -1)[:, :, None]  # negate the input-x row
    offset = -(m @ (shift * (2.0 / size))[:, :, None])  # (B, 2, 1)
    return torch.cat([m, offset], dim=2)


def warp_pair(photo: torch.Tensor, target: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Photo (B, 3, S, S) float, target (B, S, S) uint8 -> both warped by `theta` (B, 2, 3).

    One sampling grid; the photo bilinear with black fill, the target nearest with 255 fill.
    grid_sample pads with zeros, so ids are sampled shifted by one: 0 is the fill."""
    grid = nnf.affine_grid(theta, list(photo.shape), align_corners=False)
    photo = nnf.grid_sample(photo, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    shifted = (target.float() + 1.0).unsqueeze(1)
    ids = nnf.grid_sample(shifted, grid, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0]
    ids = ids.to(torch.int64)
    return photo, torch.where(ids == 0, IGNORE_INDEX, ids - 1)


def flip_pair(photo: torch.Tensor, target: torch.Tensor, flip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip-only augmentation: exact, and cheaper than a warp. `flip` (B,) bool."""
    photo = torch.where(flip[:, None, None, None], photo.flip(-1), photo)
    return photo, torch.where(flip[:, None, None], target.flip(-1), target)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return _GRAY[0] * x[:, 0:1] + _GRAY[1] * x[:, 1:2] + _GRAY[2] * x[:, 2:3]  # (B, 1, H, W)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's `_blend`: factor * x + (1 - factor) * other, clamped to the 0..255 range."""
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1.0 - f) * other).clamp_(0.0, 255.0)


def hue_matrices(shift: torch.Tensor) -> torch.Tensor:
    """(B,) hue shifts in turns -> (B, 3, 3) RGB matrices rotating chroma in the YIQ plane."""
    yiq = _yiq_pair(shift.device)
    a = 2.0 * math.pi * shift
    cos, sin, one, zero = torch.cos(a), torch.sin(a), torch.ones_like(a), torch.zeros_like(a)
    rot = torch.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos], -1).view(-1, 3, 3)
    return yiq[1] @ rot @ yiq[0]


@functools.cache
def _yiq_pair(device: torch.device) -> torch.Tensor:
    """(2, 3, 3): RGB -> YIQ and back, made once per device (no per-batch host-device copy)."""
    yiq = torch.tensor(_YIQ, dtype=torch.float64)
    return torch.stack([yiq, torch.linalg.inv(yiq)]).float().to(device)


def _factor(u: torch.Tensor, v: float) -> torch.Tensor:
    """ColorJitter's factor range for strength v: U(max(0, 1 - v), 1 + v)."""
    return _between(u, max(0.0, 1.0 - v), 1.0 + v)


def color_jitter(x: torch.Tensor, u: torch.Tensor, aug: AugmentConfig) -> torch.Tensor:
    """Photo (B, 3, H, W) float in 0..255, per-sample factors from the draws `u` (B, 9): brightness,
    contrast (around the image's mean grey), saturation (around each pixel's grey), hue."""
    if aug.brightness > 0:
        x = (x * _factor(u[:, BRIGHTNESS], aug.brightness).view(-1, 1, 1, 1)).clamp_(0.0, 255.0)
    if aug.contrast > 0:
        x = _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), _factor(u[:, CONTRAST], aug.contrast))
    if aug.saturation > 0:
        x = _blend(x, _gray(x), _factor(u[:, SATURATION], aug.saturation))
    if aug.hue > 0:
        m = hue_matrices(_between(u[:, HUE], -aug.hue, aug.hue))
        x = torch.einsum("bij,bjhw->bihw", m, x).clamp_(0.0, 255.0)
    return x


# ---------------------------------------------------------------- the loader


def _epoch_seed(seed: int, epoch: int, shard_id: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, shard_id, 0xCAC4E]).generate_state(1, dtype=np.uint64)[0] >> 1)


class CacheLoader(PairLoader):
    """The loader contract (cityseg/data/contract.py) from a device-resident cache.

    `spec.workers` decode the split once; `spec.prefetch` is unused (a batch is a handful of device
    kernels, queued asynchronously). `decoder`: auto (DALI on a CUDA device, the plain decoder
    otherwise) | plain | dali."""

    exact_resume = True  # order from EpochSampler, draws from one generator per (seed, epoch, shard)

    def __init__(self, files: Source | Sequence[Path], palette: Palette, spec: LoaderSpec,
                 decoder: str = "auto") -> None:
        if not files:
            raise ValueError("CacheLoader needs at least one file")
        if decoder not in ("auto", "plain", "dali"):
            raise ValueError(f"unknown decoder {decoder!r}: expected auto, plain or dali")
        self.spec = spec
        self.source = as_source(files)
        self.files = [s.photo for s in self.source]
        self.device, self.dtype = spec.device, spec.dtype
        self.batch_size, self.augment = spec.batch_size, spec.augment
        self.seed, self.shard_id = spec.seed, spec.shard_id
        self.sampler = EpochSampler(
            len(self.files), spec.batch_size, shuffle=spec.shuffle, augment=False, seed=spec.seed,
            drop_last=spec.drop_last, shard_id=spec.shard_id, num_shards=spec.num_shards,
        )
        self.epoch, self.start_batch = 0, 0
        self.indices = self._readable_indices(spec.shuffle, spec.num_shards)
        check_fits(len(self.indices), spec.image_size, self.device, spec.target_size)
        if decoder == "auto":
            decoder = "dali" if self.device.type == "cuda" and dali_available() else "plain"
        decode = decode_dali if decoder == "dali" else decode_plain
        self.photos, self.targets = decode(self.source, self.indices, palette, spec)
        self._slot_of = torch.full((len(self.files),), -1, dtype=torch.int64)
        self._slot_of[torch.as_tensor(self.indices)] = torch.arange(len(self.indices))

    def _readable_indices(self, shuffle: bool, num_shards: int) -> list[int]:
        """The file indices this rank can ever read: its fixed shard, or all of a shuffled split."""
        if shuffle and num_shards > 1:
            return list(range(len(self.files)))
        return sorted(set(self.sampler.shard_indices()))

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def close(self) -> None:
        """Nothing to end: the decode workers finished in the constructor; the cache is plain tensors."""

    def __len__(self) -> int:
        return self.sampler.num_batches()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for image, target, _ in self.batches():
            yield image, target

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(image, target, file index (B,) int64 on `device`) for the rest of this epoch."""
        self.sampler.set_epoch(self.epoch)
        order = torch.tensor([i for i, _ in self.sampler], dtype=torch.int64)
        slots = self._slot_of[order].to(self.device)  # the epoch's host-to-device copies, once
        index = order.to(self.device)
        draws = None
        if self.augment is not None:
            g = torch.Generator(device=self.device).manual_seed(_epoch_seed(self.seed, self.epoch, self.shard_id))
            draws = draw_params(len(order), g, self.device)  # the whole epoch: a mid-epoch start sees the same
        b = self.batch_size
        for start in range(self.start_batch * b, len(order), b):
            u = None if draws is None else draws[start : start + b]
            image, target = self.batch(slots[start : start + b], u)
            yield image, target, index[start : start + b]

    def batch(self, slots: torch.Tensor, u: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache slots (B,) on the device, draws (B, 9) or None -> one batch of the contract."""
        photo = self.photos.index_select(0, slots).permute(0, 3, 1, 2).float()  # (B, 3, S, S) channels-last
        target = self.targets.index_select(0, slots)  # (B, S, S) uint8
        aug = self.augment
        if aug is not None and u is not None:
            if aug.rotate_deg > 0 or aug.scale != (1.0, 1.0):
                photo, target = warp_pair(photo, target, affine_theta(u, aug, photo.shape[-1]))
            elif aug.hflip > 0:
                photo, target = flip_pair(photo, target, u[:, FLIP] < aug.hflip)
            if aug.color:
                photo = color_jitter(photo, u, aug)
        return normalize(photo, self.dtype), target.long()
