"""A bounded shutdown: SIGTERM, SIGINT and SIGHUP at a chosen moment of training, validation and a
checkpoint write, to the command alone and to its whole process group (loader workers included, as
Slurm, Kubernetes and a closed terminal do). Within SHUTDOWN_BOUND_S of the signal last.pt is on disk
and the command and its children are gone, with 128 + the signal's number (130 for Ctrl-C); nothing is
validated on the way out; `--resume` scores what was trained first and ends with the weights of an
uninterrupted run. The signal is placed by tests/faults/sitecustomize.py (at the Nth read of a train or
val image, or at the checkpoint write), not after a guessed sleep."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch

from cityseg.checkpoint import load_checkpoint
from tests.cli_process import CliProcess, run_cli
from tests.conftest import make_pair_dataset

ROOT = Path(__file__).resolve().parents[2]
FAULTS = ROOT / "tests" / "faults"
# What README's Reliability section promises at this size: the step in flight, last.pt, the exit.
SHUTDOWN_BOUND_S = 10.0
# The uninterrupted run and the resume end normally: their interpreter teardown (seconds of torch's module
# GC on a loaded machine) is not this file's subject.
NORMAL_EXIT_GRACE_S = 30.0
TINY = ["--device", "cpu", "--no-compile", "--image-size", "32", "--width", "8", "--depth", "2",
        "--batch-size", "2", "--workers", "2", "--log-every", "1", "--no-tensorboard"]
EPOCHS = ["--epochs", "2", "--val-every", "1"]

pytestmark = pytest.mark.slow  # each case: a run, a stop and a resume, ~30 s on 2 loaded cores


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 train pairs (8 steps an epoch) and 24 val pairs (12 val batches): epochs and a validation to
    land inside."""
    return make_pair_dataset(tmp_path_factory.mktemp("stop") / "data", n_train=16, n_val=24)


@pytest.fixture(scope="module")
def straight(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The uninterrupted run's final weights."""
    run = tmp_path_factory.mktemp("stop") / "straight"
    done = run_cli(["train", "--data", data, "--out", run, *EPOCHS, *TINY], timeout=300, grace=NORMAL_EXIT_GRACE_S)
    assert done.returncode == 0, done.output
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


# (moment, what the faults module counts): a train image read in a worker (the 5th: its 3rd of 4 batches
# of epoch 1, read once the main process took its 1st), a val image read in a worker (its 2nd of 6 batches
# of epoch 1's validation), the temp file of last.pt's write (after epoch 1's validation).
MOMENTS = {"training": "worker:/train/:5", "validation": "worker:/val/:4", "checkpoint": "main:.last.pt.:1"}
CASES = [
    ("training", signal.SIGINT, "group", 130),
    ("validation", signal.SIGTERM, "group", 143),
    ("checkpoint", signal.SIGTERM, "parent", 143),
    ("training", signal.SIGHUP, "parent", 129),
    ("validation", signal.SIGHUP, "group", 129),
]


@pytest.mark.parametrize("moment,signum,target,code", CASES,
                         ids=[f"{s.name}-{t}-during-{m}" for m, s, t, _ in CASES])
def test_a_signal_stops_within_the_bound_and_resume_ends_as_an_uninterrupted_run(
        data: Path, straight: dict[str, torch.Tensor], tmp_path: Path, moment: str, signum: signal.Signals,
        target: str, code: int) -> None:
    run, mark = tmp_path / "run", tmp_path / "signalled"
    env = {"PYTHONPATH": str(FAULTS), "CITYSEG_TEST_SIGNAL": f"{signum.name}:{target}:{MOMENTS[moment]}",
           "CITYSEG_TEST_SIGNAL_MARK": str(mark)}
    proc = CliProcess(["train", "--data", data, "--out", run, *EPOCHS, *TINY], env=env)
    done = proc.finish(timeout=300)
    assert mark.is_file(), f"the signal was never sent:\n{done.output}"
    signalled_at = float(mark.read_text())
    assert done.returncode == code, done.output
    assert "Traceback" not in done.output, done.output
    assert f"--resume {run}" in done.stderr, done.output
    took = proc.exited_at - signalled_at
    assert took <= SHUTDOWN_BOUND_S, f"exited {took:.1f} s after {signum.name}:\n{done.output}"
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    scored = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()] \
        if (run / "metrics.jsonl").exists() else []
    if moment == "checkpoint":  # epoch 1 was scored before the write the signal met: kept as it was
        assert last["epoch"] == 1 and "unvalidated" not in last["partial"] and [r["epoch"] for r in scored] == [1]
    else:  # the trained steps saved unscored; nothing validated on the way out
        unscored = last["partial"]["unvalidated"]
        assert unscored["step"] == last["global_step"] and scored == []
        if moment == "validation":  # epoch 1 trained to its end
            assert (last["epoch"], unscored["epoch"], unscored["partial"]) == (1, 1, False)
        else:  # inside epoch 1
            assert (last["epoch"], unscored["epoch"], unscored["partial"]) == (0, 1, True)

    t = time.monotonic()
    resumed = run_cli(["train", "--resume", run], timeout=300, grace=NORMAL_EXIT_GRACE_S)
    assert resumed.returncode == 0, resumed.output
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["epoch"] == 2 and not records[-1]["partial"] and records[0]["pixel_acc"] is not None
    if moment != "checkpoint":  # the record left unscored is scored first, once
        steps = [r["step"] for r in records]
        assert last["global_step"] in steps and len(steps) == len(set(steps))
    final = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(final[k], straight[k]) for k in straight), f"resumed in {time.monotonic() - t:.0f} s"
