"""--save-top-k: the K best checkpoints by a val metric (cityseg/training/hooks/top_k.py), checked
against the run's own metrics.jsonl and best.pt, at every validation and across a --resume."""

from __future__ import annotations

import itertools
import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from cityseg.checkpoint import load_checkpoint, load_from_checkpoint
from cityseg.config import NO_AUGMENT, Config, DataConfig, ModelConfig, TrainConfig
from cityseg.training import HookBase, Interrupted, train
from cityseg.training.events import EventStore
from cityseg.training.hooks import TopKCheckpoints
from tests.conftest import make_pair_dataset


def config(data: Path, out: Path, **train_kw: Any) -> Config:
    return Config(
        data=DataConfig(data_dir=str(data), image_size=32, batch_size=2, workers=0, augment=NO_AUGMENT),
        model=ModelConfig(width=4, depth=2),
        train=TrainConfig(**{"epochs": 5, "lr": 1e-2, "warmup_steps": 2, "device": "cpu", "precision": "32",
                             "compile": False, "log_every": 1, "val_every": "1", "tensorboard": False,
                             "out": str(out), **train_kw}),
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pair_dataset(tmp_path_factory.mktemp("top_k") / "data", n_train=4, n_val=2)  # 2 steps an epoch


def expected_names(run: Path, k: int, monitor: str) -> list[str]:
    """The reference: the K best records of metrics.jsonl, best first, ties to the earlier one."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    sign = 1 if monitor == "val_loss" else -1
    best = sorted(records, key=lambda r: sign * r[monitor])[:k]  # a stable sort keeps ties in run order
    return [f"epoch={r['epoch']}-step={r['step']}-{monitor}={r[monitor]:.4f}.pt" for r in best]


def top_k_files(run: Path) -> set[str]:
    return {p.name for p in (run / "checkpoints" / "top-k").iterdir()}


class ListedFilesExist(HookBase):
    """After each validation's last.pt is on disk: every file it lists as kept is there."""

    def __init__(self) -> None:
        self.checked = 0

    def after_epoch(self, record: dict[str, Any], metrics: Any) -> None:
        t = self.trainer
        t.saver.finish()
        kept = load_checkpoint(t.run.last)["hooks"]["TopKCheckpoints"]["kept"]
        assert all((t.run.checkpoints / "top-k" / name).is_file() for _, name in kept), kept
        self.checked += 1


@pytest.mark.parametrize("monitor", ["miou", "val_loss"])
def test_the_k_best_by_the_monitored_metric_are_kept(data: Path, tmp_path: Path, monitor: str) -> None:
    run, check = tmp_path / "run", ListedFilesExist()
    train(config(data, run, save_top_k=2, top_k_monitor=monitor), hooks=[check])
    want = expected_names(run, 2, monitor)
    assert check.checked == 5 and top_k_files(run) == set(want)
    kept = load_checkpoint(run / "checkpoints" / "last.pt")["hooks"]["TopKCheckpoints"]["kept"]
    assert [name for _, name in kept] == want
    listed = json.loads((run / "summary.json").read_text())["top_k"]
    assert listed["monitor"] == monitor
    assert [Path(c["path"]).name for c in listed["checkpoints"]] == want
    assert all(Path(c["path"]).is_file() for c in listed["checkpoints"])
    assert [c[monitor] for c in listed["checkpoints"]] == [score for score, _ in kept]
    model, cfg, _, _ = load_from_checkpoint(run / "checkpoints" / "top-k" / want[0])  # what eval/predict read
    assert cfg.model.width == 4 and "optimizer" not in load_checkpoint(run / "checkpoints" / "top-k" / want[0])
    if monitor == "miou":  # the best of the K is best.pt's weights (its own hook's choice)
        best = load_checkpoint(run / "checkpoints" / "best.pt")["model"]
        assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())


def test_a_resumed_run_keeps_the_same_k_and_drops_what_a_kill_left(data: Path, tmp_path: Path) -> None:
    """Ctrl-C after step 5 (mid epoch 3), a stray file left in top-k/ (a write whose last.pt never
    came), --resume: the same K files as the uninterrupted run, nothing else."""
    straight, run = tmp_path / "straight", tmp_path / "run"
    train(config(data, straight, save_top_k=2, top_k_monitor="val_loss"))
    steps = itertools.count(1)
    with pytest.raises(Interrupted):
        train(config(data, run, save_top_k=2, top_k_monitor="val_loss"),
              on_step=lambda: os.kill(os.getpid(), signal.SIGINT) if next(steps) == 5 else None)
    stray = run / "checkpoints" / "top-k" / "epoch=9-step=99-val_loss=0.0001.pt"
    stray.write_bytes(b"a write last.pt never listed")
    train(config(data, run, save_top_k=2, top_k_monitor="val_loss", resume=str(run)))
    assert top_k_files(run) == top_k_files(straight) == set(expected_names(straight, 2, "val_loss"))


class FakeSaver:
    """Writes at once; `finished` counts the waits for the background writes."""

    def __init__(self) -> None:
        self.finished = 0

    def save(self, path: Path, weights_only: bool = False) -> None:
        assert weights_only
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"weights")

    def finish(self) -> None:
        self.finished += 1


def test_a_dropped_file_goes_only_after_the_next_last_pt(tmp_path: Path) -> None:
    hook = TopKCheckpoints(k=2, monitor="miou")
    saver = FakeSaver()
    hook.trainer = SimpleNamespace(saver=saver, run=SimpleNamespace(checkpoints=tmp_path),  # type: ignore[assignment]
                                   dist=SimpleNamespace(is_main=True), completed=False, events=EventStore())
    scores = [0.2, 0.5, 0.5, 0.1, 0.7, None, 0.6]
    for step, miou in enumerate(scores, 1):
        hook.after_epoch({"epoch": step, "step": step, "miou": miou}, None)  # type: ignore[arg-type]
    names = {s: f"epoch={i}-step={i}-miou={s:.4f}.pt" for i, s in enumerate(scores, 1) if s is not None}
    assert [n for _, n in hook.kept] == [names[0.7], names[0.6]]
    # 0.5 (epoch 2) fell out at the last validation: its file stays until the next last.pt
    assert {p.name for p in tmp_path.glob("top-k/*")} == {names[0.7], names[0.6], "epoch=2-step=2-miou=0.5000.pt"}
    assert saver.finished >= 1
    hook.trainer.completed = True
    hook.after_train()
    assert {p.name for p in tmp_path.glob("top-k/*")} == {names[0.7], names[0.6]}
