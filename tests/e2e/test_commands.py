"""Every command as a user runs it: the installed `cityseg-fast` script in its own process, with the
defaults users get (DataLoader workers on), a hard timeout, and a check that the process and all
its children are gone within 10 s of its last output line (tests/cli_process.py).

These are the tests that catch a command which prints "done" and never returns."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from cityseg.checkpoint import load_checkpoint
from tests.cli_process import CliProcess, run_cli
from tests.conftest import TINY, make_pair_dataset

# Tiny model and images; the loader keeps its default of 2 worker processes.


@pytest.fixture(scope="module")
def data(pair_data: Path) -> Path:
    return pair_data  # tests/e2e/conftest.py: one set for the session


@pytest.fixture(scope="module")
def long_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Long epochs (150 steps of batch 2), so a signal sent after step 10 lands mid-epoch."""
    return make_pair_dataset(tmp_path_factory.mktemp("e2e") / "long", n_train=300, n_val=4)


@pytest.fixture(scope="module")
def trained(trained_run: Path) -> Path:
    """The session's full short run (tests/e2e/conftest.py checks its files and its two epochs)."""
    return trained_run


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_one_line_error(stderr: str, *fragments: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[0], stderr


def test_full_short_run(trained: Path) -> None:
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["steps"] == 8


def test_training_learns_an_easy_task(tmp_path: Path) -> None:
    """Photo = mask colours: the loss must fall and val pixel accuracy rise far above chance (~0.05)."""
    easy = make_pair_dataset(tmp_path / "data", n_train=32, n_val=8, photo_is_mask=True)
    done = run_cli(["train", "--data", easy, "--out", tmp_path / "run", "--epochs", "15", "--lr", "0.03",
                    "--warmup-steps", "5", "--device", "cpu", "--no-compile", "--image-size", "32", "--width", "8",
                    "--depth", "2", "--batch-size", "4"])
    assert done.returncode == 0, done.output
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"] / 2
    assert records[0]["pixel_acc"] < 0.3 and records[-1]["pixel_acc"] > 0.7


def test_smoke_on_a_data_folder(data: Path, tmp_path: Path) -> None:
    done = run_cli(["train", "--data", data, "--smoke", "--device", "cpu", "--no-compile", "--out", tmp_path / "run"])
    assert done.returncode == 0, done.output
    assert (tmp_path / "run" / "summary.json").is_file()


def test_smoke_without_data_goes_through_the_synthetic_set(tmp_path: Path) -> None:
    done = run_cli(["train", "--smoke", "--device", "cpu", "--no-compile", "--out", tmp_path / "run"],
                   env={"CITYSEG_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert str(tmp_path / "cache") in summary["data"]


def test_max_steps_stops_there(data: Path, tmp_path: Path) -> None:
    done = run_cli(["train", "--data", data, "--out", tmp_path / "run", "--epochs", "5", "--max-steps", "3", *TINY])
    assert done.returncode == 0, done.output
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["global_step"] == 3


def test_early_stop_ends_the_run(data: Path, tmp_path: Path) -> None:
    """--patience counts validations: with one each epoch, a run of tiny epochs stops well before 40
    (the default cadence would validate these short epochs too seldom to show it)."""
    done = run_cli(["train", "--data", data, "--out", tmp_path / "run", "--epochs", "40", "--patience", "1",
                    "--val-every", "1", *TINY])
    assert done.returncode == 0, done.output
    assert "early stop" in done.stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epochs"] < 40


@pytest.mark.parametrize("loader", ["torch", "dali", "cache"])
def test_bad_file_met_mid_epoch(data: Path, tmp_path: Path, loader: str) -> None:
    """--skip-validate: the loader itself (in a worker process for torch) meets a truncated file."""
    bad_data = make_pair_dataset(tmp_path / "data", n_train=8, n_val=4)
    good = (bad_data / "train" / "1.jpg").read_bytes()
    bad = bad_data / "train" / "5.jpg"
    bad.write_bytes(good[: len(good) // 2])
    done = run_cli(["train", "--data", bad_data, "--out", tmp_path / "run", "--loader", loader, "--skip-validate",
                    "--epochs", "1", *TINY])
    assert done.returncode == 2, done.output
    assert_one_line_error(done.stderr, str(bad), "truncated")


def interrupted_run(long_data: Path, run: Path, signum: int, group: bool) -> tuple[int, str]:
    """Start a 1-epoch run, signal it once step 10 is logged; returns (exit status, stderr)."""
    proc = CliProcess(["train", "--data", long_data, "--out", run, "--epochs", "1", "--log-every", "5", *TINY])
    proc.wait_for_output("step 10/")
    proc.signal(signum, group=group)
    done = proc.finish(timeout=120)
    return done.returncode, done.stderr


@pytest.fixture(scope="module")
def uninterrupted(long_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("e2e") / "straight"
    done = run_cli(["train", "--data", long_data, "--out", run, "--epochs", "1", "--log-every", "5", *TINY])
    assert done.returncode == 0, done.output
    return run


def test_ctrl_c_mid_epoch_saves_and_resume_equals_an_uninterrupted_run(
    long_data: Path, uninterrupted: Path, tmp_path: Path
) -> None:
    """Ctrl-C in a terminal signals the whole process group, DataLoader workers included."""
    run = tmp_path / "run"
    code, stderr = interrupted_run(long_data, run, signal.SIGINT, group=True)
    assert code == 130, stderr
    assert "Traceback" not in stderr and f"--resume {run}" in stderr
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["epoch"] == 0 and 10 <= state["step_in_epoch"] < 150  # mid-epoch
    # What was trained before the signal is saved unscored (a bounded stop: no validation on the way
    # out); --resume scores it first.
    unscored = state["partial"]["unvalidated"]
    assert unscored["partial"] and unscored["step"] == state["global_step"]
    assert not (run / "metrics.jsonl").exists()
    done = run_cli(["train", "--resume", run])
    assert done.returncode == 0, done.output
    assert_same_weights(weights(uninterrupted), weights(run))
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["partial"]) for r in records] == [(1, True), (1, False)]
    assert records[0]["step"] == state["global_step"] and records[0]["pixel_acc"] is not None


@pytest.mark.parametrize("group", [False, True], ids=["kill-pid", "kill-group"])
def test_sigterm_mid_epoch_saves_and_exits_143(long_data: Path, tmp_path: Path, group: bool) -> None:
    """`kill PID`, and SIGTERM to the whole process group (what Slurm's scancel and systemd do)."""
    run = tmp_path / "run"
    code, stderr = interrupted_run(long_data, run, signal.SIGTERM, group=group)
    assert code == 143, stderr
    assert "Traceback" not in stderr and f"--resume {run}" in stderr
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert 10 <= state["step_in_epoch"] < 150


def test_two_rank_run(data: Path, tmp_path: Path) -> None:
    done = run_cli(["train", "--nproc", "2", "--data", data, "--out", tmp_path / "run", "--epochs", "1", *TINY],
                   timeout=240)
    assert done.returncode == 0, done.output
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["world_size"] == 2


def test_eval(trained: Path, data: Path, tmp_path: Path) -> None:
    done = run_cli(["eval", "--ckpt", trained / "checkpoints" / "best.pt", "--data", data, "--device", "cpu",
                    "--json", tmp_path / "metrics.json"])
    assert done.returncode == 0, done.output
    scored = json.loads((tmp_path / "metrics.json").read_text())
    assert f"pixel acc {scored['pixel_acc']:.4f}" in done.stdout


def test_predict(trained: Path, data: Path, tmp_path: Path) -> None:
    done = run_cli(["predict", "--ckpt", trained / "checkpoints" / "best.pt", data / "val", "--pairs",
                    "--device", "cpu", "--out", tmp_path / "preds"])
    assert done.returncode == 0, done.output
    assert len(list((tmp_path / "preds").glob("*_overlay.png"))) == 4
    assert (tmp_path / "preds" / "metrics.json").is_file()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export(trained: Path, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"unet.{fmt}"
    done = run_cli(["export", "--ckpt", trained / "checkpoints" / "best.pt", "--format", fmt, "--out", out])
    assert done.returncode == 0, done.output
    assert out.is_file() and "agreement with PyTorch on 2 random inputs: 100.00 %" in done.stdout


def test_bench_loader(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "loader.json"
    done = run_cli(["bench", "loader", "--data", data, "--n", "4", "--batch-size", "2", "--reps", "1",
                    "--workers", "2", "--image-size", "32", "--augment", "none", "--json", out])
    assert done.returncode == 0, done.output
    labels = [row["label"] for row in json.loads(out.read_text())["results"]]
    assert "torch w2" in labels


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_train_with_no_flags_at_all(tmp_path: Path) -> None:
    """What a new user types first: the synthetic default data, the CPU preset, about 5 minutes."""
    done = run_cli(["train"], cwd=tmp_path, env={"CITYSEG_CACHE": str(tmp_path / "cache")}, timeout=1200)
    assert done.returncode == 0, done.output
    (run,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final"]["pixel_acc"] > 0.7
