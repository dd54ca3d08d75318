"""The allowed values of every choice option, as enums: a bad value fails at once, naming them."""

from __future__ import annotations

from enum import Enum


class Loader(str, Enum):
    auto = "auto"
    torch = "torch"
    dali = "dali"
    cache = "cache"


class Cache(str, Enum):
    none = "none"
    device = "device"


class Upsample(str, Enum):
    transpose = "transpose"
    bilinear = "bilinear"


class Precision(str, Enum):
    auto = "auto"
    bf16_mixed = "bf16-mixed"
    fp16_mixed = "16-mixed"
    fp32 = "32"


class CompileMode(str, Enum):
    default = "default"
    reduce_overhead = "reduce-overhead"
    max_autotune = "max-autotune"
    max_autotune_no_cudagraphs = "max-autotune-no-cudagraphs"


class Schedule(str, Enum):
    cosine = "cosine"
    onecycle = "onecycle"


class Loss(str, Enum):
    ce = "ce"
    ce_dice = "ce+dice"


class Norm(str, Enum):
    batch = "batch"
    group = "group"


class ClassWeights(str, Enum):
    none = "none"
    inverse_sqrt_freq = "inverse-sqrt-freq"


class Split(str, Enum):
    val = "val"
    train = "train"


class Tta(str, Enum):
    none = "none"
    flip = "flip"


class Format(str, Enum):
    onnx = "onnx"
    torchscript = "torchscript"
