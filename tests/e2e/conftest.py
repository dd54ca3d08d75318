"""Session-wide fixtures of the end-to-end tests: built once per test session and shared by every
module, so each module does not pay for its own data set and trained run (each `train` process costs
seconds of interpreter start, imports and warm-up on a 2-core machine). Treat them as read-only: a test
that changes a run or a data set copies it into its tmp_path first.

    TINY            the flags of a tiny CPU run (tests/conftest.py; TINY_FP32 adds --no-amp): use them
                    in every `train` / `profile` command line that is not about sizes or precision
    pair_data       8 train / 4 val learnable 32 px pairs in the Kaggle layout (a folder named data/)
    trained_run     the run folder of `train --data pair_data --epochs 2 --log-every 1 TINY` (8 steps;
                    config, metrics, summary, curves, samples, TensorBoard events, best.pt, last.pt)
    trained_output  that command's `Finished` (returncode, stdout, stderr) as tests/cli_process returns it

A module that needs other data keeps its own fixture (a module fixture of the same name wins). Under
pytest-xdist the workers share them too: the first worker to need one builds it under a file lock in
the session's common temp folder, the others read what it built."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from filelock import FileLock

from tests.cli_process import Finished, run_cli
from tests.conftest import TINY, make_pair_dataset

RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "curves.png", "samples.png", "palette.json",
             "checkpoints/best.pt", "checkpoints/last.pt")


def shared_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's folder for shared fixtures: under xdist, the one all workers' temp folders sit in."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def pair_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = shared_folder(tmp_path_factory)
    with FileLock(folder / "data.lock"):
        if not (folder / "data.done").exists():
            make_pair_dataset(folder / "data", n_train=8, n_val=4)
            (folder / "data.done").touch()
    return folder / "data"


@pytest.fixture(scope="session")
def trained_output(pair_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Finished]:
    """(run folder, the finished `train` process): a full short run, checked here once per worker."""
    folder = shared_folder(tmp_path_factory)
    run, record = folder / "run", folder / "run.json"
    with FileLock(folder / "run.lock"):
        if record.exists():
            done = Finished(**json.loads(record.read_text()))
        else:
            done = run_cli(["train", "--data", pair_data, "--out", run, "--epochs", "2", "--log-every", "1", *TINY])
            record.write_text(json.dumps(dataclasses.asdict(done)))
    assert done.returncode == 0, done.output
    assert "done: val pixel acc" in done.stdout
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    return run, done


@pytest.fixture(scope="session")
def trained_run(trained_output: tuple[Path, Finished]) -> Path:
    return trained_output[0]
