"""A first `train` talks from its first line: each start-up stage (loading PyTorch, synthetic data,
file checks, the colour lookup table, warm-up) says what it does before it does it and how long it
took, in that order, before the first training step; a second run reuses what the first built."""

from __future__ import annotations

import re
from pathlib import Path

from tests.cli_process import run_cli
from tests.conftest import TINY

FIRST_RUN_STAGES = [
    r"start-up: loading PyTorch and the training code \.\.\.",
    r"start-up: synthetic data: generating 24 pairs of \d+ px into .* \(once: later runs reuse them.*\) \.\.\.",
    r"start-up: synthetic data: generating 24 pairs .*: done in \d+\.\d s",
    r"start-up: file checks: train/ .* \.\.\.",
    r"start-up: file checks: train/ .*: done in \d+\.\d s",
    r"start-up: file checks: val/ .* \.\.\.",
    r"start-up: colour lookup table: building it for .*lut-\w+\.bin \(once: later runs read it.*\) \.\.\.",
    r"start-up: colour lookup table: .*: done in \d+\.\d s",
    r"UNet\(width=4, depth=2",
    r"start-up: warm-up: .* \.\.\.",
    r"start-up: warm-up: .*: done in \d+\.\d s",
    r"epoch 1",
]


def in_order(lines: list[str], patterns: list[str]) -> list[str]:
    """The patterns not matched by lines in this order (each by a line after the previous one's)."""
    at = 0
    for i, pattern in enumerate(patterns):
        found = next((j for j in range(at, len(lines)) if re.match(pattern, lines[j])), None)
        if found is None:
            return patterns[i:]
        at = found + 1
    return []


def test_a_first_run_says_each_start_up_stage_and_a_second_reuses_them(tmp_path: Path) -> None:
    env = {"CITYSEG_CACHE": str(tmp_path / "cache")}  # nothing built yet: synthetic set and table
    first = run_cli(["train", "--smoke", "--out", tmp_path / "run1", *TINY], env=env, timeout=300)
    assert first.returncode == 0, first.output
    lines = first.stdout.splitlines()
    assert lines[0] == "start-up: loading PyTorch and the training code ...", lines[:3]
    assert in_order(lines, FIRST_RUN_STAGES) == [], first.stdout
    second = run_cli(["train", "--smoke", "--out", tmp_path / "run2", *TINY], env=env, timeout=300)
    assert second.returncode == 0, second.output
    assert "synthetic data: generating" not in second.stdout and "lookup table: building" not in second.stdout
    reused = [FIRST_RUN_STAGES[0], *FIRST_RUN_STAGES[3:6], *FIRST_RUN_STAGES[8:]]  # no generation, no build
    assert in_order(second.stdout.splitlines(), reused) == [], second.stdout
