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
        bar.step(140, "step loss 0.812  14.2 img/s  wait 3%  gpu n/a  run eta 0:12:05  " + "x" * 60)
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
