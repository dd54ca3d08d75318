"""The plain CPU loader: Pillow decode (any format: cityseg/data/formats.py) + torchvision.transforms.v2
paired augmentation + DataLoader.

It is the baseline every speed claim is measured against, so it is tuned the usual ways: worker
processes, pinned memory, persistent workers, uint8 over the worker pipe (4x fewer bytes than
float32) with normalisation done once per batch on the target device.

Augmentation is a pure function of (seed, epoch, sample index): any worker count, and a resume in
the middle of an epoch, give the same batches.
"""

from __future__ import annotations

import multiprocessing.queues
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from cityseg.config import AugmentConfig
from cityseg.data.contract import LoaderSpec, PairLoader, normalize, size_hw
from cityseg.data.formats import Source, as_source, labels_to_ids, read_sample
from cityseg.data.sampler import EpochSampler
from cityseg.palette import IGNORE_INDEX, Palette, lookup_table


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


class PairDataset(Dataset):
    """Samples of any format (cityseg/data/formats.py) -> (photo (3, S, S) uint8, target (T, T) or
    (Th, Tw) uint8 class ids, 255 = ignore).

    Keys are (file index, augmentation seed) from `EpochSampler`; seed None means no augmentation.
    """

    def __init__(
        self, files: Source | Sequence[Path], palette: Palette, image_size: int, augment: AugmentConfig | None,
        target_size: int | tuple[int, int] | None = None,
    ) -> None:
        self.source = as_source(files)
        self.files = [s.photo for s in self.source]
        self.palette = palette
        self.image_size = image_size
        self.target_hw = size_hw(target_size or image_size)
        self.transform = paired_transform(augment) if augment is not None else None

    def __len__(self) -> int:
        return len(self.source)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode and map one sample: photo resized to image_size, target (nearest) to target_size."""
        photo, label = read_sample(self.source[index], self.source)
        target = labels_to_ids(torch.from_numpy(label), self.source, self.palette, torch.uint8)
        photo = torch.from_numpy(photo).permute(2, 0, 1)  # (3, H, W) view
        if tuple(photo.shape[-2:]) != (self.image_size, self.image_size):
            photo = F.resize(photo, [self.image_size] * 2, antialias=True)
        if tuple(target.shape[-2:]) != self.target_hw:
            nearest = v2.InterpolationMode.NEAREST_EXACT
            target = F.resize(target[None], list(self.target_hw), interpolation=nearest)[0]
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


def collate_uint8(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack photos as (B, 3, H, W) uint8 in channels-last memory, targets as (B, H, W) uint8."""
    photos, targets = zip(*batch, strict=True)
    c, h, w = photos[0].shape
    out = torch.empty((len(batch), c, h, w), dtype=torch.uint8, memory_format=torch.channels_last)
    for i, p in enumerate(photos):
        out[i].copy_(p)
    return out, torch.stack(targets)


class TorchPairLoader(PairLoader):
    """The loader contract (cityseg/data/contract.py) from a DataLoader. Its worker processes
    persist across epochs until `close()` (or the end of a `with` block)."""

    exact_resume = True

    def __init__(self, files: Source | Sequence[Path], palette: Palette, spec: LoaderSpec) -> None:
        self.spec = spec
        files = as_source(files)
        if not files.ids and palette.classes.max() <= 255:
            # Masks are mapped on the CPU, in the workers, whatever the device: build the table (7 s
            # single-threaded) or load it once here, so each worker finds it cached on disk.
            lookup_table(palette)
        self.dataset = PairDataset(files, palette, spec.image_size, spec.augment, spec.target_size)
        self.sampler = EpochSampler(
            len(files), spec.batch_size, shuffle=spec.shuffle, augment=spec.augment is not None, seed=spec.seed,
            drop_last=spec.drop_last, shard_id=spec.shard_id, num_shards=spec.num_shards,
        )
        self.loader = DataLoader(
            self.dataset,
            batch_size=spec.batch_size,
            sampler=self.sampler,
            num_workers=spec.workers,
            collate_fn=collate_uint8,
            pin_memory=spec.device.type == "cuda",
            persistent_workers=spec.workers > 0,
            prefetch_factor=spec.prefetch if spec.workers > 0 else None,
            worker_init_fn=init_worker,
        )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return self.sampler.num_batches()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.spec.device
        for photo_u8, target_u8 in self.loader:
            image = normalize(photo_u8.to(device, non_blocking=True), self.spec.dtype)
            target = target_u8.to(device, non_blocking=True).long()
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
    signal.signal(signal.SIGHUP, _exit_now)  # a closed terminal hangs up the whole group: the same
    quiet_when_orphaned(os.getppid())


def quiet_when_orphaned(parent: int) -> None:
    """Once the main process is gone (kill -9, the OOM killer), a worker exits silently instead of
    printing tracebacks on the user's terminal after the run has already died: the broken connection
    to the dead parent raises ConnectionResetError / BrokenPipeError in the worker's helper threads
    (multiprocessing's resource sharer, which hands tensors' file descriptors over, reports through
    sys.excepthook; the queue feeder through Queue._on_queue_feeder_error). Errors while the parent
    lives are printed as before."""
    report = sys.excepthook
    report_feeder_error = multiprocessing.queues.Queue._on_queue_feeder_error

    def orphaned(error: BaseException) -> bool:
        return isinstance(error, (ConnectionError, EOFError)) and os.getppid() != parent

    def excepthook(kind: type[BaseException], error: BaseException, tb: object) -> None:
        if orphaned(error):
            os._exit(0)
        report(kind, error, tb)

    def feeder_error(error: BaseException, obj: object) -> None:
        if orphaned(error):
            os._exit(0)
        report_feeder_error(error, obj)

    sys.excepthook = excepthook
    multiprocessing.queues.Queue._on_queue_feeder_error = staticmethod(feeder_error)


def _exit_now(signum: int, frame: object) -> None:  # noqa: ARG001
    os._exit(0)
