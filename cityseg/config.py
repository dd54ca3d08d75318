"""Run configuration: frozen dataclasses filled by the CLI, printed at start, saved in the run folder
and inside every checkpoint."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from cityseg.errors import OptionError, capped

SPLITS = ("train", "val")  # the Kaggle layout's folders
AUTO = "auto"  # a setting the run resolves for its device (data.batch_size)


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
    # Images per step (per GPU under DDP), or "auto": on a CUDA GPU the largest batch from 16 to 256 that
    # fits 80 % of its memory, lr and warm-up scaled from batch 16; 16 on a CPU (cityseg/training/batch_size.py).
    batch_size: int | str = "auto"
    loader: str = "auto"  # auto | torch | dali (auto: DALI on a GPU machine, the plain loader otherwise)
    workers: int = 2  # DataLoader worker processes / DALI CPU threads
    prefetch: int = 2  # batches prepared ahead per worker (DataLoader) or queue depth (DALI)
    cache: str = "none"  # none | device: decode the split once into device memory and augment there
    hw_decoder_load: float = 0.65  # share of JPEG decoding on the A100/H100 hardware decoder (DALI GPU)
    palette: str = "cityscapes"  # cityscapes | kmeans:K (K centres learned from a sample of masks)
    max_color_dist: float | None = None  # mask pixels farther than this from every class colour -> 255
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Score validation against the masks at their own size (256 px for the Kaggle files), the model's
    # logits upsampled to it, whatever image_size the model runs at: a small image_size cannot flatter
    # the figures by scoring against nearest-downsampled masks.
    val_native: bool = True
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
    norm: str = "batch"  # batch (BatchNorm) | group (GroupNorm, 8 groups: independent of the batch size)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100  # linear warm-up, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.01
    schedule: str = "cosine"  # cosine (warm-up + cosine) | onecycle
    time_budget_s: float | None = None  # training seconds (validation excluded); the LR decays over it
    # What a training second is: wall time, or this process's CPU time / its intra-op threads (the
    # same on a quiet machine, fairer on a shared one; count data loading only with workers 0).
    clock: str = "wall"
    target_acc: float | None = None  # stop once val pixel accuracy reaches this
    loss: str = "ce"  # ce (cross-entropy) | ce+dice (plus soft Dice over the classes present)
    ema: float = 0.0  # decay of an exponential moving average of the weights, validated and saved; 0 = off
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    class_weights: str = "none"  # none | inverse-sqrt-freq (computed from a sample of train masks)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto | bf16-mixed | 16-mixed | 32 (the policy: cityseg/runtime.py)
    compile: bool | None = None  # torch.compile; None = on for GPU (compute capability >= 7.0), off for CPU
    compile_mode: str | None = None  # torch.compile mode (e.g. max-autotune); None = torch's default
    sync_bn: bool = False  # DDP on GPUs: synchronise BatchNorm statistics across ranks
    seed: int = 0
    patience: int = 0  # stop after this many validations without a better mIoU; 0 = never
    # Validate (and write best.pt / last.pt) every N epochs, `Nsteps`, or `30s` of training, at the end of
    # the epoch where it falls due; `auto` keeps validation and checkpoints under 10 % of the wall time.
    # The end of the run (epochs, budget, --max-steps, target) and a signal always validate.
    val_every: str = "auto"
    log_every: int = 20  # steps between progress updates that read the loss (each one syncs the GPU)
    tensorboard: bool = True  # event files in the run folder (rank 0)
    max_steps: int = 0  # stop after this many steps in total (0 = run all epochs); --smoke sets it
    out: str | None = None  # run folder; None = runs/<date-time>
    resume: str | None = None  # run folder to continue from its checkpoints/last.pt
    init_from: str | None = None  # checkpoint whose weights start this new run (fine-tuning)


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
        train = dict(d["train"])
        if "amp" in train:  # runs and checkpoints written before --precision
            train.setdefault("precision", AMP_TO_PRECISION[train.pop("amp")])
        return cls(
            data=_build(DataConfig, {**data, "augment": _build(AugmentConfig, aug)}),
            model=_build(ModelConfig, d["model"]),
            train=_build(TrainConfig, train),
        )


AMP_TO_PRECISION = {True: "bf16-mixed", False: "32", None: "auto"}  # the old `amp` field and --amp/--no-amp


def _build(kind: type, values: dict[str, Any]) -> Any:
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(kind)})
    if unknown:
        raise ConfigError(f"config from another cityseg-fast version: unknown {kind.__name__} fields {unknown}")
    return kind(**values)


# -- overrides: presets, config files and command-line options, applied by dotted key ------------------

class ConfigError(OptionError):
    """An unknown config key or a value of the wrong type; the message names the key."""


def field_types(kind: type = Config, prefix: str = "") -> dict[str, Any]:
    """Every leaf of the config by dotted key, e.g. {"data.augment.hflip": float, ...}."""
    out: dict[str, Any] = {}
    for name, hint in typing.get_type_hints(kind).items():
        if dataclasses.is_dataclass(hint):
            out.update(field_types(hint, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = hint
    return out


def get_value(cfg: Config, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _accepts(hint: Any, value: Any) -> tuple[bool, Any]:
    """Whether `value` fits the type `hint`; returns (ok, value as the field stores it)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            ok, converted = _accepts(option, value)
            if ok:
                return True, converted
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    if typing.get_origin(hint) is tuple:
        items = typing.get_args(hint)
        if isinstance(value, (list, tuple)) and len(value) == len(items):
            pairs = [_accepts(h, v) for h, v in zip(items, value, strict=True)]
            return all(ok for ok, _ in pairs), tuple(v for _, v in pairs)
        return False, value
    raise TypeError(f"config field type {hint} is not handled")  # a new field type: extend _accepts


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def with_overrides(cfg: Config, overrides: dict[str, Any], source: str) -> Config:
    """`cfg` with the values of `overrides` ({dotted key: value}); an unknown key or a value of the
    wrong type is a ConfigError naming the key and `source` (e.g. "cfg.toml" or "preset")."""
    types_by_key = field_types()
    tree = cfg.to_dict()
    for key, value in overrides.items():
        if key == "train.amp" and value in AMP_TO_PRECISION:  # config files written before --precision
            key, value = "train.precision", AMP_TO_PRECISION[value]
        if key not in types_by_key:
            raise ConfigError(f"{source}: unknown config key {capped(repr(key), 100)}")
        ok, value = _accepts(types_by_key[key], value)
        if not ok:
            raise ConfigError(f"{source}: {key} = {capped(repr(value), 100)}: expected {_type_name(types_by_key[key])}")
        *sections, leaf = key.split(".")
        node = tree
        for section in sections:
            node = node[section]
        node[leaf] = value
    return Config.from_dict(tree)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"data": {"augment": {"hflip": 0.5}}} -> {"data.augment.hflip": 0.5} (a config file's sections)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# Named override sets, applied in `train_config` before a config file and the command line.
PRESETS: dict[str, dict[str, Any]] = {
    # Real pairs (`--data`): the recipe that learned the most per second of training on the real
    # Kaggle train split (benchmarks/results/ablation-cpu.md, accuracy-cpu.md). Sizes stay the defaults.
    "real-data": {"model.upsample": "bilinear", "train.loss": "ce+dice"},
    # The built-in synthetic data on a CPU: about five minutes on 2 cores, >= 80 % val pixel accuracy.
    "cpu-synthetic": {"data.image_size": 128, "model.width": 16, "data.batch_size": 16, "train.epochs": 4,
                      "data.synth_train": 1000, "data.synth_val": 100},
    # `--smoke`: a few steps end to end on a tiny set.
    "smoke": {"data.image_size": 64, "model.width": 8, "data.batch_size": 4, "train.epochs": 1,
              "data.synth_train": 16, "data.synth_val": 8, "train.max_steps": 6},
}


def presets_for(*, synthetic: bool, on_cpu: bool, smoke: bool) -> list[str]:
    """The presets a run gets: the measured recipe for real data, or the CPU one for the synthetic
    data on a CPU; then `smoke`."""
    if not synthetic:
        return ["real-data"] + (["smoke"] if smoke else [])
    return (["cpu-synthetic"] if on_cpu else []) + (["smoke"] if smoke else [])


def train_config(layers: list[tuple[str, dict[str, Any]]], *, on_cpu: bool, smoke: bool = False) -> Config:
    """Defaults (the dataclasses) <- presets <- each (source, {dotted key: value}) layer in order,
    e.g. [("run.toml", values from the file), ("command line", the flags the user gave)]."""
    given = {k: v for _, values in layers for k, v in values.items()}
    synthetic = given.get("data.data_dir") is None
    cfg = Config()
    for name in presets_for(synthetic=synthetic, on_cpu=on_cpu, smoke=smoke):
        cfg = with_overrides(cfg, PRESETS[name], f"preset {name}")
    for source, values in layers:
        cfg = with_overrides(cfg, values, source)
    if cfg.train.time_budget_s is not None and "train.epochs" not in given:  # the budget decides when to stop
        cfg = with_overrides(cfg, {"train.epochs": MAX_EPOCHS}, "time budget")
    return cfg


MAX_EPOCHS = 100_000
