"""torchrun + DDP on CPU (gloo, 2 processes): one epoch, identical weights, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cityseg.checkpoint import load_checkpoint
from cityseg.inference.evaluate import evaluate_checkpoint
from tests.cli_process import Finished
from tests.cli_process import torchrun as launch
from tests.conftest import TINY_FP32 as TINY
from tests.conftest import make_pair_dataset


def torchrun(*args: str) -> Finished:
    """2 ranks of `cityseg-fast train ARGS`: hard timeout, and no process of the run left behind."""
    return launch(["train", *args], timeout=600)


@pytest.mark.slow
@pytest.mark.timeout(1500)  # three 2-rank runs
def test_two_rank_gloo_run_and_exact_resume(tmp_path: Path) -> None:
    data = make_pair_dataset(tmp_path / "data", n_train=10, n_val=5)
    straight = tmp_path / "straight"
    done = torchrun("--data", str(data), "--out", str(straight), "--epochs", "2", *TINY)
    assert done.returncode == 0, done.output[-3000:]
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 2
    # 10 pairs over 2 ranks: 5 each, 2 full batches of 2 per rank and epoch (drop_last).
    assert summary["steps"] == 4
    assert (straight / "metrics.jsonl").read_text().count("\n") == 2  # rank 0 alone writes
    # Sharded validation (3 + 2 images, no padding) equals one process scoring the saved checkpoint.
    single = evaluate_checkpoint(straight / "checkpoints" / "last.pt", data, batch_size=2, workers=0, device="cpu")
    assert single["pixel_acc"] == summary["final"]["pixel_acc"]
    assert single["miou"] == summary["final"]["miou"]

    split = tmp_path / "split"
    first = torchrun("--data", str(data), "--out", str(split), "--epochs", "2", "--max-steps", "3", *TINY)
    assert first.returncode == 0, first.output[-3000:]
    resumed = torchrun("--resume", str(split))
    assert resumed.returncode == 0, resumed.output[-3000:]
    a = load_checkpoint(straight / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(split / "checkpoints" / "last.pt")["model"]
    for k in a:  # BatchNorm buffers too: DDP broadcasts rank 0's, which the checkpoint holds
        assert torch.equal(a[k], b[k]), k


@pytest.mark.timeout(600)
def test_two_ranks_under_a_time_budget_agree(tmp_path: Path) -> None:
    """The training clock is the same number on every rank (agreed at log steps), so the ranks use the
    same learning rate and stop at the same step: the run ends, and its end-of-run check finds the
    weights identical."""
    data = make_pair_dataset(tmp_path / "data", n_train=10, n_val=5)
    done = torchrun("--data", str(data), "--out", str(tmp_path / "run"), "--time-budget", "3s", "--log-every", "2",
                    *TINY)
    assert done.returncode == 0, done.output[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["train_seconds"] >= 3.0
