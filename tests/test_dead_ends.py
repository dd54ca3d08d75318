"""Dead ends and half-messages (issue 35, item 8): each says what can be done, in one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cityseg.config import Config, ConfigError, with_overrides
from cityseg.errors import UserError
from cityseg.outputs import check_new_run_folder
from cityseg.resolve import resolve_run
from cityseg.training import train
from cityseg.training.events import EventStore
from cityseg.training.hooks import BestModel
from tests.conftest import make_pair_dataset

NEW_RUN = {"train.device": "cpu", "train.compile": False, "data.batch_size": 2, "data.workers": 0,
           "data.image_size": 32, "model.width": 8, "model.depth": 2, "train.epochs": 1}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dead")
    data = make_pair_dataset(root / "data", n_train=4, n_val=2)
    train(resolve_run({**NEW_RUN, "data.data_dir": str(data), "train.out": str(root / "run")}))
    return data, root / "run"


def test_an_unknown_key_suggests_the_close_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr' \(did you mean train.lr or "):
        with_overrides(Config(), {"train.lrr": 0.1}, "--set")
    with pytest.raises(ConfigError, match=r"'train.nope' \(did you mean train.compile"):
        with_overrides(Config(), {"train.nope": 1}, "--set")
    with pytest.raises(ConfigError) as far:
        with_overrides(Config(), {"zzz": 1}, "--set")
    assert "did you mean" not in str(far.value)


def test_early_stop_counts_validations() -> None:
    hook = BestModel(patience=2)

    class Saver:
        def save(self, *a, **k) -> None: ...

    class T:
        events = EventStore()
        saver = Saver()
        run = type("R", (), {"best": None})

    hook.trainer = T()  # type: ignore[assignment]
    for miou in (0.5, 0.4, 0.3):
        hook.after_epoch({"miou": miou}, None)  # type: ignore[arg-type]
    assert hook.trainer.events.stop_reason == "early stop: no better val mIoU in the last 2 validations (--patience)"


def test_a_run_killed_before_its_first_checkpoint_is_no_dead_end(finished: tuple[Path, Path], tmp_path: Path) -> None:
    run = tmp_path / "early"
    run.mkdir()
    shutil.copy(finished[1] / "config.json", run / "config.json")  # what a run has before its first checkpoint
    with pytest.raises(UserError, match="stopped before its first checkpoint.*delete"):
        resolve_run({"train.resume": str(run)})
    with pytest.raises(UserError, match="stopped before its first checkpoint.*delete that folder"):
        check_new_run_folder(run)


def test_a_truncated_last_pt_names_best_pt_and_init_from(finished: tuple[Path, Path], tmp_path: Path) -> None:
    run = tmp_path / "cut"
    shutil.copytree(finished[1], run)
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(UserError) as refused:
        resolve_run({"train.resume": str(run), "train.epochs": 2})
    message = str(refused.value)
    assert message.startswith(f"{last}: not a readable checkpoint (truncated or damaged")
    assert message.endswith(f"--init-from {run / 'checkpoints' / 'best.pt'}"), message


def test_resume_with_no_epochs_left_says_so(finished: tuple[Path, Path], tmp_path: Path) -> None:
    """Before: summary.json rewritten and "done" printed, nothing trained. A run stopped after its last
    checkpoint but before its summary still finishes (the summary), saying nothing is trained."""
    with pytest.raises(UserError, match="trained 1 epochs: --epochs 1 leaves nothing to train; give --epochs above 1"):
        resolve_run({"train.resume": str(finished[1])})
    cut = tmp_path / "cut"
    shutil.copytree(finished[1], cut)
    (cut / "summary.json").unlink()
    assert any("leaves nothing to train; writing the summary" in note
               for note in resolve_run({"train.resume": str(cut)}).notes)


def test_out_inside_a_split_is_refused(finished: tuple[Path, Path]) -> None:
    with pytest.raises(UserError, match="inside the dataset split"):
        check_new_run_folder(finished[0] / "val" / "run")
