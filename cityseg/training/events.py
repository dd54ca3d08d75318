"""The event store (detectron2's `EventStorage`): what hooks report, to the loop and to each other,
instead of writing into the trainer. One per run; hooks write it, the loop reads it.
"""

from __future__ import annotations

from typing import Any

from torch import nn


class EventStore:
    def __init__(self) -> None:
        self.stop_reason: str | None = None  # the run ends after this validation (early stop, target reached)
        self.summary: dict[str, Any] | None = None  # summary.json's content (Reporter): what `fit` returns
        self.scored_model: nn.Module | None = None  # what validation scores and checkpoints save (EMA's average)
        self.summary_fields: dict[str, Any] = {}  # what hooks add to summary.json (the top-k list)

    def stop(self, reason: str) -> None:
        """End the run after the current validation (the last hook to ask gives the reason shown)."""
        self.stop_reason = reason

    def report_summary(self, summary: dict[str, Any]) -> None:
        self.summary = summary

    def add_to_summary(self, key: str, value: Any) -> None:
        """A field of summary.json a hook owns; hooks before the Reporter add theirs by `after_train`."""
        self.summary_fields[key] = value

    def score_with(self, model: nn.Module) -> None:
        """Validate and checkpoint `model` instead of the trained one (an average of its weights)."""
        self.scored_model = model
