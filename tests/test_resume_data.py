"""`--resume` checks the data folder against what the run trained on (issue 35, item 5): files added,
removed or replaced since are refused in one line naming what changed; the same files under a new
path (`--resume RUN --data NEW`) are accepted. Before: it resumed "at epoch 1, step 6" of what was now
a 2-step epoch, without a word."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from cityseg.checkpoint import load_checkpoint
from cityseg.errors import UserError
from cityseg.resolve import resolve_run
from cityseg.training import train
from tests.cli_process import assert_one_line, run_cli
from tests.conftest import make_pair_dataset

NEW_RUN = {"train.device": "cpu", "train.compile": False, "data.batch_size": 2, "data.workers": 0,
           "data.image_size": 32, "model.width": 8, "model.depth": 2, "train.epochs": 1}


@pytest.fixture
def started(tmp_path: Path) -> tuple[Path, Path]:
    """(data, run): a one-epoch run on 4 train / 2 val pairs."""
    data = make_pair_dataset(tmp_path / "data", n_train=4, n_val=2)
    run = tmp_path / "run"
    train(resolve_run({**NEW_RUN, "data.data_dir": str(data), "train.out": str(run)}))
    assert load_checkpoint(run / "checkpoints" / "last.pt")["data_fingerprint"]["train"]["files"] == 4
    return data, run


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("change,named", [
    ("remove", "train: 4 files then, 3 now"),
    ("add", "val: 2 files then, 3 now"),
    ("replace", "train: the same number of files (4)"),
])
def test_a_changed_data_folder_is_refused_naming_the_change(started: tuple[Path, Path], change: str,
                                                            named: str) -> None:
    data, run = started
    if change == "remove":
        (data / "train" / "4.jpg").unlink()
    elif change == "add":
        shutil.copy(data / "val" / "1.jpg", data / "val" / "9.jpg")
    else:  # another photo of another size under the same name
        make_pair_dataset(data.parent / "other", n_train=1, n_val=1, size=48)
        shutil.copy(data.parent / "other" / "train" / "1.jpg", data / "train" / "2.jpg")
    before = digests(run / "checkpoints")
    with pytest.raises(UserError) as refused:
        train(resolve_run({"train.resume": str(run), "train.epochs": 2}))
    assert named in str(refused.value) and f"--resume {run}" in str(refused.value), refused.value
    assert digests(run / "checkpoints") == before  # nothing trained, nothing rewritten


def test_the_same_files_under_a_new_path_resume(started: tuple[Path, Path], tmp_path: Path) -> None:
    data, run = started
    moved = tmp_path / "elsewhere" / "pairs"
    shutil.move(data, moved)
    summary = train(resolve_run({"train.resume": str(run), "train.epochs": 2, "data.data_dir": str(moved)}))
    assert summary["epochs"] == 2 and summary["data"] == str(moved)


def test_the_refusal_is_one_line_from_the_command(started: tuple[Path, Path]) -> None:
    data, run = started
    (data / "train" / "4.jpg").unlink()
    assert_one_line(run_cli(["train", "--resume", run, "--epochs", "2"], timeout=180),
                    "changed since the run started", "train: 4 files then, 3 now")
