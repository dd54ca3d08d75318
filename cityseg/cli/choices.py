"""The allowed values of every choice option, as enums: a bad value fails at once, naming them."""

from __future__ import annotations

from enum import Enum

from cityseg.options import CHOICES, COMPILE_MODES


def choice_enum(name: str, values: tuple[str, ...]) -> type[Enum]:
    """An enum whose members are `values` (names equal to values), for typer to list and check."""
    return Enum(name, {value: value for value in values}, type=str)


# The config's choices, from the one table that also checks config files (cityseg/options.py).
Loader = choice_enum("Loader", CHOICES["data.loader"])
Cache = choice_enum("Cache", CHOICES["data.cache"])
Upsample = choice_enum("Upsample", CHOICES["model.upsample"])
Precision = choice_enum("Precision", CHOICES["train.precision"])
CompileMode = choice_enum("CompileMode", COMPILE_MODES)
Schedule = choice_enum("Schedule", CHOICES["train.schedule"])
Loss = choice_enum("Loss", CHOICES["train.loss"])
Norm = choice_enum("Norm", CHOICES["model.norm"])
ClassWeights = choice_enum("ClassWeights", CHOICES["train.class_weights"])


# Command-only choices (not config values).
class Split(str, Enum):
    val = "val"
    train = "train"


class Tta(str, Enum):
    none = "none"
    flip = "flip"


class Format(str, Enum):
    onnx = "onnx"
    torchscript = "torchscript"
