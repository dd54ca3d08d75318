"""Run configuration: frozen dataclasses filled by the CLI, printed at start, saved in the run folder
and inside every checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation; validation never augments. Geometric draws are shared by photo
    and mask (mask: nearest, fill 255); colour jitter touches the photo only."""

    hflip: float = 0.5  # probability of a horizontal flip
    rotate_deg: float = 0.0  # rotation drawn uniformly in [-deg, +deg]
    scale: tuple[float, float] = (1.0, 1.0)  # zoom drawn in [lo, hi], then centre-jittered crop back to size
    brightness: float = 0.0  # factor drawn in [1 - b, 1 + b]
    contrast: float = 0.0  # factor drawn in [1 - c, 1 + c]
    saturation: float = 0.0  # factor drawn in [1 - s, 1 + s]
    hue: float = 0.0  # shift drawn in [-h, +h], in turns (max 0.5)

    @property
    def geometric(self) -> bool:
        return self.hflip > 0 or self.rotate_deg > 0 or self.scale != (1.0, 1.0)

    @property
    def color(self) -> bool:
        return any(v > 0 for v in (self.brightness, self.contrast, self.saturation, self.hue))


NO_AUGMENT = AugmentConfig(hflip=0.0)


@dataclass(frozen=True)
class DataConfig:
    data_dir: str | None = None  # Kaggle pair folder with train/ and val/; None = cached synthetic set
    image_size: int = 256  # photos and masks are resized to this square size (mask: nearest)
    batch_size: int = 16
    loader: str = "auto"  # auto | torch | dali (auto: DALI on a GPU machine, the plain loader otherwise)
    workers: int = 2  # DataLoader worker processes / DALI CPU threads
    prefetch: int = 2  # batches prepared ahead per worker (DataLoader) or queue depth (DALI)
    cache: str = "none"  # none | device: decode the split once into device memory and augment there
    hw_decoder_load: float = 0.65  # share of JPEG decoding on the A100/H100 hardware decoder (DALI GPU)
    palette: str = "cityscapes"  # cityscapes | kmeans:K (K centres learned from a sample of masks)
    max_color_dist: float | None = None  # mask pixels farther than this from every class colour -> 255
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    skip_validate: bool = False  # skip the up-front pair validation (faster start, cruder errors)
    skip_bad: bool = False  # leave bad files out (and say how many) instead of stopping
    synth_train: int = 2000  # size of the synthetic train split used when data_dir is None
    synth_val: int = 200  # size of the synthetic val split used when data_dir is None
    synth_seed: int = 0


@dataclass(frozen=True)
class ModelConfig:
    num_classes: int = 19
    width: int = 32  # channels of the first stage; doubled at each downsampling
    depth: int = 4  # number of downsamplings; inputs must be divisible by 2**depth
    upsample: str = "transpose"  # transpose (learned 2x2 transposed conv) | bilinear


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100  # linear warm-up, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    class_weights: str = "none"  # none | inverse-sqrt-freq (computed from a sample of train masks)
    device: str = "auto"  # auto | cpu | cuda
    amp: bool | None = None  # bf16 autocast; None = on for GPU, on for CPU with AMX/bf16 support
    compile: bool | None = None  # torch.compile; None = on for GPU, off for CPU
    sync_bn: bool = False  # DDP on GPUs: synchronise BatchNorm statistics across ranks
    seed: int = 0
    patience: int = 0  # stop after this many validations without a better mIoU; 0 = never
    log_every: int = 20  # steps between progress updates that read the loss (each one syncs the GPU)
    max_steps: int = 0  # stop after this many steps in total (0 = run all epochs); --smoke sets it
    out: str | None = None  # run folder; None = runs/<date-time>
    resume: str | None = None  # run folder to continue from its checkpoints/last.pt


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Inverse of to_dict; a field this version does not know raises ValueError naming it."""
        data = dict(d["data"])
        aug = dict(data.pop("augment"))
        aug["scale"] = tuple(aug["scale"])
        return cls(
            data=_build(DataConfig, {**data, "augment": _build(AugmentConfig, aug)}),
            model=_build(ModelConfig, d["model"]),
            train=_build(TrainConfig, d["train"]),
        )


def _build(kind: type, values: dict[str, Any]) -> Any:
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(kind)})
    if unknown:
        raise ValueError(f"config from another cityseg-fast version: unknown {kind.__name__} fields {unknown}")
    return kind(**values)
