"""What a setting is: the metadata every config field carries (`cityseg/config.py`), and the value
kinds a setting may have (a range, a duration, a zoom range, a validation cadence).

Each setting of a run is declared once, as a field of the config dataclasses with `setting(...)`:

    width: int = setting(32, "Base width, doubled per stage.", flag="--width", panel=MODEL, rule=count(1, 512))

From those declarations come the validation rules and choice lists (`cityseg/options.py`), the
`train` command's flags, their help with its defaults (`cityseg/cli/train.py`), what `--resume` may
change, and the README's option table. Nothing here imports torch or the rest of the package.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cityseg.errors import OptionError

# -- ranges ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Number:
    """A finite number in [lo, hi] (either end may be open-ended); `whole` for integers."""

    lo: float | None = None
    hi: float | None = None
    whole: bool = False
    above_lo: bool = False  # lo itself excluded (e.g. a learning rate must be > 0)

    def problem(self, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "expected a number"
        if not math.isfinite(value):
            return "expected a finite number"
        if self.whole and value != int(value):
            return "expected a whole number"
        too_low = self.lo is not None and (value <= self.lo if self.above_lo else value < self.lo)
        too_high = self.hi is not None and value > self.hi
        return self.expectation() if too_low or too_high else None

    def expectation(self) -> str:
        kind = "a whole number" if self.whole else "a number"
        lo = None if self.lo is None else f"{self.lo:g}"
        hi = None if self.hi is None else f"{self.hi:g}"
        if lo is not None and hi is not None:
            return f"expected {kind} from {lo} to {hi}" + (f" (above {lo})" if self.above_lo else "")
        if lo is not None:
            return f"expected {kind} {'above' if self.above_lo else 'of at least'} {lo}"
        return f"expected {kind} of at most {hi}"


def count(lo: int = 0, hi: int | None = None) -> Number:
    return Number(lo, hi, whole=True)


@dataclass(frozen=True)
class NumberOrAuto(Number):
    """A Number, or the word `auto` (the run picks the value for its device)."""

    def problem(self, value: Any) -> str | None:
        if value == "auto":
            return None
        return self.expectation() if isinstance(value, str) else super().problem(value)

    def expectation(self) -> str:
        return super().expectation() + " or auto"


SEED_MAX = 2**32 - 1  # numpy's and DALI's seed range; larger seeds overflow torch generators
PALETTE_MAX = 64  # centres and classes of a palette: the Triton kernel unrolls its loop over centres
MAX_EPOCHS = 100_000  # also what a time budget sets when no --epochs is given: the budget decides
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes in which torch.compile records CUDA graphs

# -- values typed as text ------------------------------------------------------------------------------


def parse_batch_size(text: str | None) -> int | str | None:
    """`--batch-size 32` -> 32; other text is kept as it is (`auto`; anything else its rule refuses)."""
    if text is None:
        return text
    try:
        return int(text)
    except ValueError:
        return text


def parse_duration(text: str) -> float:
    """`--time-budget 20m` -> 1200.0: a number of seconds, or with s / m / h."""
    units = {"s": 1, "m": 60, "h": 3600}
    value, unit = (text[:-1], text[-1]) if text and text[-1].lower() in units else (text, "s")
    try:
        seconds = float(value) * units[unit.lower()]
    except ValueError:
        raise OptionError(f"--time-budget {text}: expected seconds or a number with s, m or h (e.g. 20m)") from None
    if not (math.isfinite(seconds) and seconds > 0):
        raise OptionError(f"--time-budget {text}: expected a positive duration (e.g. 20m)")
    return seconds


VAL_EVERY_HELP = "auto, N (epochs), Nsteps, or a training time such as 30s / 2m"


def parse_val_every(text: str) -> tuple[str, float]:
    """`--val-every` -> (unit, amount): `auto` -> ("auto", 0); `2` -> ("epochs", 2); `300steps` ->
    ("steps", 300); `30s` / `2m` / `1h` -> ("seconds", 30 / 120 / 3600) of training time."""
    t = str(text).strip().lower()
    if t == "auto":
        return "auto", 0.0
    units = {"steps": ("steps", 1), "step": ("steps", 1), "epochs": ("epochs", 1), "epoch": ("epochs", 1),
             "s": ("seconds", 1), "m": ("seconds", 60), "h": ("seconds", 3600)}
    suffix = next((u for u in sorted(units, key=len, reverse=True) if t.endswith(u)), "")
    unit, scale = units.get(suffix, ("epochs", 1))
    number = t[: len(t) - len(suffix)].strip()
    try:
        amount = float(number) * scale
    except ValueError:
        amount = float("nan")
    whole = unit == "seconds" or amount == int(amount) if math.isfinite(amount) else False
    if not (math.isfinite(amount) and amount > 0 and whole):
        raise OptionError(f"--val-every {text}: expected {VAL_EVERY_HELP}")
    return unit, amount


def scale_problem(lo: float, hi: float) -> str | None:
    """A zoom range is 0 < LO <= HI <= 4 (a flag's and a config file's alike)."""
    ok = math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi <= 4
    return None if ok else "expected 0 < LO <= HI <= 4"


def parse_scale(text: str) -> tuple[float, float]:
    """`--scale LO,HI` -> (lo, hi) with 0 < lo <= hi <= 4."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise OptionError(f"--scale {text}: expected two numbers LO,HI such as 0.75,1.25") from None
    problem = scale_problem(lo, hi)
    if problem:
        raise OptionError(f"--scale {text}: {problem}")
    return lo, hi


# -- the metadata of one setting ------------------------------------------------------------------------

# Help panels of `train -h`, in the order they show.
DATA, LOADING, AUG, MODEL, TRAIN, SPEED, OUTPUT = ("Data", "Loading", "Augmentation", "Model", "Training", "Speed",
                                                   "Output")


@dataclass(frozen=True)
class Setting:
    """Everything about one config field besides its name, type and default (the field has those).

    help: what it does, without its default (the help text adds the default and the presets' values);
    flag: the `train` flag (`--x`, or `--x/--no-x` for a switch); None: set by a config file or --set only;
    rule / choices: the allowed values, for flags, config files and checkpoints alike;
    resume: `--resume` may change it (how long and how to run, never what the run is);
    parse: turns the flag's text into the value (e.g. `20m` -> 1200.0); path: made absolute;
    also: more config keys the same flag sets (`--jitter`: contrast and saturation too);
    shown: the default as the help says it, where the value alone would not explain it."""

    help: str = ""
    flag: str | None = None
    panel: str = TRAIN
    rule: Number | None = None
    choices: tuple[str, ...] | None = None
    resume: bool = False
    parse: Callable[[str], Any] | None = None
    path: bool = False
    also: tuple[str, ...] = ()
    shown: str | None = None

    @property
    def option(self) -> str | None:
        """The flag as messages name it (`--compile/--no-compile` -> --compile), None without one."""
        return None if self.flag is None else self.flag.split("/")[0]

    @property
    def name(self) -> str | None:
        """The option's name in code (`--time-budget` -> time_budget), None without a flag."""
        return None if self.option is None else self.option.removeprefix("--").replace("-", "_")

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` for this setting (None, unset, is fine), else None."""
        if value is None:
            return None
        if self.choices is not None and value not in self.choices:
            return f"expected one of {', '.join(self.choices)}"
        return None if self.rule is None else self.rule.problem(value)


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,  # noqa: A002
            **meta: Any) -> Any:
    """A config dataclass field with its Setting (see the module docstring)."""
    info = {"setting": Setting(help=help, **meta)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=info)
    return dataclasses.field(default=default, metadata=info)
