"""The mutation check's list still applies: every planted bug's file exists, its target text occurs
exactly once, the change is a change, and the tests it names exist (tests/mutations.py; run the check
itself with `python tests/mutations.py`)."""

from __future__ import annotations

import pytest

from tests.mutations import MUTATIONS, ROOT

AREAS_REQUIRED = ("augmentation: DALI", "augmentation: cache", "augmentation: plain loader", "palette:",
                  "metrics:", "loss:", "checkpoint/resume", "loop: LR schedule", "loop: training clock",
                  "optimizer:", "predict:")


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda mu: mu.name)
def test_each_bug_applies_cleanly(mutation) -> None:
    text = (ROOT / mutation.path).read_text()
    changed = mutation.apply(text)  # raises unless each target text occurs exactly once
    assert changed != text
    files = [t for t in mutation.tests if t.startswith("tests/")]
    assert files and all((ROOT / f.split("::")[0]).is_file() for f in files), mutation.tests


def test_names_are_unique_and_every_stage_is_covered() -> None:
    names = [mu.name for mu in MUTATIONS]
    assert len(set(names)) == len(names)
    for area in AREAS_REQUIRED:
        assert any(mu.area.startswith(area) for mu in MUTATIONS), area
