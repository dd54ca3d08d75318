"""The live bar in a terminal leaves room at the right of its line for the "^C" a terminal echoes on
Ctrl-C: on a full-width line the echo wraps, the bar's final redraw lands one line lower, and the bar
shows twice."""

from __future__ import annotations

import io
import re

from rich.console import Console

from cityseg.progress import ECHO_ROOM, StepProgress

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_the_live_bar_leaves_room_for_the_ctrl_c_echo() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=80, color_system=None)
    with StepProgress(console, "epoch 12/100", total=371) as bar:
        bar.step(140, "step loss 0.812  14.2 img/s  wait 3%  gpu n/a  eta 0:12:05  " + "x" * 60)
    lines = [ANSI.sub("", part) for line in out.getvalue().split("\n") for part in line.split("\r")]
    assert any("epoch 12/100" in line for line in lines)
    assert max(len(line.rstrip()) for line in lines) <= 80 - ECHO_ROOM, lines


def test_the_epoch_bar_ends_before_the_validation_bar_starts(tmp_path) -> None:
    """In a terminal, the finished epoch bar stays above the validation bar (it used to be redrawn
    below it: the epoch's bar was still live while validation ran)."""
    from cityseg import Config, DataConfig, ModelConfig, TrainConfig, train
    from tests.conftest import make_pair_dataset

    data = make_pair_dataset(tmp_path / "data", n_train=8, n_val=4)
    cfg = Config(data=DataConfig(data_dir=str(data), image_size=32, batch_size=2, workers=0),
                 model=ModelConfig(width=4, depth=2),
                 train=TrainConfig(epochs=1, device="cpu", compile=False, tensorboard=False, out=str(tmp_path / "run")))
    out = io.StringIO()
    train(cfg, console=Console(file=out, force_terminal=True, width=120, color_system=None))
    text = ANSI.sub("", out.getvalue())
    assert "epoch 1/1" in text and "val after epoch 1" in text
    assert text.rindex("epoch 1/1") < text.index("val after epoch 1"), text


def test_the_per_class_table_keeps_its_title_and_caption_on_one_line() -> None:
    import torch

    from cityseg.metrics import ConfusionMatrix, iou_table

    cm = ConfusionMatrix(19, ignore_index=255)
    cm.update(torch.zeros(1, 4, 4, dtype=torch.int64), torch.zeros(1, 4, 4, dtype=torch.int64))
    title = "runs/20261204-101010/checkpoints/best.pt on val (500 images, scored at 256 px)"
    console = Console(width=100, record=True)
    console.print(iou_table(cm.compute(), [f"class {i}" for i in range(19)], title=title))
    lines = [line.strip() for line in console.export_text().splitlines()]
    assert title in lines
    assert "18 classes absent from truth and prediction: excluded from mIoU" in lines


def test_one_eta_the_runs_and_never_past_the_time_budget() -> None:
    """The epoch line shows one ETA, the run's: the remaining steps at the session's pace, capped by
    what is left of --time-budget (it showed the epoch's and the run's side by side, 0:29:31 and 0:01:44)."""
    import time
    from types import SimpleNamespace

    from cityseg.training.hooks import Progress

    hook = Progress(telemetry=None)
    clock = SimpleNamespace(seconds=100.0)
    train_cfg = SimpleNamespace(epochs=10, max_steps=None, time_budget_s=None)
    hook.trainer = SimpleNamespace(cfg=SimpleNamespace(train=train_cfg), data=SimpleNamespace(train=[0] * 50),
                                   global_step=25, clock=clock)
    hook.first_step, hook.t0 = 0, time.perf_counter() - 50.0  # 25 steps in 50 s: 2 s a step
    assert abs(hook.run_eta() - 475 * 2.0) < 5  # 500 steps in all, 475 left
    train_cfg.max_steps = 75
    assert abs(hook.run_eta() - 50 * 2.0) < 5
    train_cfg.time_budget_s = 130.0  # 30 s of budget left: the run ends then, not after 100 s
    assert hook.run_eta() == 30.0
    train_cfg.time_budget_s = 1100.0  # 1000 s of budget left, but the steps end in ~100 s
    assert abs(hook.run_eta() - 50 * 2.0) < 5
    out = io.StringIO()
    bar = StepProgress(Console(file=out, width=200), "epoch 1/10", total=50, own_eta=False)
    bar.step(25, "step loss 0.5  3.0 img/s  eta 0:00:30", log=True)
    assert out.getvalue().strip() == "epoch 1/10 step 25/50  step loss 0.5  3.0 img/s  eta 0:00:30"


def test_a_cpu_run_on_real_data_at_the_gpu_sizes_is_told_its_time_and_the_cpu_recipe() -> None:
    from types import SimpleNamespace

    import torch

    from cityseg.config import Config, DataConfig, ModelConfig, TrainConfig
    from cityseg.training.setup import cpu_advice

    cpu, gpu = SimpleNamespace(device=torch.device("cpu")), SimpleNamespace(device=torch.device("cuda"))
    real = Config(data=DataConfig(data_dir="d", image_size=256, batch_size=8), model=ModelConfig(width=32),
                  train=TrainConfig(epochs=10))
    advice = cpu_advice(real, cpu, steps_per_epoch=372, step_s=5.0)
    assert "--image-size 128 --width 16 --batch-size 8" in advice, advice
    assert "about 0:31:00 an epoch (372 steps at the warm-up's 5.0 s a step), 5:10:00 for 10 epochs" in advice, advice
    budget = Config(data=real.data, model=real.model, train=TrainConfig(time_budget_s=1200.0))
    assert "the --time-budget of 0:20:00" in cpu_advice(budget, cpu, 372, 5.0)
    recipe = Config(data=DataConfig(data_dir="d", image_size=128, batch_size=8), model=ModelConfig(width=16))
    synthetic = Config(data=DataConfig(image_size=256), model=ModelConfig(width=32))
    assert cpu_advice(recipe, cpu, 372, 1.0) is None  # already the CPU recipe
    assert cpu_advice(synthetic, cpu, 372, 1.0) is None  # the synthetic set has its own CPU preset
    assert cpu_advice(real, gpu, 372, 1.0) is None
