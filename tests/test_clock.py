"""Where a run's time goes, checked exactly: a fake clock that moves only when the run does something
(a training forward 1 s, a validation forward 10 s, a checkpoint hand-over 5 s), so every timing field
of summary.json and metrics.jsonl has one right value. Validation is 10x slower than a step here: time
of validation or checkpoints counted as training (the budget's and the schedule's clock) shows at once.

Tested through `train()` and what it writes only (the loop's insides are free to change).

    pytest tests/test_clock.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from cityseg.checkpoint import CheckpointWriter
from cityseg.config import NO_AUGMENT, Config, DataConfig, ModelConfig, TrainConfig
from cityseg.model import UNet
from cityseg.training import train
from tests.conftest import make_pair_dataset

STEP_S, VAL_BATCH_S, SAVE_S = 1.0, 10.0, 5.0
EPOCHS, TRAIN_N, VAL_N, BATCH = 3, 8, 3, 2  # 4 steps an epoch, 2 val batches (the last one partial)
VAL_BATCHES = -(-VAL_N // BATCH)


class FakeClock:
    """time.perf_counter made of events: it moves only when `advance` is called, and logs why."""

    def __init__(self) -> None:
        self.now = time.perf_counter()  # continuous with readings taken before the test (the process start)
        self.events: list[str] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float, why: str) -> None:
        self.events.append(why)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(time, "perf_counter", fake)

    def on_forward(module: torch.nn.Module, args: tuple) -> None:
        if type(module) is UNet:  # the model itself, not its layers
            if module.training:
                fake.advance(STEP_S, "step")
            else:
                fake.advance(VAL_BATCH_S, "eval")  # a validation batch, or the samples picture

    handle = torch.nn.modules.module.register_module_forward_pre_hook(on_forward)
    real_submit = CheckpointWriter.submit

    def slow_submit(self, state, path) -> None:
        fake.advance(SAVE_S, "save")
        real_submit(self, state, path)

    monkeypatch.setattr(CheckpointWriter, "submit", slow_submit)
    yield fake
    handle.remove()


def config(data: Path, out: Path, **train_kw) -> Config:
    return Config(
        data=DataConfig(data_dir=str(data), image_size=32, batch_size=BATCH, workers=0, augment=NO_AUGMENT),
        model=ModelConfig(width=4, depth=2),
        train=TrainConfig(**{"epochs": EPOCHS, "lr": 1e-2, "warmup_steps": 1, "device": "cpu", "precision": "32",
                             "compile": False, "log_every": 1, "val_every": "1", "out": str(out), **train_kw}),
    )


def test_each_second_is_counted_once_where_it_was_spent(clock: FakeClock, tmp_path: Path) -> None:
    data = make_pair_dataset(tmp_path / "data", n_train=TRAIN_N, n_val=VAL_N, size=32)
    run = tmp_path / "run"
    summary = train(config(data, run))
    events = validations_and_pictures(clock.events)
    steps = EPOCHS * TRAIN_N // BATCH
    assert summary["steps"] == steps and summary["validations"] == EPOCHS
    saves, pictures = events.count("save"), events.count("picture")
    warmup_steps = events.count("step") - steps
    assert events.count("val") == EPOCHS * VAL_BATCHES, " ".join(events)
    assert saves >= EPOCHS and warmup_steps >= 1
    # The training clock (budget, schedule, --target-acc) holds the steps and nothing else.
    assert summary["train_seconds"] == steps * STEP_S
    assert summary["train_s"] == steps * STEP_S
    assert summary["val_s"] == EPOCHS * VAL_BATCHES * VAL_BATCH_S
    assert summary["checkpoint_s"] == saves * SAVE_S
    assert summary["warmup_s"] == warmup_steps * STEP_S
    # samples.png, drawn after each validation: neither training nor validation (the final one is drawn
    # after the summary is made)
    assert summary["other_s"] == (pictures - 1) * VAL_BATCH_S
    timed = ("startup_s", "warmup_s", "train_s", "val_s", "checkpoint_s", "other_s")
    assert sum(summary[k] for k in timed) == pytest.approx(summary["elapsed_s"], abs=1e-9)
    assert summary["images_per_s"] == BATCH / STEP_S  # images over training seconds only

    # Each validation's record: training clock, wall time from the first step, time from the start.
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1))
    before = summary["startup_s"] + summary["warmup_s"]
    for epoch, r in enumerate(records, start=1):
        # what happened after the warm-up and up to the end of this validation, from the event log
        done = events[warmup_steps:][: nth_index(events[warmup_steps:], "val", epoch * VAL_BATCHES) + 1]
        assert done.count("step") == epoch * TRAIN_N // BATCH
        assert r["train_s"] == done.count("step") * STEP_S
        assert r["wall_s"] == (done.count("step") * STEP_S + (done.count("val") + done.count("picture")) * VAL_BATCH_S
                               + done.count("save") * SAVE_S)
        assert r["elapsed_s"] == pytest.approx(r["wall_s"] + before, abs=1e-9)


def validations_and_pictures(events: list[str]) -> list[str]:
    """The log with each "eval" named: after a run of steps, the first VAL_BATCHES evaluation forwards
    are the validation's, the rest the samples picture's (drawn after it)."""
    named, since_steps = [], 0
    for e in events:
        if e == "step":
            since_steps = 0
        elif e == "eval":
            since_steps += 1
            e = "val" if since_steps <= VAL_BATCHES else "picture"
        named.append(e)
    return named


def nth_index(events: list[str], what: str, n: int) -> int:
    """The index of the n-th (1-based) `what` in `events`."""
    seen = 0
    for i, e in enumerate(events):
        seen += e == what
        if seen == n:
            return i
    raise AssertionError(f"fewer than {n} {what!r} events: {events}")
