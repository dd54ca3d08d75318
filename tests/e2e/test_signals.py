"""Signals at any moment of a run, sent as Slurm's scancel and systemd send them (to the whole process
group, loader workers included): exit 143 (SIGTERM) or 130 (SIGINT), one line, no traceback, and the
last completed position in last.pt, from which --resume finishes the run."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch

from cityseg.checkpoint import save_checkpoint
from tests.cli_process import CliProcess, run_cli, session_members
from tests.conftest import TINY


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 train pairs (4 steps) and a val split long enough to be signalled in the middle of."""
    folder = tmp_path_factory.mktemp("sig") / "data"
    done = run_cli(["synth", "--out", folder, "--train", "8", "--val", "60", "--size", "64"], timeout=120)
    assert done.returncode == 0, done.output
    return folder


def wait_for_processes(proc: CliProcess, n: int, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while len(session_members(proc.proc.pid)) < n:
        if proc.proc.poll() is not None or time.monotonic() - t0 > timeout:
            proc.kill_all()
            pytest.fail(f"{n} processes never ran at once:\n{proc.tail()}")
        time.sleep(0.01)


def assert_interrupted(done, code: int) -> None:
    assert done.returncode == code, done.output
    assert "Traceback" not in done.output, done.output


def test_group_sigterm_during_validation_keeps_the_epoch(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = CliProcess(["train", "--data", data, "--out", run, "--epochs", "1", "--workers", "2", *TINY])
    proc.wait_for_output("epoch 1/1 step 4/4", timeout=240)  # the last training step: validation follows
    wait_for_processes(proc, 5)  # the command, 2 train workers (persistent) and the 2 val workers started
    proc.signal(signal.SIGTERM, group=True)
    done = proc.finish(timeout=120)
    assert_interrupted(done, 143)
    assert "resume with" in done.stderr, done.output
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["partial"]["unvalidated"]["epoch"] == 1  # trained, not yet scored
    assert not (run / "summary.json").exists()

    resumed = run_cli(["train", "--resume", run], timeout=300)
    assert resumed.returncode == 0, resumed.output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1] and records[0]["pixel_acc"] is not None
    assert json.loads((run / "summary.json").read_text())["epochs"] == 1


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_at_start_up_exits_cleanly(data: Path, tmp_path: Path, signum: int, code: int) -> None:
    """Sent while the command still validates the data files and builds its loaders."""
    proc = CliProcess(["train", "--data", data, "--out", tmp_path / "run", "--epochs", "1", *TINY])
    proc.wait_for(tmp_path / "run" / ".lock", timeout=120)  # the run folder is claimed before any file is read
    proc.signal(signum, group=True)
    done = proc.finish(timeout=120)
    assert_interrupted(done, code)
    errors = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert errors[-1].startswith("interrupted"), done.output


def test_resume_removes_what_a_kill_mid_save_left(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    done = run_cli(["train", "--data", data, "--out", run, "--epochs", "1", "--max-steps", "2", *TINY], timeout=300)
    assert done.returncode == 0, done.output
    # What a SIGKILL during a save leaves: pid-thread names, and the pid-only names of older versions.
    stale = [run / "checkpoints" / name for name in (".last.pt.999999-12.tmp", ".best.pt.999999.tmp")]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    resumed = run_cli(["train", "--resume", run, "--max-steps", "3"], timeout=300)
    assert resumed.returncode == 0, resumed.output
    assert not any(path.exists() for path in stale)


def test_a_second_signal_inside_a_save_waits_for_the_file(tmp_path: Path) -> None:
    """The handler of a second Ctrl-C raises; inside a save it runs only once the new file is whole."""
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "n": 1}, path)
    seen = []

    def handler(signum, frame):
        seen.append(torch.load(path, weights_only=True)["n"])  # what a handler that exits would leave
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        big = {"model": {"w": torch.ones(3)}, "n": 2, "pad": torch.zeros(1 << 22)}
        original_save = torch.save

        def save_then_signal(obj, f, *a, **k):
            signal.raise_signal(signal.SIGTERM)  # lands in the middle of the write
            return original_save(obj, f, *a, **k)

        torch.save = save_then_signal
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(big, path)
    finally:
        torch.save = original_save
        signal.signal(signal.SIGTERM, previous)
    assert seen == [2]  # the handler ran after the new checkpoint was in place
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_full_disk_inside_torch_save_is_one_training_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save reports a full disk as RuntimeError ("unexpected pos"), not OSError: the run must end
    with its one line, the previous checkpoint kept and no temp file left."""
    from cityseg.training import TrainingError
    from cityseg.training.saving import CheckpointSaver
    from cityseg.training.timing import RunTimes

    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(1)}, "n": 1}, path)

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed\nunexpected pos 64 vs 128")

    monkeypatch.setattr(torch, "save", full)
    saver = CheckpointSaver(lambda: {"model": {}, "n": 2}, is_main=True, times=RunTimes())
    with pytest.raises(TrainingError, match="could not write checkpoint.*previous checkpoint is kept"):
        saver.save(path)  # a background writer: its failure surfaces when waited for
        saver.finish()
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["n"] == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_second_sigterm_exits_143_without_a_traceback(data: Path, tmp_path: Path) -> None:
    proc = CliProcess(["train", "--data", data, "--out", tmp_path / "run", "--epochs", "1", *TINY])
    proc.wait_for_output("epoch 1/1 step 4/4", timeout=240)
    proc.signal(signal.SIGTERM)
    proc.signal(signal.SIGTERM)  # "now": whatever it lands in, it is a SIGTERM's exit
    done = proc.finish(timeout=120)
    assert_interrupted(done, 143)
    assert "interrupted" in done.stderr, done.output
