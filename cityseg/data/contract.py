"""What every loader promises, what it is built from, and the registry behind `--loader`.

    spec = LoaderSpec(image_size=256, batch_size=16, augment=AugmentConfig(), shuffle=True, drop_last=True,
                      device=torch.device("cuda"), dtype=torch.bfloat16)
    with make_loader("dali", files, palette, spec) as loader:
        loader.set_epoch(epoch)
        for image, target in loader: ...

The contract (`PairLoader`): batches `(image, target)` on `spec.device`; image `spec.dtype`
(B, 3, S, S), normalised with the ImageNet mean/std, channels-last strides; target int64 (B, Th, Tw)
class ids, 255 = ignore ((Th, Tw) = `spec.label_hw`: (S, S), or the labels' native size for validation).
`files` are Kaggle pair files or a `Source` of any format (cityseg/data/formats.py): every loader
reads each format with its own reader and feeds the same processing.
Train loaders (`drop_last`) shuffle per epoch and give every shard the same number of batches;
validation loaders give every sample exactly once over the shards. With augmentation off every
loader yields the plain loader's batches for the same files.

`exact_resume` says whether `set_epoch(e, start_batch)` reproduces the very batches of an
uninterrupted run (plain and cache: yes, their order and draws are pure functions of (seed, epoch);
DALI: no, it follows its own epoch counter and seeds, so a resumed run sees other, equally random,
orders and draws).

Lifetime: worker processes (plain loader), decode threads (DALI) and decode workers (cache) belong
to the loader that started them; `close()` ends them, and `with loader:` closes it on every way out.
Leaving them to garbage collection is what once made `cityseg-fast train` hang at exit.

Adding a loader: subclass `PairLoader`, take `(files, palette, spec)`, and add it to `LOADERS`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import ClassVar

import torch

from cityseg.config import AugmentConfig, DataConfig
from cityseg.data.formats import Source
from cityseg.errors import OptionError
from cityseg.palette import Palette

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# --loader name -> "module:class"; imported on first use (DALI takes seconds to import).
LOADERS = {
    "torch": "cityseg.data.torch_loader:TorchPairLoader",
    "dali": "cityseg.data.dali_loader:DaliPairLoader",
    "cache": "cityseg.data.cache_loader:CacheLoader",
}


DEFAULTS = DataConfig()  # a spec's defaults are the run settings' (declared once, in cityseg/config.py)


@dataclass(frozen=True)
class LoaderSpec:
    """The options every loader is built from (one place, not one keyword list per loader)."""

    image_size: int  # photos and masks are resized to this square size (mask: nearest)
    batch_size: int
    augment: AugmentConfig | None  # None: no augmentation (validation)
    shuffle: bool  # a new order every epoch (training)
    drop_last: bool  # training: full batches only, the same number on every shard
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32  # of the images handed over
    workers: int = DEFAULTS.workers  # worker processes (plain), decode workers (cache)
    threads: int = DEFAULTS.threads  # CPU threads (DALI)
    prefetch: int = DEFAULTS.prefetch  # batches prepared ahead per worker / DALI queue depth
    seed: int = 0
    shard_id: int = 0  # DDP rank
    num_shards: int = 1  # DDP world size
    hw_decoder_load: float = DEFAULTS.hw_decoder_load  # share of JPEG decoding on the hardware decoder (DALI, GPU)
    # Size of the targets when it differs from the images' (validation scored at the labels' native
    # size while the model runs smaller): S, or (H, W) for labels that are not square (the official
    # Cityscapes 1024x2048); None = image_size. Only without augmentation.
    target_size: int | tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.augment is not None and self.target_size not in (None, self.image_size):
            raise ValueError("target_size differs from image_size only without augmentation (validation)")

    @property
    def label_size(self) -> int | tuple[int, int]:
        return self.target_size or self.image_size

    @property
    def label_hw(self) -> tuple[int, int]:
        """The targets' (height, width)."""
        return size_hw(self.label_size)


def size_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    """S -> (S, S); (H, W) as is."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class PairLoader(ABC):
    """The loader contract (module docstring); `with loader:` closes it on the way out."""

    exact_resume: ClassVar[bool]

    @abstractmethod
    def __init__(self, files: Source | Sequence[Path], palette: Palette, spec: LoaderSpec) -> None: ...

    @abstractmethod
    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The epoch the next iteration yields, from batch `start_batch` on (a mid-epoch resume)."""

    @abstractmethod
    def __len__(self) -> int:
        """Batches in a full epoch on this shard."""

    @abstractmethod
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    @abstractmethod
    def close(self) -> None:
        """End the processes and threads behind the loader; idempotent, and a closed loader may be
        iterated again (it starts them afresh)."""

    def __enter__(self) -> PairLoader:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def dali_available() -> bool:
    """Whether NVIDIA DALI imports here (a dependency on Linux; absent on other platforms)."""
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def loader_class(kind: str) -> type[PairLoader]:
    if kind not in LOADERS:
        raise OptionError(f"--loader {kind}: expected one of {', '.join(LOADERS)}")
    module, name = LOADERS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def make_loader(kind: str, files: Source | Sequence[Path], palette: Palette, spec: LoaderSpec) -> PairLoader:
    return loader_class(kind)(files, palette, spec)


@functools.cache
def _mean_and_inv_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """255 mean and 1 / (255 std) as (1, 3, 1, 1) tensors, made once per device: building them per
    batch would be a blocking host-to-device copy, a full device sync, on every batch."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    inv_std = 1.0 / (torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255)
    return mean, inv_std


def normalize(photo: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Photos (B, 3, H, W), uint8 or float in 0..255, on their device -> (x / 255 - mean) / std as
    `dtype` in channels-last memory: the one normalisation of every loader and of `predict`."""
    mean, inv_std = _mean_and_inv_std(photo.device)
    x = (photo.float() - mean) * inv_std
    return x.to(dtype=dtype, memory_format=torch.channels_last)


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Normalised (N, 3, H, W) -> (N, H, W, 3) uint8 on the CPU, for display."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = image.float().cpu() * std + mean
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
