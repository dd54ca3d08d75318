"""Paths that ordinary runs never take, each run once on the CPU: the fp16 GradScaler's state through
a checkpoint, SyncBatchNorm under 2 gloo ranks, the out-of-memory handler, class weights,
torch.compile with inductor, and the signal handlers given back when `train()` returns."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from cityseg.checkpoint import load_checkpoint, save_checkpoint
from cityseg.config import NO_AUGMENT, Config, DataConfig, ModelConfig, TrainConfig
from cityseg.data.pairs import list_split, read_pair
from cityseg.model import UNet
from cityseg.palette import IGNORE_INDEX, cityscapes_palette, map_colors_reference
from cityseg.training import TrainingError, train
from cityseg.training.loop import HookBase
from cityseg.training.step import TrainStep
from tests.cli_process import TORCHRUN_EXIT_GRACE_S, CliProcess
from tests.conftest import TINY_FP32 as TINY
from tests.conftest import make_pair_dataset


def config(data: Path, out: Path, **train_kw) -> Config:
    return Config(
        data=DataConfig(data_dir=str(data), image_size=32, batch_size=2, workers=0, augment=NO_AUGMENT),
        model=ModelConfig(width=4, depth=2),
        train=TrainConfig(**{"epochs": 2, "lr": 1e-2, "warmup_steps": 2, "device": "cpu", "precision": "32",
                             "compile": False, "log_every": 1, "out": str(out), **train_kw}),
    )


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_pair_dataset(tmp_path / "data", n_train=8, n_val=2)  # 4 steps an epoch


def test_fp16_scaler_state_survives_a_checkpoint(tmp_path: Path) -> None:
    """The GradScaler state a 16-mixed run saves (scale, growth tracker: an inf step backed it off) comes
    back through save_checkpoint / the weights-only load, and a scaler loaded from it then behaves as
    the one never saved. (16-mixed itself needs a GPU and is refused on a CPU; tests/test_gpu.py runs it.)"""
    weights = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([weights], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)

    def update(s: torch.amp.GradScaler, loss_scale: float) -> None:
        optimizer.zero_grad()
        s.scale((weights * loss_scale).sum()).backward()
        s.step(optimizer)
        s.update()

    for loss_scale in (1.0, float("inf"), 1.0, 1.0):  # the inf step halves the scale, then 2 good steps
        update(scaler, loss_scale)
    saved = scaler.state_dict()
    assert saved["scale"] == 2.0**9 and saved["_growth_tracker"] == 2
    save_checkpoint({"model": {"w": weights.detach()}, "config": {}, "scaler": saved}, tmp_path / "last.pt")
    restored = torch.amp.GradScaler("cpu")
    restored.load_state_dict(load_checkpoint(tmp_path / "last.pt")["scaler"])
    assert restored.state_dict() == saved
    for s in (scaler, restored):  # the third good step in a row doubles the scale, in both
        update(s, 1.0)
    assert restored.get_scale() == scaler.get_scale() == 2.0**10


@pytest.mark.timeout(400)
def test_sync_bn_under_two_gloo_ranks_is_refused_in_one_line(data: Path, tmp_path: Path) -> None:
    """SyncBatchNorm has no CPU kernel: 2 CPU ranks with --sync-bn stop before training with one
    line naming the option, and leave no process behind (CliProcess checks)."""
    args = ["train", "--data", data, "--out", tmp_path / "run", "--nproc", "2", "--sync-bn", *TINY]
    done = CliProcess(args).finish(timeout=300, grace=TORCHRUN_EXIT_GRACE_S)
    assert done.returncode != 0, done.output
    assert "Traceback" not in done.output, done.output
    errors = {line for line in done.stderr.splitlines() if line.startswith("error:")}
    assert len(errors) == 1 and "--sync-bn" in errors.pop(), done.stderr  # the same line from each rank at most


def test_out_of_memory_saves_the_position_and_suggests_a_smaller_batch(
        data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An out-of-memory error at the 3rd step: one message with a smaller --batch-size and --resume,
    last.pt at step 2, and resuming from it finishes the run."""
    real_step = TrainStep.__call__
    calls = {"n": 0}

    def runs_out_at_the_third(self, image, target):
        calls["n"] += 1
        if calls["n"] == 1 + 3:  # the warm-up's one call (state restored after it), then the 3rd step
            raise torch.OutOfMemoryError("CPU out of memory (injected)")
        return real_step(self, image, target)

    monkeypatch.setattr(TrainStep, "__call__", runs_out_at_the_third)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"out of cpu memory at batch size 2: try --batch-size 1") as e:
        train(config(data, run))
    assert f"--resume {run}" in str(e.value) and "\n" not in str(e.value)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["global_step"] == 2
    monkeypatch.setattr(TrainStep, "__call__", real_step)
    summary = train(config(data, run, resume=str(run)))
    assert summary["steps"] == 8


class LossWeights(HookBase):
    """Records the training loss's class weights."""

    weight: torch.Tensor | None = None

    def before_train(self) -> None:
        self.weight = self.trainer.parts.step.loss_fn.weight


def test_class_weights_are_inverse_sqrt_frequencies_of_the_train_masks(tmp_path: Path) -> None:
    """--class-weights inverse-sqrt-freq: the loss's weight of class c is 1/sqrt(share of c in the train
    masks), scaled to mean 1 over the classes present (counted here by hand)."""
    data = make_pair_dataset(tmp_path / "data", n_train=2, n_val=1)
    hook = LossWeights()
    train(config(data, tmp_path / "run", class_weights="inverse-sqrt-freq", epochs=1, loss="ce"), hooks=[hook])
    p = cityscapes_palette()
    counts = torch.zeros(19, dtype=torch.float64)
    for path in list_split(data, "train"):
        ids = map_colors_reference(torch.from_numpy(read_pair(path)[1].copy()), p.centers, p.classes)
        counts += torch.bincount(ids[ids != IGNORE_INDEX], minlength=19).double()
    present = counts > 0
    want = torch.zeros(19, dtype=torch.float64)
    want[present] = (counts.sum() / counts[present]).sqrt()
    want[present] /= want[present].mean()
    assert hook.weight is not None
    torch.testing.assert_close(hook.weight.double(), want, rtol=1e-5, atol=1e-6)
    assert want.max() > 2 * want[present].min()  # frequencies differ enough for a wrong formula to show


@pytest.mark.slow
@pytest.mark.timeout(600)  # inductor compiles C++ on a loaded CPU
def test_inductor_compile_matches_eager() -> None:
    """torch.compile with its default backend (inductor, C++ on the CPU), as --compile runs it."""
    torch.manual_seed(0)
    model = UNet(num_classes=5, width=4, depth=2).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-4, atol=1e-4)


def test_train_gives_the_signal_handlers_back(data: Path, tmp_path: Path) -> None:
    """A library call (a notebook, a test) keeps its own Ctrl-C/SIGTERM handling once train() returns."""
    def mine(signum, frame):  # noqa: ARG001
        pass

    before = {s: signal.signal(s, mine) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        train(config(data, tmp_path / "run", max_steps=1))
        assert signal.getsignal(signal.SIGINT) is mine and signal.getsignal(signal.SIGTERM) is mine
    finally:
        for s, h in before.items():
            signal.signal(s, h)
