"""benchmarks/wall_time.py at the tiniest size: it writes the common JSON layout with, for each
--val-every setting, in-step and wall img/s side by side and a timing breakdown that adds up (its
schema is checked, never its speed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import wall_time
from tests.conftest import make_pair_dataset


def test_wall_time_benchmark_json(tmp_path: Path) -> None:
    data = make_pair_dataset(tmp_path / "data", n_train=8, n_val=2)
    out = tmp_path / "wall_time-cpu.json"
    wall_time.run(["--data", str(data), "--json", str(out), "--quick", "--size", "32", "--width", "4", "--depth", "2",
                   "--batch", "2", "--epochs", "3", "--workers", "0", "--device", "cpu", "--val-every", "1,auto"])
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "wall_time" and doc["complete"] is True
    assert [r["val_every"] for r in doc["results"]] == ["1", "auto"]
    every_epoch, auto = doc["results"]
    assert every_epoch["validations"] == 3 and auto["validations"] >= 2  # the first and the last
    for row in doc["results"]:
        run = row["runs"][0]
        assert run["steps"] == 12 and run["images_trained"] == 24
        assert 0 < row["wall_over_in_step"] <= 1
        parts = sum(run[k] for k in ("startup_s", "warmup_s", "train_s", "val_s", "checkpoint_s", "other_s"))
        assert parts == pytest.approx(run["elapsed_s"], abs=1e-6)
