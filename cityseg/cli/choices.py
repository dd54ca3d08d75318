"""The allowed values of the commands' own choice options, as enums (typer lists and checks them).
The run settings' choices are declared with the settings (cityseg/config.py); `choice_enum` makes
their enums for `train`."""

from __future__ import annotations

from enum import Enum

from cityseg.config import SETTINGS


def choice_enum(name: str, values: tuple[str, ...]) -> type[Enum]:
    """An enum whose members are `values` (names equal to values), for typer to list and check."""
    return Enum(name, {value: value for value in values}, type=str)


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


# The dataset layouts and id maps of `check-data`, `eval` and `predict --pairs`: the run settings' own choices.
DataFormat = choice_enum("DataFormat", SETTINGS["data.format"].choices)
IdMap = choice_enum("IdMap", SETTINGS["data.id_map"].choices)
FORMAT_HELP, ID_MAP_HELP = SETTINGS["data.format"].help, SETTINGS["data.id_map"].help
