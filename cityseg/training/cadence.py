"""When to validate (and write best.pt / last.pt): `--val-every`, decided at the end of each epoch.

    cadence = ValCadence.from_option("auto")
    cadence.epoch_done(steps=15, clock_s=0.26, wall_s=0.26)
    if final or cadence.due(): ...validate...; cadence.validated(cost_s=0.35)

`auto` measures what the last validation + checkpoint cost (wall seconds, hooks included) and waits
until the training since then is `(1 - share) / share` times that (19x for 5 %), so on a GPU whose
15-step epochs take 0.26 s against a 0.35 s validation it validates every ~26 epochs, and on long
epochs every epoch. 5 % is half the 10 % of wall time the cadence is there to respect: the other half
is for the validations it cannot move (the first, the last). The first epoch is always validated
(there is no cost to go by yet, and it says early whether the run learns), and a validation that the
end of the run would follow within the interval is left to the end.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from cityseg.settings import parse_val_every

AUTO_SHARE = 0.05  # `auto`'s spacing: half of the 10 % of wall time validation and checkpoints may take


@dataclass
class ValCadence:
    unit: str  # auto | epochs | steps | seconds (of training clock)
    every: float
    epochs: int = 0  # since the last validation
    steps: int = 0
    clock_s: float = 0.0  # training-clock seconds since the last validation (`Ns`)
    wall_s: float = 0.0  # wall seconds of training steps since the last validation (`auto`)
    cost_s: float | None = None  # wall seconds the last validation + checkpoint + reports took

    @classmethod
    def from_option(cls, text: str) -> ValCadence:
        unit, every = parse_val_every(text)
        return cls(unit, every)

    def epoch_done(self, steps: int, clock_s: float, wall_s: float) -> None:
        self.epochs += 1
        self.steps += steps
        self.clock_s += clock_s
        self.wall_s += wall_s

    def due(self, remaining_s: float | None = None) -> bool:
        """Whether this epoch's end validates. `auto` also skips a validation when the run will end
        (and validate) within the interval anyway (`remaining_s`: training seconds left, if known),
        so every validation follows at least the interval of training, the last one included."""
        if self.unit == "epochs":
            return self.epochs >= self.every
        if self.unit == "steps":
            return self.steps >= self.every
        if self.unit == "seconds":
            return self.clock_s >= self.every
        if self.cost_s is None:
            return True
        interval = self.cost_s * (1 - AUTO_SHARE) / AUTO_SHARE
        return self.wall_s >= interval and (remaining_s is None or remaining_s >= interval)

    def validated(self, cost_s: float) -> None:
        self.epochs, self.steps, self.clock_s, self.wall_s = 0, 0, 0.0, 0.0
        self.cost_s = cost_s

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("unit", "every")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
