"""Validation and checkpoints at a cadence (--val-every), best.pt without optimiser state, background
checkpoint writes, the compile cache, and the timing breakdown that adds up."""

from __future__ import annotations

import errno
import itertools
import json
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import cityseg.checkpoint as checkpoint
from cityseg.checkpoint import (
    CheckpointWriter,
    check_init_architecture,
    load_checkpoint,
    load_from_checkpoint,
    read_config,
)
from cityseg.config import NO_AUGMENT, Config, DataConfig, ModelConfig, TrainConfig
from cityseg.errors import OptionError
from cityseg.runtime import use_compile_cache
from cityseg.settings import parse_val_every
from cityseg.telemetry import GpuSampler, process_age_s
from cityseg.training import TrainingError, train
from cityseg.training.cadence import AUTO_SHARE, ValCadence
from cityseg.training.loop import Interrupted
from cityseg.training.validation import Validator
from tests.cli_process import run_cli
from tests.conftest import make_pair_dataset

TIMED = ("startup_s", "warmup_s", "train_s", "val_s", "checkpoint_s", "other_s")


def config(data: Path, out: Path, **train_kw) -> Config:
    return Config(
        data=DataConfig(data_dir=str(data), image_size=32, batch_size=2, workers=0, augment=NO_AUGMENT),
        model=ModelConfig(width=4, depth=2),
        train=TrainConfig(**{"epochs": 5, "lr": 1e-2, "warmup_steps": 2, "device": "cpu", "precision": "32",
                             "compile": False, "log_every": 1, "out": str(out), **train_kw}),
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pair_dataset(tmp_path_factory.mktemp("cadence") / "data", n_train=4, n_val=2)  # 2 steps an epoch


def epochs_validated(run: Path) -> list[int]:
    return [json.loads(ln)["epoch"] for ln in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("text,expected", [("auto", ("auto", 0.0)), ("2", ("epochs", 2.0)),
                                           ("3epochs", ("epochs", 3.0)), ("300steps", ("steps", 300.0)),
                                           ("30s", ("seconds", 30.0)), ("2m", ("seconds", 120.0)),
                                           ("0.5h", ("seconds", 1800.0))])
def test_val_every_syntax(text: str, expected: tuple[str, float]) -> None:
    assert parse_val_every(text) == expected


@pytest.mark.parametrize("text", ["0", "-1", "1.5", "x", "2parsecs", "steps", ""])
def test_bad_val_every_is_refused(text: str) -> None:
    with pytest.raises(OptionError, match="--val-every"):
        parse_val_every(text)


def test_bad_val_every_on_the_command_line_is_one_line(tmp_path: Path) -> None:
    done = run_cli(["train", "--val-every", "often", "--out", tmp_path / "run"], timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.output
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "--val-every often" in errors[0], done.output


def test_cadence_units() -> None:
    by_steps = ValCadence.from_option("5steps")
    by_steps.epoch_done(steps=3, clock_s=1.0, wall_s=1.0)
    assert not by_steps.due()
    by_steps.epoch_done(steps=3, clock_s=1.0, wall_s=1.0)
    assert by_steps.due()
    by_time = ValCadence.from_option("2s")  # training-clock seconds, not wall
    by_time.epoch_done(steps=1, clock_s=1.5, wall_s=9.0)
    assert not by_time.due()
    by_time.epoch_done(steps=1, clock_s=0.5, wall_s=0.1)
    assert by_time.due()
    by_time.validated(cost_s=3.0)
    assert not by_time.due() and by_time.clock_s == 0


def test_auto_keeps_validation_under_a_tenth_of_the_wall_time() -> None:
    """The H200 case of the issue: 0.26 s epochs, 0.35 s of validation + checkpoints after each."""
    cadence = ValCadence.from_option("auto")
    assert cadence.due()  # nothing measured yet: the first epoch validates
    cadence.validated(cost_s=0.35)
    trained = 0.0
    while not cadence.due():
        cadence.epoch_done(steps=15, clock_s=0.26, wall_s=0.26)
        trained += 0.26
    assert 0.35 / (trained + 0.35) <= AUTO_SHARE < 0.35 / (trained - 0.26 + 0.35)  # the first epoch that keeps it
    assert AUTO_SHARE <= 0.05  # room for the first and last validations inside 10 %
    long_epochs = ValCadence.from_option("auto")
    long_epochs.validated(cost_s=0.35)
    long_epochs.epoch_done(steps=500, clock_s=10.0, wall_s=10.0)
    assert long_epochs.due()  # long epochs: every epoch


def test_every_two_epochs_and_always_at_the_end(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    summary = train(config(data, run, val_every="2"))
    assert epochs_validated(run) == [2, 4, 5]
    assert summary["epochs"] == 5 and summary["validations"] == 3 and summary["steps"] == 10
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["global_step"] == 10 and [r["epoch"] for r in state["history"]] == [2, 4, 5]


def test_steps_cadence_validates_at_the_epoch_it_falls_in(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(config(data, run, val_every="3steps"))  # 2 steps an epoch: due after epochs 2 and 4; the end
    assert epochs_validated(run) == [2, 4, 5]


def test_end_of_budget_validates(data: Path, tmp_path: Path) -> None:
    """A cadence that never falls due inside the budget: the end of the budget still validates, once,
    and writes best.pt and last.pt."""
    run = tmp_path / "run"
    summary = train(config(data, run, epochs=10_000, time_budget_s=0.5, val_every="1000000"))
    assert summary["validations"] == 1 and summary["train_seconds"] >= 0.5
    assert (run / "checkpoints" / "best.pt").is_file() and (run / "checkpoints" / "last.pt").is_file()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["global_step"] == summary["steps"]


def signal_at_step(step: int) -> Callable[[], None]:
    """An `on_step` that sends this process a Ctrl-C after training step `step` (counted per session)."""
    done = itertools.count(1)
    return lambda: os.kill(os.getpid(), signal.SIGINT) if next(done) == step else None


def test_a_signal_mid_epoch_saves_at_once_and_resume_scores_it(data: Path, tmp_path: Path) -> None:
    """Ctrl-C one step into epoch 2 (2 steps an epoch; the cadence never falls due): last.pt holds the
    position and the partial epoch's record, unscored, and nothing is validated on the way out (a
    bounded stop); --resume scores that record first and finishes with the uninterrupted run's weights."""
    straight, run = tmp_path / "straight", tmp_path / "run"
    train(config(data, straight, val_every="100"))
    validations = []
    validate = Validator.validate

    def counted(self: Validator, record: dict) -> object:
        validations.append(record["epoch"])
        return validate(self, record)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Validator, "validate", counted)
        with pytest.raises(Interrupted):
            train(config(data, run, val_every="100"), on_step=signal_at_step(3))
    assert validations == []  # the stop did not score anything
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints" / "best.pt").exists()
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (last["epoch"], last["step_in_epoch"], last["global_step"]) == (1, 1, 3)
    unscored = last["partial"]["unvalidated"]
    assert (unscored["epoch"], unscored["partial"], unscored["step"]) == (2, True, 3)
    train(config(data, run, val_every="100", resume=str(run)))
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["partial"], r["step"]) for r in records] == [(2, True, 3), (5, False, 10)]
    assert records[0]["pixel_acc"] is not None
    final = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    reference = load_checkpoint(straight / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def test_a_signal_during_validation_abandons_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal after the first val batch of a cadence validation: the rest of validation is not run,
    last.pt holds the epoch unscored, and --resume scores it first and ends as the uninterrupted run."""
    import cityseg.metrics as metrics

    data = make_pair_dataset(tmp_path / "data", n_train=4, n_val=4)  # 2 val batches
    straight, run = tmp_path / "straight", tmp_path / "run"
    train(config(data, straight, epochs=2, val_every="1"))
    batches = []
    real = metrics.ConfusionMatrix.update

    def update_then_signal(self, *args) -> None:  # noqa: ANN001
        batches.append(1)
        real(self, *args)
        if len(batches) == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(metrics.ConfusionMatrix, "update", update_then_signal)
    with pytest.raises(Interrupted) as stopped:
        train(config(data, run, epochs=2, val_every="1"))
    monkeypatch.undo()
    assert stopped.value.signum == signal.SIGTERM and batches == [1]  # 2 val batches: one skipped
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (last["epoch"], last["global_step"], last["partial"]["unvalidated"]["epoch"]) == (1, 2, 1)
    train(config(data, run, epochs=2, val_every="1", resume=str(run)))
    assert epochs_validated(run) == [1, 2]
    final = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    reference = load_checkpoint(straight / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def test_a_signal_while_resume_scores_the_record_keeps_it(data: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped again while --resume scores the record the first stop left: last.pt is untouched (the
    record still unscored, the position the same), and the next --resume scores it and finishes."""
    run = tmp_path / "run"
    with pytest.raises(Interrupted):
        train(config(data, run, val_every="100"), on_step=signal_at_step(3))
    before = (run / "checkpoints" / "last.pt").read_bytes()
    validate = Validator.validate

    def interrupted_validation(self: Validator, record: dict) -> object:
        os.kill(os.getpid(), signal.SIGINT)  # lands on the first val batch
        return validate(self, record)

    monkeypatch.setattr(Validator, "validate", interrupted_validation)
    with pytest.raises(Interrupted):
        train(config(data, run, val_every="100", resume=str(run)))
    monkeypatch.undo()
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (last["epoch"], last["step_in_epoch"], last["global_step"]) == (1, 1, 3)
    assert last["partial"]["unvalidated"]["epoch"] == 2 and not (run / "checkpoints" / "best.pt").exists()
    summary = train(config(data, run, val_every="100", resume=str(run)))
    assert epochs_validated(run) == [2, 5] and summary["steps"] == 10


def test_best_pt_holds_weights_not_optimiser_state(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(config(data, run, epochs=2, val_every="1"))
    best, last = (load_checkpoint(run / "checkpoints" / name) for name in ("best.pt", "last.pt"))
    assert "optimizer" not in best and "history" not in best and "optimizer" in last
    assert best["model"].keys() == last["model"].keys()
    model, cfg, palette, _ = load_from_checkpoint(run / "checkpoints" / "best.pt")  # eval, predict, export
    assert cfg.model.width == 4 and palette.num_classes == 19
    best = run / "checkpoints" / "best.pt"
    check_init_architecture(read_config(load_checkpoint(best), best).model, best, cfg.model)  # --init-from


def test_timing_fields_add_up(data: Path, tmp_path: Path) -> None:
    """startup + warm-up + train + val + checkpoint + other == elapsed, none negative (other_s is not
    clamped: a double count would show here), and each validation's time three ways differs by
    exactly start-up + warm-up (process start vs first step), the training clock below both."""
    run = tmp_path / "run"
    summary = train(config(data, run, epochs=3, val_every="1"))
    parts = [summary[k] for k in TIMED]
    assert all(p >= 0 for p in parts), dict(zip(TIMED, parts, strict=True))
    assert sum(parts) == pytest.approx(summary["elapsed_s"], abs=1e-6)
    assert summary["train_s"] > 0 and summary["val_s"] > 0 and summary["checkpoint_s"] > 0
    assert summary["time_zero"] in ("process start", "start of train()")
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        assert r["elapsed_s"] - r["wall_s"] == pytest.approx(summary["startup_s"] + summary["warmup_s"], abs=1e-6)
        assert r["train_s"] <= r["wall_s"] <= r["elapsed_s"]
    assert summary["images_trained"] == 3 * 2 * 2
    assert summary["wall_images_per_s"] <= summary["images_per_s"]  # the pauses are in the wall time only
    assert set(summary["time_to_pixel_acc_from_first_step_s"]) == set(summary["time_to_pixel_acc_s"])


def test_resumed_run_timing_still_adds_up(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = train(config(data, run, epochs=3, max_steps=3, val_every="1"))
    second = train(config(data, run, epochs=3, val_every="1", resume=str(run)))
    assert sum(second[k] for k in TIMED) == pytest.approx(second["elapsed_s"], abs=1e-6)
    assert second["elapsed_s"] > first["elapsed_s"] and second["warmup_s"] > first["warmup_s"]  # it warmed up again
    assert second["steps"] == 6


def test_final_line_gives_the_timing(data: Path, tmp_path: Path) -> None:
    done = run_cli(["train", "--data", data, "--out", tmp_path / "run", "--epochs", "1", "--device", "cpu",
                    "--no-compile", "--image-size", "32", "--width", "4", "--depth", "2", "--batch-size", "2"])
    assert done.returncode == 0, done.output
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("time: "))
    for name in ("startup", "warmup", "train", "val", "checkpoint", "elapsed", "from the process start"):
        assert name in line, line
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["time_zero"] == "process start" and summary["startup_s"] > 0


def test_failed_checkpoint_write_is_one_line_training_error(data: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(state, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_checkpoint", disk_full)
    with pytest.raises(TrainingError, match=r"(best|last).pt: could not write checkpoint \(No space left on device\)"):
        train(config(data, tmp_path / "run", epochs=1))


def test_checkpoint_writer_does_not_wait_for_the_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`submit` returns with the write still in flight (a host copy was taken: later changes to the
    tensors do not reach the file); `join` waits for it; the next write of the same file waits too."""
    release, real_save = threading.Event(), checkpoint.save_checkpoint

    def slow_save(state, path):
        release.wait(timeout=30)
        real_save(state, path)

    monkeypatch.setattr(checkpoint, "save_checkpoint", slow_save)
    writer = CheckpointWriter(lambda path, e: RuntimeError(f"{path}: {e}"))
    weights = torch.zeros(3)
    state = {"model": {"w": weights}, "config": {}}
    writer.submit(state, tmp_path / "last.pt")
    assert not (tmp_path / "last.pt").exists()
    weights += 1  # training goes on changing the live tensors
    release.set()
    writer.join()
    assert torch.equal(torch.load(tmp_path / "last.pt", weights_only=True)["model"]["w"], torch.zeros(3))


def test_compile_cache_goes_under_the_cityseg_cache(tmp_path: Path) -> None:
    env: dict[str, str] = {}
    root = tmp_path / "cache" / "compile"
    assert use_compile_cache(env, root) == {"dir": str(root / "inductor"), "warm": False}
    assert env == {"TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"), "TRITON_CACHE_DIR": str(root / "triton")}
    (root / "inductor" / "fxgraph").mkdir(parents=True)
    assert use_compile_cache(env, root)["warm"] is True  # the second run finds the first one's graphs
    mine = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "mine")}
    assert use_compile_cache(mine, root) == {"dir": str(tmp_path / "mine"), "warm": False}  # the user's stays
    assert mine["TRITON_CACHE_DIR"] == str(root / "triton")


def test_gpu_fields_cover_the_training_windows_only() -> None:
    sampler = GpuSampler(torch.device("cpu"))
    sampler.samples = [(0.0, 100.0, 1.0, 300.0, None), (0.1, 100.0, 2.0, 300.0, None),  # training
                       (0.2, 0.0, 9.0, 50.0, None),  # validation and a checkpoint
                       (0.3, 90.0, 1.0, 280.0, None)]  # training again
    summary = sampler.summary(windows=[(0, 2), (3, 4)])
    assert summary["gpu_util"] == pytest.approx(290 / 3) and summary["gpu_mem_gib"] == 2.0


def test_process_age_is_read_from_the_kernel() -> None:
    age = process_age_s()
    assert age is None or age > 0


def test_auto_leaves_a_validation_to_the_end_of_the_run_when_it_is_near() -> None:
    cadence = ValCadence.from_option("auto")
    cadence.validated(cost_s=1.0)
    cadence.epoch_done(steps=10, clock_s=19.5, wall_s=19.5)
    assert cadence.due(remaining_s=40.0)
    assert not cadence.due(remaining_s=3.0)  # the end validates within the interval anyway
