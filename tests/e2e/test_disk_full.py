"""A full disk at any file a run writes (issue 24, case 8): one `error:` line naming that file and
the reason, exit 2, no traceback (TensorBoard's writer thread included), no temp file left behind,
and every checkpoint written before it intact. The disk fills through tests/faults/sitecustomize.py:
writes to the named file fail with ENOSPC inside the installed command, as a real full disk's do."""

from __future__ import annotations

from pathlib import Path

import pytest

from cityseg.checkpoint import load_checkpoint
from tests.cli_process import assert_one_line, run_cli
from tests.conftest import ROOT, TINY

FAULTS = ROOT / "tests" / "faults"


@pytest.fixture(scope="module")
def data(pair_data: Path) -> Path:
    return pair_data  # tests/e2e/conftest.py (8 train pairs: 4 steps)


# (file that fills the disk, what the line names, checkpoints on disk before it)
CASES = [
    ("curves.png", "curves.png: cannot write the training curves", ("best.pt", "last.pt")),
    ("samples.png", "samples.png: cannot write the sample predictions", ("best.pt", "last.pt")),
    ("events.out.tfevents", "events.out.tfevents.*: cannot write the TensorBoard event file", ()),
    ("metrics.jsonl", "metrics.jsonl: cannot write the metrics file", ("best.pt", "last.pt")),
    ("summary.json", "summary.json: cannot write the run summary", ("best.pt", "last.pt")),
    ("last.pt", "last.pt: could not write checkpoint (No space left on device)", ("best.pt",)),
]


@pytest.mark.parametrize("name,said,kept", CASES, ids=[c[0] for c in CASES])
def test_a_full_disk_is_one_line_naming_the_file(data: Path, tmp_path: Path, name: str, said: str,
                                                 kept: tuple[str, ...]) -> None:
    run = tmp_path / "run"
    done = run_cli(["train", "--data", data, "--out", run, "--epochs", "1", "--tensorboard", *TINY],
                   env={"PYTHONPATH": str(FAULTS), "CITYSEG_TEST_FULL_DISK": name}, timeout=300)
    assert_one_line(done, said)
    assert "no space left" in done.stderr.lower() and "Exception in thread" not in done.stderr, done.stderr
    assert not list(run.rglob("*.tmp")), sorted(run.rglob("*"))  # atomic writes clean up after themselves
    for checkpoint in kept:
        assert load_checkpoint(run / "checkpoints" / checkpoint)["global_step"] == 4
