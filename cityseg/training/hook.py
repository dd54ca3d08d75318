"""What a hook is (detectron2's `HookBase`): code the loop calls around training, epochs and steps.

A hook reads the run's state from `self.trainer` (position, model, optimiser, clock, config, the
current step's loss) and never writes into it: what it has to tell the loop or other hooks (stop
the run, the summary, the model to score) goes to the event store, `self.trainer.events`
(cityseg/training/events.py). Its own state is kept in the checkpoint through `state_dict` /
`load_state_dict`, under `hooks.<its class name>`. The order of the events is in loop.py.
"""

from __future__ import annotations

from typing import Any

from cityseg.metrics import SegMetrics


class HookBase:
    """Override what you need; `self.trainer` is set when the hook is registered."""

    trainer: Any  # the Trainer (loop.py), read only (an import here would be a cycle)

    def before_train(self) -> None: ...
    def after_train(self) -> None: ...
    def before_epoch(self) -> None: ...
    def after_step(self) -> None: ...
    def after_steps(self) -> None: ...  # the epoch's last step is done (before any validation)
    def after_epoch(self, record: dict[str, Any], metrics: SegMetrics) -> None: ...  # a validated record

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
