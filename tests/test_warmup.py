"""Warm-up before the clock (cityseg/training/warmup.py): it leaves no trace in what is trained, and a
slow first step (a cold compile) no longer eats a time budget."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

import cityseg.training.loop as loop
from cityseg.checkpoint import load_checkpoint
from cityseg.config import NO_AUGMENT, Config, DataConfig, ModelConfig, TrainConfig
from cityseg.data.contract import LoaderSpec
from cityseg.model import build_model
from cityseg.runtime import Runtime
from cityseg.training import train
from cityseg.training.step import TrainStep
from cityseg.training.warmup import TrainingState, synthetic_batch, warmup_calls
from tests.conftest import make_pair_dataset


def config(data: Path, out: Path, **train_kw) -> Config:
    return Config(
        data=DataConfig(data_dir=str(data), image_size=32, batch_size=2, workers=0, augment=NO_AUGMENT),
        model=ModelConfig(width=4, depth=2),
        train=TrainConfig(**{"epochs": 2, "lr": 1e-2, "warmup_steps": 2, "device": "cpu", "precision": "32",
                             "compile": False, "log_every": 1, "val_every": "1", "out": str(out), **train_kw}),
    )


def no_warm_up(*args, **kwargs) -> None:
    """What the loop did before warm-up existed."""


def tiny_training(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(width=4, depth=2, num_classes=5)).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=True)  # its lazily made scale must go back too

    def step(image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = torch.nn.functional.cross_entropy(model(image), target, ignore_index=255)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach()

    return model, optimizer, scaler, step


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 3, 16, 16, generator=g).contiguous(memory_format=torch.channels_last),
             torch.randint(0, 5, (2, 16, 16), generator=g)) for _ in range(n)]


def all_state(model, optimizer, scaler) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}  # BatchNorm statistics included
    for i, p in enumerate(model.parameters()):
        out.update({f"opt.{i}.{k}": v.clone() for k, v in optimizer.state.get(p, {}).items()})
    out["scale"] = scaler.get_scale() * torch.ones(())
    out["rng"] = torch.rand(4)  # the next draw: the RNG stream is where it was
    return out


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("steps_before", [0, 2], ids=["fresh", "resumed"])
def test_snapshot_restore_leaves_training_bitwise_identical(steps_before: int) -> None:
    """N steps after a warm-up (3 captured calls) equal N steps without it, from a fresh optimiser and
    from one with state (a resume)."""
    data = batches(steps_before + 3)
    results = []
    for warm in (False, True):
        model, optimizer, scaler, step = tiny_training()
        for image, target in data[:steps_before]:
            step(image, target)
        torch.manual_seed(7)
        random.seed(7)
        np.random.seed(7)
        if warm:
            snapshot = TrainingState.capture(model, optimizer, scaler)
            junk = (torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last) * 5,
                    torch.randint(0, 5, (2, 16, 16)))
            for _ in range(3):
                step(*junk)
            snapshot.restore()
        py, npy = random.random(), np.random.rand()
        for image, target in data[steps_before:]:
            step(image, target)
        results.append((all_state(model, optimizer, scaler), py, npy))
    (a, pa, na), (b, pb, nb) = results
    assert_identical(a, b)
    assert (pa, na) == (pb, nb)


def test_a_run_with_warm_up_trains_the_same_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole loop: last.pt's weights and BatchNorm statistics, the optimiser's moments, equal a run
    whose warm-up is switched off; a resume warms up too and still lands on the same weights."""
    data = make_pair_dataset(tmp_path / "data", n_train=8, n_val=2)
    train(config(data, tmp_path / "warm"))
    train(config(data, tmp_path / "split", max_steps=5))
    train(config(data, tmp_path / "split", resume=str(tmp_path / "split")))
    with monkeypatch.context() as m:
        m.setattr(loop, "warm_up", no_warm_up)
        train(config(data, tmp_path / "cold"))
    cold, warm, split = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in ("cold", "warm", "split"))
    for other in (warm, split):
        assert_identical(cold["model"], other["model"])
        for i, st in cold["optimizer"]["state"].items():
            assert_identical(st, other["optimizer"]["state"][i])
    assert cold["global_step"] == warm["global_step"] == 8


class StepClock:
    """The training clock, made exact: every reading is 1/8 s after the last, so every step takes
    1/8 s, and a slow call adds its delay. No wall-clock time is measured or asserted."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.125
        return self.now


def test_slow_first_step_still_trains_for_its_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first call of the step takes DELAY s (a cold compile); the budget is half that. The warm-up
    takes the slow call, so the run trains its whole budget (8 steps of 1/8 s); without the warm-up the
    slow step alone spends the budget (one step, the schedule at its floor: what the issue saw)."""
    delay, budget = 2.0, 1.0
    real_call, calls = TrainStep.__call__, [0]

    def slow_first_call(self, image, target):
        calls[0] += 1
        if calls[0] == 1:
            clock.now += delay
        return real_call(self, image, target)

    monkeypatch.setattr(TrainStep, "__call__", slow_first_call)
    data = make_pair_dataset(tmp_path / "data", n_train=8, n_val=2)
    clock = StepClock()
    monkeypatch.setattr(loop, "tick_function", lambda kind: clock)
    summary = train(config(data, tmp_path / "run", epochs=10_000, time_budget_s=budget, val_every="auto"))
    assert calls[0] == summary["steps"] + 1  # one call was the warm-up's
    assert summary["steps"] == 8 and summary["train_seconds"] == budget  # the delay is not on the clock

    calls[0], clock = 0, StepClock()
    monkeypatch.setattr(loop, "warm_up", no_warm_up)
    cold = train(config(data, tmp_path / "cold", epochs=10_000, time_budget_s=budget, val_every="auto"))
    assert cold["steps"] == 1 and cold["train_seconds"] == delay + 0.125


def test_synthetic_batch_has_the_loaders_layout() -> None:
    spec = LoaderSpec(image_size=32, batch_size=3, augment=None, shuffle=False, drop_last=False,
                      dtype=torch.bfloat16, target_size=64)
    state = torch.get_rng_state()
    image, target = synthetic_batch(spec, num_classes=19)
    assert torch.equal(state, torch.get_rng_state())  # the run's RNG is not drawn from
    assert image.shape == (3, 3, 32, 32) and image.dtype == torch.bfloat16
    assert image.is_contiguous(memory_format=torch.channels_last)
    assert target.shape == (3, 64, 64) and target.dtype == torch.int64
    assert set(target.unique().tolist()) <= set(range(19)) | {255}


def test_warmup_calls_follow_the_compile_mode() -> None:
    def rt(compile_: bool, mode: str | None) -> Runtime:
        return Runtime(torch.device("cpu"), "32", compile_, mode)

    assert warmup_calls(rt(True, "reduce-overhead"), object()) == 3  # CUDA graphs: record, warm, replay
    assert warmup_calls(rt(True, "max-autotune"), object()) == 3
    assert warmup_calls(rt(True, None), object()) == 1
    assert warmup_calls(rt(False, "reduce-overhead"), object()) == 1
    declared = type("Step", (), {"warmup_calls": 5})()
    assert warmup_calls(rt(True, None), declared) == 5  # a step that knows better says so


def test_every_rank_warms_up_then_waits(tmp_path: Path) -> None:
    """Two gloo ranks: both warm up (a collective inside the step would hang otherwise), then train."""
    from tests.test_distributed import TINY, torchrun

    data = make_pair_dataset(tmp_path / "data", n_train=8, n_val=3)
    done = torchrun("--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1", *TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = __import__("json").loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["warmup_s"] > 0 and summary["steps"] == 2

