"""Run configuration: frozen dataclasses, saved in the run folder and inside every checkpoint. Each
field is a setting declared once, here: its default and type, and with `setting(...)` its help, flag,
range or choices and whether --resume may change it (cityseg/settings.py); `SETTINGS` holds them by key."""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from cityseg.errors import OptionError, capped
from cityseg.settings import (
    AUG,
    COMPILE_MODES,
    DATA,
    LOADING,
    MAX_EPOCHS,
    MODEL,
    OUTPUT,
    PALETTE_MAX,
    SEED_MAX,
    SPEED,
    Number,
    NumberOrAuto,
    Setting,
    count,
    parse_batch_size,
    parse_duration,
    parse_scale,
    setting,
)

SPLITS = ("train", "val")  # the Kaggle layout's folders
AUTO = "auto"  # a setting the run resolves for its device (data.batch_size)


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation; validation never augments. Geometric draws are shared by photo
    and mask (mask: nearest, fill 255); colour jitter touches the photo only."""

    hflip: float = setting(0.5, "Horizontal flip probability.", flag="--hflip", panel=AUG, rule=Number(0, 1))
    rotate_deg: float = setting(0.0, "Random rotation range, ± degrees.", flag="--rotate", panel=AUG,
                                rule=Number(0, 180))
    scale: tuple[float, float] = setting((1.0, 1.0), "Random zoom range LO,HI, then a crop back to size.",
                                         flag="--scale", panel=AUG, parse=parse_scale, shown="1,1")
    # Colour factors drawn in [1 - x, 1 + x]; one flag sets the three.
    brightness: float = setting(0.0, "Brightness, contrast and saturation jitter, photo only.", flag="--jitter",
                                panel=AUG, rule=Number(0, 1), also=("data.augment.contrast", "data.augment.saturation"))
    contrast: float = setting(0.0, "Contrast jitter (--jitter sets it).", rule=Number(0, 1))
    saturation: float = setting(0.0, "Saturation jitter (--jitter sets it).", rule=Number(0, 1))
    hue: float = setting(0.0, "Hue shift range in turns, photo only.", flag="--hue", panel=AUG, rule=Number(0, 0.5))

    @property
    def geometric(self) -> bool:
        return self.hflip > 0 or self.rotate_deg > 0 or self.scale != (1.0, 1.0)

    @property
    def color(self) -> bool:
        return any(v > 0 for v in (self.brightness, self.contrast, self.saturation, self.hue))


NO_AUGMENT = AugmentConfig(hflip=0.0)


@dataclass(frozen=True)
class DataConfig:
    data_dir: str | None = setting(
        None, "Kaggle pairs, image/mask folders or the official Cityscapes tree (with --resume: the run's "
        "files' new place).", flag="--data", panel=DATA, path=True,
        shown="a cached synthetic city set", resume=True)
    format: str = setting("auto", "Dataset layout; auto: detected.", flag="--format", panel=DATA,
                          choices=("auto", "pairs", "folders", "cityscapes"))
    # Config file / --set only (`[data] id_map = "cityscapes"`): the layout's own choice is nearly always right.
    id_map: str = setting(
        "auto", "Class-id masks -> classes: train (values are class ids, others void), cityscapes (labelIds -> "
        "19 trainIds); auto: cityscapes for the official layout, else train.",
        choices=("auto", "train", "cityscapes"))
    image_size: int = setting(
        256, "Square train/val size in pixels (the checkpoint's with --init-from).",
        flag="--image-size", panel=DATA, rule=count(16, 8192))
    batch_size: int | str = setting(
        AUTO, "Images per step, or auto: a GPU's smallest batch near its best images/s (lr, warm-up "
        "scaled from 16); 16 on a CPU.", flag="--batch-size", panel=DATA,
        rule=NumberOrAuto(1, 65_536, whole=True), parse=parse_batch_size)
    loader: str = setting(
        "auto", "auto: DALI on a GPU, else torch (the plain loader); cache: decode once into device memory.",
        flag="--loader", panel=LOADING, choices=("auto", "torch", "dali", "cache"))
    workers: int = setting(2, "Worker processes of the plain loader and the cache's decoding.", flag="--workers",
                           panel=LOADING, rule=count(0, 256), resume=True)
    threads: int = setting(4, "CPU threads: DALI's, and the file check's before training.", flag="--threads",
                           panel=LOADING, rule=count(1, 256), resume=True)
    prefetch: int = setting(2, "Batches prefetched per worker / DALI queue depth.", flag="--prefetch",
                            panel=LOADING, rule=count(1, 64), resume=True)
    cache: str = setting("none", "device: the older spelling of --loader cache.", flag="--cache", panel=LOADING,
                         choices=("none", "device"))
    hw_decoder_load: float = setting(0.65, "Share of JPEG decoding on the A100/H100 hardware decoder (DALI GPU).",
                                     rule=Number(0, 1))
    palette: str = setting("cityscapes", "Mask colours -> classes: cityscapes, kmeans:K or a .json.",
                           flag="--palette", panel=DATA)
    max_color_dist: float | None = setting(
        None, "Ignore mask pixels farther than this (RGB) from every class colour.", flag="--max-color-dist",
        panel=DATA, rule=Number(0, 442, above_lo=True))  # 442 > sqrt(3) * 255: every colour is near
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Score validation against the masks at their own size (256 px for the Kaggle files), the model's
    # logits upsampled to it, whatever image_size the model runs at: a small image_size cannot flatter
    # the figures by scoring against nearest-downsampled masks.
    val_native: bool = setting(True, "Score validation at the masks' own size.")
    skip_validate: bool = setting(False, "Do not decode every file first; the loader reports a bad file when it "
                                  "meets it.", flag="--skip-validate", panel=DATA, resume=True)
    skip_bad: bool = setting(False, "Skip bad files (and count them).",
                             flag="--skip-bad", panel=DATA)
    synth_train: int = setting(2000, "Train pairs of the synthetic set used without a data folder.",
                               rule=count(1, 1_000_000))
    synth_val: int = setting(200, "Val pairs of the synthetic set.", rule=count(1, 1_000_000))
    synth_seed: int = setting(0, "Seed of the synthetic set.", rule=count(0, SEED_MAX))


@dataclass(frozen=True)
class ModelConfig:
    num_classes: int = setting(19, "Classes (set by the palette).", rule=count(1, PALETTE_MAX))
    width: int = setting(32, "Base width, doubled per stage.", flag="--width", panel=MODEL, rule=count(1, 512))
    depth: int = setting(4, "Downsamplings.", flag="--depth", panel=MODEL,
                         rule=count(1, 8))
    upsample: str = setting("transpose", "Decoder: transposed conv, or bilinear + 1x1 conv.", flag="--upsample",
                            panel=MODEL, choices=("transpose", "bilinear"))
    norm: str = setting("batch", "BatchNorm, or GroupNorm with 8 groups.",
                        flag="--norm", panel=MODEL, choices=("batch", "group"))
    encoder: str = setting("unet", "unet (ours), or a timm backbone (tf_efficientnet_lite0, resnet18, ...).",
                           flag="--encoder", panel=MODEL)
    encoder_weights: str = setting("auto", "imagenet (timm's hub, cached), none or a weights file; auto: "
                                   "imagenet (none for unet).",
                                   flag="--encoder-weights", panel=MODEL)
    # What the run's encoder weights were, recorded when it starts (not options).
    encoder_sha256: str | None = setting(None, "sha256 of the encoder weights file the run started from (recorded).")
    encoder_licence: str | None = setting(None, "Licence of the encoder weights the run started from (recorded).")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = setting(10, "Epochs.", flag="--epochs", rule=count(1, MAX_EPOCHS), resume=True)
    lr: float = setting(3e-3, "Peak AdamW learning rate.", flag="--lr", rule=Number(0, 10, above_lo=True))
    weight_decay: float = setting(1e-4, "AdamW weight decay, not on norms and biases.", flag="--weight-decay",
                                  rule=Number(0, 10))
    warmup_steps: int = setting(100, "Linear LR warm-up steps.", flag="--warmup-steps", rule=count(0))
    min_lr_ratio: float = setting(0.01, "Final learning rate as a share of the peak.", rule=Number(0, 1))
    schedule: str = setting("cosine", "LR shape after the warm-up.", flag="--schedule", choices=("cosine", "onecycle"))
    time_budget_s: float | None = setting(
        None, "Train this long (1200, 20m, 1.5h; validation not counted), the LR decaying over it.",
        flag="--time-budget", rule=Number(0, 1e7, above_lo=True), parse=parse_duration, resume=True)
    # What a training second is: wall time, or this process's CPU time / its intra-op threads (the
    # same on a quiet machine, fairer on a shared one; count data loading only with workers 0).
    clock: str = setting("wall", "What a training second is: wall or cpu time.", choices=("wall", "cpu"))
    target_acc: float | None = setting(None, "Stop once val pixel accuracy reaches this (e.g. 0.90).",
                                       flag="--target-acc", rule=Number(0, 1, above_lo=True), resume=True)
    loss: str = setting("ce", "Cross-entropy, or plus soft Dice.", flag="--loss",
                        choices=("ce", "ce+dice"))
    ema: float = setting(0.0, "Validate and save an EMA of the weights (e.g. 0.999); 0: off.",
                         flag="--ema", rule=Number(0, 0.99999))
    # Fine-tuning a pretrained timm encoder (--encoder); no effect on our U-Net, which has no encoder.
    # Config file / --set only (`--set train.encoder_lr=0.1`): train --help stays within its lines.
    encoder_lr: float = setting(1.0, "Encoder learning rate as a share of lr (timm encoders).", rule=Number(0, 10))
    freeze_encoder: int = setting(0, "First steps with the encoder's learning rate at 0 (timm encoders).",
                                  rule=count(0))
    encoder_bn: str = setting("train", "Encoder BatchNorm: train, or frozen (its pretrained statistics, for small "
                              "batches).", choices=("train", "frozen"))
    grad_clip: float = setting(1.0, "Max gradient norm, 0 = off.", flag="--grad-clip", rule=Number(0))
    class_weights: str = setting("none", "Loss weight per class.",
                                 flag="--class-weights", choices=("none", "inverse-sqrt-freq"))
    device: str = setting("auto", "auto, cpu, cuda or cuda:N.", flag="--device", panel=SPEED, resume=True)
    precision: str = setting(
        "auto", "auto: bf16 where native, fp16 + loss scaling on older GPUs, else fp32.",
        flag="--precision", panel=SPEED, choices=("auto", "bf16-mixed", "16-mixed", "32"), resume=True)
    compile: bool | None = setting(None, "torch.compile.", flag="--compile/--no-compile", panel=SPEED, resume=True,
                                   shown="on for GPUs of compute capability 7.0+, off on CPUs")
    compile_mode: str | None = setting(None, "torch.compile mode.", flag="--compile-mode", panel=SPEED,
                                       choices=COMPILE_MODES, resume=True, shown="torch's")
    sync_bn: bool = setting(False, "DDP on GPUs: synchronise BatchNorm statistics.", flag="--sync-bn", panel=SPEED)
    seed: int = setting(0, "Seed for weights, order and augmentation.", flag="--seed", rule=count(0, SEED_MAX))
    patience: int = setting(0, "Stop after N validations without a better val mIoU; 0 = never.", flag="--patience",
                            rule=count(0))
    save_top_k: int = setting(0, "Keep K best checkpoints", flag="--save-top-k", rule=count(0, 1000))  # 0: off
    # What --save-top-k ranks by (config file or --set train.top_k_monitor=val_loss): no flag of its
    # own, the help stays one screen.
    top_k_monitor: str = setting("miou", "The val metric --save-top-k ranks by (val_loss: lower is better).",
                                 choices=("miou", "pixel_acc", "val_loss"))
    val_every: str = setting(
        "auto", "Validate (and write best.pt/last.pt) every N epochs, Nsteps or a training time (30s, 2m); "
        "auto: under 10 % of wall time; the run's end always validates.",
        flag="--val-every", resume=True)
    log_every: int = setting(20, "Steps between progress lines.",
                             flag="--log-every", panel=OUTPUT, rule=count(1), resume=True)
    tensorboard: bool = setting(True, "TensorBoard event files in the run folder.",
                                flag="--tensorboard/--no-tensorboard", panel=OUTPUT, resume=True)
    max_steps: int = setting(0, "Stop after N steps in all, last.pt resumable; 0 = all epochs.",
                             flag="--max-steps", rule=count(0), resume=True)
    out: str | None = setting(None, "Run folder: new or empty.", flag="--out", panel=OUTPUT, path=True,
                              shown="runs/<date-time>")
    resume: str | None = setting(
        None, "Continue this run folder from its last.pt and saved config; only these apply: {resumable}.",
        flag="--resume", panel=OUTPUT, path=True)
    init_from: str | None = setting(
        None, "Fine-tune from this checkpoint's weights, architecture (its flags are refused) and image "
        "size; another class count re-initialises the head.", flag="--init-from", panel=OUTPUT,
        path=True)


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


@functools.cache  # the same classes every call; the CLI asks once per flag at start-up
def field_types(kind: type = Config, prefix: str = "") -> dict[str, Any]:
    """Every leaf of the config by dotted key, e.g. {"data.augment.hflip": float, ...} (do not change it)."""
    out: dict[str, Any] = {}
    for name, hint in typing.get_type_hints(kind).items():
        if dataclasses.is_dataclass(hint):
            out.update(field_types(hint, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = hint
    return out


def settings_of(kind: type = Config, prefix: str = "") -> dict[str, Setting]:
    """Every config key's Setting, in the order the dataclasses declare them."""
    hints = typing.get_type_hints(kind)
    out: dict[str, Setting] = {}
    for f in dataclasses.fields(kind):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(settings_of(hints[f.name], f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = f.metadata["setting"]
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
            import difflib

            close = difflib.get_close_matches(str(key), list(types_by_key), n=3, cutoff=0.6)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise ConfigError(f"{source}: unknown config key {capped(repr(key), 100)}{hint}")
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
    return budget_decides_epochs(cfg, given)


def one_spelling(cfg: Config) -> Config:
    """One spelling per meaning: `cache: device`, the older spelling of `loader: cache`, becomes it
    (so summary.json says "loader": "cache", whichever was typed)."""
    if cfg.data.cache == "device":
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, loader="cache", cache="none"))
    return cfg


def budget_decides_epochs(cfg: Config, given: dict[str, Any]) -> Config:
    """A time budget without an epoch count trains until the budget is spent (a new run and a resumed
    one alike): epochs are lifted to MAX_EPOCHS unless `given` (the keys set this time) holds them."""
    if cfg.train.time_budget_s is not None and "train.epochs" not in given:
        return with_overrides(cfg, {"train.epochs": MAX_EPOCHS}, "time budget")
    return cfg


# Every setting by config key (its Setting: help, flag, range or choices, what --resume may change).
SETTINGS: dict[str, Setting] = settings_of()

