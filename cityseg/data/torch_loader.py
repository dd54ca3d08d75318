"""The plain CPU loader: Pillow decode + torchvision.transforms.v2 paired augmentation + DataLoader.

It is the baseline every speed claim is measured against, so it is tuned the usual ways: worker
processes, pinned memory, persistent workers, uint8 over the worker pipe (4x fewer bytes than
float32) with normalisation done once per batch on the target device.

Augmentation is a pure function of (seed, epoch, sample index): any worker count, and a resume in
the middle of an epoch, give the same batches.
"""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from cityseg.config import AugmentConfig
from cityseg.data.contract import ClosingLoader
from cityseg.data.pairs import open_pair_image, split_pair
from cityseg.palette import IGNORE_INDEX, Palette, lookup_table
from kernels.mask_to_class import mask_to_class

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def paired_transform(aug: AugmentConfig) -> v2.Compose:
    """One geometric draw shared by photo and mask (v2 resamples a Mask with nearest and fills it
    with 255), then colour jitter, which v2 applies to the Image only."""
    steps: list[v2.Transform] = []
    if aug.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(p=aug.hflip))
    if aug.rotate_deg > 0 or aug.scale != (1.0, 1.0):
        # Zooming in by s leaves (s - 1) / 2 of the size to slide the crop window on each side.
        shift = max(0.0, (aug.scale[1] - 1.0) / 2.0)
        steps.append(
            v2.RandomAffine(
                degrees=aug.rotate_deg,
                translate=(shift, shift) if shift > 0 else None,
                scale=aug.scale,
                interpolation=v2.InterpolationMode.BILINEAR,
                fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX},
            )
        )
    if aug.color:
        steps.append(v2.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue))
    return v2.Compose(steps)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A distinct, reproducible RNG seed per (run seed, epoch, sample)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


class PairDataset(Dataset):
    """Kaggle pair files -> (photo (3, S, S) uint8, target (S, S) uint8 class ids, 255 = ignore).

    Keys are (file index, augmentation seed) from `EpochSampler`; seed None means no augmentation.
    """

    def __init__(
        self, files: Sequence[Path], palette: Palette, image_size: int, augment: AugmentConfig | None
    ) -> None:
        self.files = list(files)
        self.palette = palette
        self.image_size = image_size
        self.transform = paired_transform(augment) if augment is not None else None

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode and map one pair, resized to image_size, without augmentation."""
        _, image = open_pair_image(self.files[index])
        photo, mask_rgb = split_pair(torch.from_numpy(np.array(image)))  # writable copy
        target = mask_to_class(
            mask_rgb, self.palette.centers, self.palette.classes, self.palette.max_dist, out_dtype=torch.uint8
        )
        photo = photo.permute(2, 0, 1)  # (3, H, W) view
        if photo.shape[-1] != self.image_size:
            size = [self.image_size, self.image_size]
            photo = F.resize(photo, size, antialias=True)
            target = F.resize(target[None], size, interpolation=v2.InterpolationMode.NEAREST_EXACT)[0]
        return photo, target

    def __getitem__(self, key: tuple[int, int | None]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key
        photo, target = self.load(index)
        if self.transform is None or seed is None:
            return photo.contiguous(), target
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched (workers=0)
            torch.manual_seed(seed)
            photo, mask = self.transform(tv_tensors.Image(photo), tv_tensors.Mask(target[None]))
        return photo.as_subclass(torch.Tensor).contiguous(), mask.as_subclass(torch.Tensor)[0]


class EpochSampler(Sampler):
    """Yields (index, augmentation seed) keys for one epoch: shuffled by (seed, epoch), optionally
    one shard of `num_shards` (DDP), starting at `start_batch` (mid-epoch resume)."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        shuffle: bool,
        augment: bool,
        seed: int = 0,
        drop_last: bool = False,
        shard_id: int = 0,
        num_shards: int = 1,
    ) -> None:
        self.n, self.batch_size, self.shuffle, self.augment = n, batch_size, shuffle, augment
        self.seed, self.drop_last = seed, drop_last
        self.shard_id, self.num_shards = shard_id, num_shards
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def shard_indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.drop_last:  # training: pad so every rank runs the same number of steps
            per_shard = math.ceil(self.n / self.num_shards)
            order += order[: per_shard * self.num_shards - self.n]
        # Validation is not padded: every sample counts exactly once over all ranks.
        return order[self.shard_id :: self.num_shards]

    def num_batches(self) -> int:
        if self.drop_last:
            return math.ceil(self.n / self.num_shards) // self.batch_size
        return math.ceil(len(range(self.shard_id, self.n, self.num_shards)) / self.batch_size)

    def keys(self) -> list[tuple[int, int | None]]:
        indices = self.shard_indices()[: self.num_batches() * self.batch_size]
        indices = indices[self.start_batch * self.batch_size :]
        return [(i, sample_seed(self.seed, self.epoch, i) if self.augment else None) for i in indices]

    def __len__(self) -> int:
        return len(self.keys())

    def __iter__(self) -> Iterator[tuple[int, int | None]]:
        return iter(self.keys())


def collate_uint8(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack photos as (B, 3, H, W) uint8 in channels-last memory, targets as (B, H, W) uint8."""
    photos, targets = zip(*batch, strict=True)
    c, h, w = photos[0].shape
    out = torch.empty((len(batch), c, h, w), dtype=torch.uint8, memory_format=torch.channels_last)
    for i, p in enumerate(photos):
        out[i].copy_(p)
    return out, torch.stack(targets)


def normalize_batch(
    photo_u8: torch.Tensor, device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> normalised float on `device`, channels-last, in one fused pass."""
    photo = photo_u8.to(device, non_blocking=True)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    inv_std = 1.0 / (torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255)
    x = (photo.float() - mean) * inv_std
    return x.to(dtype=dtype, memory_format=torch.channels_last)


class TorchPairLoader(ClosingLoader):
    """Yields the loader contract: (image float (B, 3, S, S) channels-last, normalised, on `device`;
    target int64 (B, S, S), 255 = ignore, on `device`). Its worker processes persist across epochs
    until `close()` (or the end of a `with` block)."""

    def __init__(
        self,
        files: Sequence[Path],
        palette: Palette,
        *,
        image_size: int,
        batch_size: int,
        augment: AugmentConfig | None,
        shuffle: bool,
        drop_last: bool,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        workers: int = 2,
        prefetch: int = 2,
        seed: int = 0,
        shard_id: int = 0,
        num_shards: int = 1,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        if palette.classes.max() <= 255 and self.device.type == "cpu":
            lookup_table(palette)  # build/load once here so workers find it cached
        self.dataset = PairDataset(files, palette, image_size, augment)
        self.sampler = EpochSampler(
            len(files), batch_size, shuffle=shuffle, augment=augment is not None, seed=seed,
            drop_last=drop_last, shard_id=shard_id, num_shards=num_shards,
        )
        self.loader = DataLoader(
            self.dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=workers,
            collate_fn=collate_uint8,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=prefetch if workers > 0 else None,
            worker_init_fn=init_worker,
        )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return self.sampler.num_batches()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for photo_u8, target_u8 in self.loader:
            image = normalize_batch(photo_u8, self.device, self.dtype)
            target = target_u8.to(self.device, non_blocking=True).long()
            yield image, target

    def close(self) -> None:
        """Stop the persistent worker processes now; the next epoch would start new ones."""
        shutdown_workers(self.loader)


def shutdown_workers(loader: DataLoader) -> None:
    """End a DataLoader's worker processes and wait for them: what its iterator's `__del__` does,
    done at a moment we choose instead of whenever (if ever) garbage collection gets to it."""
    iterator, loader._iterator = loader._iterator, None  # the persistent-workers iterator
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


@contextmanager
def one_pass(loader: DataLoader) -> Iterator[Iterator]:
    """Iterate a non-persistent DataLoader once, its workers ended on every way out (an error
    half-way would otherwise leave them to the garbage collector)."""
    iterator = iter(loader)
    try:
        yield iterator
    finally:
        if hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()


def init_worker(_: int) -> None:
    """DataLoader `worker_init_fn`: one intra-op thread, and the signal policy below."""
    # Workers only decode and transform: one intra-op thread each avoids oversubscription.
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Ctrl-C in a terminal reaches the whole foreground process group. The main process finishes
    # the step in flight, saves last.pt and shuts the workers down itself; a worker quitting on
    # SIGINT would instead end the epoch under it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM must end a worker at once: at interpreter exit, multiprocessing sends it to every
    # worker still alive and then joins them with no timeout (a worker ignoring it hangs the exit
    # forever). Exit status 0 rather than death by the signal, so that when a whole process group
    # gets SIGTERM (Slurm, systemd) DataLoader's SIGCHLD handler does not raise in the main process
    # mid-step: the main process finishes its step, saves last.pt and stops.
    signal.signal(signal.SIGTERM, _exit_now)


def _exit_now(signum: int, frame: object) -> None:  # noqa: ARG001
    os._exit(0)
