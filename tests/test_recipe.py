"""What the accuracy work added: validation scored at the labels' native size, a time budget that
plans the schedule and ends annealed, --target-acc, EMA, CE + Dice, GroupNorm, one-cycle."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cityseg.checkpoint import load_checkpoint, load_from_checkpoint, save_checkpoint
from cityseg.config import AugmentConfig, Config, DataConfig, ModelConfig, TrainConfig
from cityseg.data.pairs import list_split, read_pair
from cityseg.inference.evaluate import evaluate_checkpoint
from cityseg.inference.predict import preprocess
from cityseg.palette import IGNORE_INDEX, cityscapes_palette, colorize, map_colors_reference
from cityseg.training import HookBase, schedule, train
from cityseg.training.losses import DiceCELoss
from cityseg.training.schedule import ProgressLR, TrainClock, onecycle
from tests.cli_process import run_cli
from tests.conftest import make_pair_dataset


def config(data: Path, out: Path, size: int = 32, **train_kw) -> Config:
    return Config(
        data=DataConfig(data_dir=str(data), image_size=size, batch_size=2, workers=0, augment=AugmentConfig(hflip=0)),
        model=ModelConfig(width=4, depth=2),
        train=TrainConfig(**{"epochs": 1, "lr": 1e-2, "warmup_steps": 2, "device": "cpu", "precision": "32",
                             "compile": False, "log_every": 1, "out": str(out), **train_kw}),
    )


def test_validation_is_scored_at_the_labels_native_size(tmp_path: Path) -> None:
    """A model run at 16 px on 32-px pairs: its logits upsampled to 32 px and argmaxed, scored against
    the 32-px masks, give exactly the confusion matrix counted here by hand."""
    data = make_pair_dataset(tmp_path / "data", n_train=4, n_val=3, size=32)
    run = tmp_path / "run"
    summary = train(config(data, run, size=16))
    assert summary["val_scored_at_px"] == 32
    model, cfg, palette, _ = load_from_checkpoint(run / "checkpoints" / "last.pt")
    confusion = np.zeros((19, 19), dtype=np.int64)
    for path in list_split(data, "val"):
        photo, mask = read_pair(path)
        x = preprocess([photo], 16, torch.device("cpu"))  # the val loader's resize and normalisation
        with torch.no_grad():
            logits = model(x).float()
        pred = torch.nn.functional.interpolate(logits, size=32, mode="bilinear", align_corners=False).argmax(1)[0]
        truth = map_colors_reference(torch.from_numpy(mask.copy()), palette.centers, palette.classes)
        keep = truth != IGNORE_INDEX
        np.add.at(confusion, (truth[keep].numpy(), pred[keep].numpy()), 1)
    scored = evaluate_checkpoint(run / "checkpoints" / "last.pt", data, device="cpu", workers=0)
    assert np.array_equal(np.array(scored["confusion"]), confusion)
    assert scored["pixel_acc"] == pytest.approx(np.trace(confusion) / confusion.sum())
    assert summary["final"]["pixel_acc"] == pytest.approx(scored["pixel_acc"])
    # Scored against 16-px masks instead, the same model gets other figures: the native size matters.
    resized = evaluate_checkpoint(run / "checkpoints" / "last.pt", data, device="cpu", workers=0, native=False)
    assert np.array(resized["confusion"]).sum() == 3 * 16 * 16 - resized["ignored_pixels"]


def test_time_budget_schedule_ends_at_its_floor() -> None:
    params = [torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD(params, lr=1.0)
    clock = TrainClock()
    sched = ProgressLR(opt, warmup=2, min_ratio=0.05, budget_s=100.0, clock=clock)
    seen = []
    for seconds in (10, 20, 50, 80, 99.9, 100, 130):
        clock.seconds = seconds
        sched.step()
        seen.append(opt.param_groups[0]["lr"])
    assert seen[0] == pytest.approx(0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 0.1)))  # warm-up done at step 1
    assert all(a > b for a, b in zip(seen[:5], seen[1:5], strict=False))  # decays with training time
    assert seen[-2] == pytest.approx(0.05) and seen[-1] == pytest.approx(0.05)  # the floor, and no further


def test_onecycle_shape() -> None:
    assert onecycle(0.0, 0.01) == pytest.approx(1 / 25)
    assert onecycle(0.3, 0.01) == pytest.approx(1.0)
    assert onecycle(1.0, 0.01) == pytest.approx(0.01)


class FakeCPUClock:
    """The training clock's CPU-time source, replaced: every read advances it by `step_s`, and the
    loop reads it once per step (plus once at each epoch's start), so a step costs exactly `step_s`
    training seconds whatever the machine's load."""

    def __init__(self, step_s: float) -> None:
        self.now, self.step_s = 0.0, step_s

    def __call__(self) -> float:
        self.now += self.step_s
        return self.now


def test_budgeted_run_ends_annealed_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1.5 s budget at 0.1 s a step is 15 steps, ending on the schedule's floor; resumed with a 3 s
    budget it runs 15 more."""
    monkeypatch.setattr(schedule, "cpu_seconds", FakeCPUClock(0.1))
    data = make_pair_dataset(tmp_path / "data", n_train=8, n_val=2)  # 4 steps an epoch
    run = tmp_path / "run"
    summary = train(config(data, run, time_budget_s=1.5, epochs=10_000, min_lr_ratio=0.05, clock="cpu"))
    assert summary["steps"] == 15 and summary["train_seconds"] == pytest.approx(1.5)
    assert summary["final"]["lr"] == pytest.approx(1e-2 * 0.05)
    assert (run / "checkpoints" / "best.pt").is_file()
    budget = dict(time_budget_s=3.0, epochs=10_000, min_lr_ratio=0.05, clock="cpu")
    more = train(config(data, run, resume=str(run), **budget))
    assert more["steps"] == 30 and more["train_seconds"] == pytest.approx(3.0)
    assert more["final"]["lr"] == pytest.approx(1e-2 * 0.05)


def test_target_accuracy_stops_at_the_first_epoch_that_reaches_it(tmp_path: Path) -> None:
    easy = make_pair_dataset(tmp_path / "data", n_train=16, n_val=4, photo_is_mask=True)
    out = tmp_path / "run"
    done = run_cli(["train", "--data", easy, "--out", out, "--epochs", "30", "--lr", "0.03", "--warmup-steps", "5",
                    "--target-acc", "0.5", "--device", "cpu", "--no-compile", "--image-size", "32", "--width", "8",
                    "--depth", "2", "--batch-size", "4", "--val-every", "1"])
    assert done.returncode == 0, done.output
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    # Every epoch validated: the run stopped at the first epoch whose accuracy reached the target, and
    # well before its 30 epochs (without --target-acc it would have run them all).
    stop = records[-1]["epoch"]
    assert [r["epoch"] for r in records] == list(range(1, stop + 1)) and stop < 30
    assert records[-1]["pixel_acc"] >= 0.5 and all(r["pixel_acc"] < 0.5 for r in records[:-1])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == stop and summary["steps"] == stop * 16 // 4
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == stop
    assert summary["target_reached_train_s"] == summary["final"]["train_s"]
    assert "target pixel accuracy 0.5 reached" in done.stdout


def test_ema_weights_are_validated_and_saved(tmp_path: Path) -> None:
    data = make_pair_dataset(tmp_path / "data", n_train=8, n_val=2)
    run = tmp_path / "run"
    train(config(data, run, ema=0.9, epochs=2))
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    ema = state["hooks"]["EMA"]  # each hook's state under its own key
    assert ema["ema_updates"] == 8
    assert any(not torch.equal(state["model"][k], ema["train_model"][k]) for k in state["model"])
    # eval scores what training's validation scored: the averaged weights
    scored = evaluate_checkpoint(run / "checkpoints" / "last.pt", data, device="cpu", workers=0)
    assert scored["pixel_acc"] == pytest.approx(state["history"][-1]["pixel_acc"])


def old_layout(path: Path) -> None:
    """Rewrite a checkpoint as versions before `hooks` wrote it: each hook's keys at the top level."""
    state = load_checkpoint(path)
    for hook_state in state.pop("hooks").values():
        state.update(hook_state)
    save_checkpoint(state, path)


@pytest.mark.parametrize("layout", ["current", "older"])
def test_resume_with_ema_equals_an_uninterrupted_run(tmp_path: Path, layout: str) -> None:
    """Also from a checkpoint in the older layout (hook state in top-level keys): it still resumes exactly."""
    data = make_pair_dataset(tmp_path / "data", n_train=8, n_val=2)
    train(config(data, tmp_path / "a", ema=0.9, epochs=2, patience=3))
    train(config(data, tmp_path / "b", ema=0.9, epochs=2, patience=3, max_steps=5))
    if layout == "older":
        old_layout(tmp_path / "b" / "checkpoints" / "last.pt")
    train(config(data, tmp_path / "b", ema=0.9, epochs=2, patience=3, resume=str(tmp_path / "b")))
    a, b = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in ("a", "b"))
    assert a["hooks"]["BestModel"] == b["hooks"]["BestModel"] and b["hooks"]["BestModel"]["best_miou"] > 0
    assert a["hooks"]["EMA"]["ema_updates"] == b["hooks"]["EMA"]["ema_updates"] == 8
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    raw_a, raw_b = a["hooks"]["EMA"]["train_model"], b["hooks"]["EMA"]["train_model"]
    assert all(torch.equal(raw_a[k], raw_b[k]) for k in raw_a)


def test_dice_ce_loss() -> None:
    logits = torch.full((1, 3, 2, 2), -20.0)
    target = torch.tensor([[[0, 1], [2, IGNORE_INDEX]]])
    for i, c in enumerate([0, 1, 2]):
        logits[0, c].view(-1)[i] = 20.0
    assert DiceCELoss()(logits, target).item() == pytest.approx(0.0, abs=1e-6)  # perfect: no CE, Dice 1
    wrong = torch.zeros_like(logits)
    loss = DiceCELoss(smooth=0.0)(wrong, target).item()
    # uniform 1/3 everywhere: CE = ln 3; Dice per class = 2 * (1/3) / (3 * 1/3 + 1) = 1/3
    assert loss == pytest.approx(math.log(3) + (1 - 1 / 3), rel=1e-5)
    # 4 classes, class 3 absent from the targets: Dice is averaged over the 3 present ones only.
    # uniform 1/4: CE = ln 4; Dice per present class = 2 * (1/4) / (3 * 1/4 + 1) = 2/7
    loss = DiceCELoss(smooth=0.0)(torch.zeros(1, 4, 2, 2), target).item()
    assert loss == pytest.approx(math.log(4) + (1 - 2 / 7), rel=1e-5)


def test_group_norm_and_one_cycle_train(tmp_path: Path) -> None:
    """The learning rate each epoch ends on is one-cycle's at that share of the run's steps; the model
    normalises with GroupNorm only, so in train mode a sample's output does not depend on its batch
    (BatchNorm's would)."""
    data = make_pair_dataset(tmp_path / "data", n_train=8, n_val=2)  # 4 steps an epoch, 8 in all
    cfg = config(data, tmp_path / "run", schedule="onecycle", loss="ce+dice", epochs=2, min_lr_ratio=0.05)
    train(replace(cfg, model=replace(cfg.model, norm="group")))
    lrs = [json.loads(ln)["lr"] for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([1e-2 * onecycle(4 / 8, 0.05), 1e-2 * onecycle(8 / 8, 0.05)])
    model, cfg, _, _ = load_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    norm_kinds = (torch.nn.GroupNorm, torch.nn.modules.batchnorm._NormBase)
    norms = [type(m) for m in model.modules() if isinstance(m, norm_kinds)]
    assert cfg.model.norm == "group" and norms and set(norms) == {torch.nn.GroupNorm}
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.train()(x)[:1], model(x[:1]), rtol=1e-4, atol=1e-5)


class LearningRates(HookBase):
    """Records the optimiser's lr after every step."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    def after_step(self) -> None:
        self.seen.append(self.trainer.parts.optimizer.param_groups[0]["lr"])


def test_a_short_budget_leaves_the_warm_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 60 s budget of 7.5 s steps (8 steps: a CPU run at the preset's size) with the default 100-step
    warm-up: the lr leaves the warm-up at the first step past 5 % of the budget, at the peak less the
    cosine's decay so far (12.5 % of the budget: 96 %), then anneals to its floor. The step-only
    warm-up of before never got past 9 % of the peak here."""
    monkeypatch.setattr(schedule, "cpu_seconds", FakeCPUClock(7.5))
    data = make_pair_dataset(tmp_path / "data", n_train=8, n_val=2)
    lrs = LearningRates()
    summary = train(config(data, tmp_path / "run", time_budget_s=60.0, epochs=10_000, warmup_steps=100, clock="cpu"),
                    hooks=[lrs])
    assert summary["steps"] == 8
    peak_after_one_step = 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 7.5 / 60))
    assert max(lrs.seen) == pytest.approx(1e-2 * peak_after_one_step), lrs.seen
    assert lrs.seen[-1] == pytest.approx(1e-2 * 0.01)


def test_a_plan_that_cannot_leave_warm_up_says_so() -> None:
    from cityseg.training.schedule import warmup_note

    assert "--max-steps 50 ends the run inside the 100-step LR warm-up" in warmup_note(100, 10_000, 50)
    assert warmup_note(100, 10_000, 0) is None and warmup_note(100, 10_000, 500) is None
    assert warmup_note(100, 200, 50) is None  # a 200-step plan warms up over 40 steps


def test_tensorboard_samples_are_drawn_without_a_figure_at_each_validation(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Each validation's TensorBoard samples are one image tensor (photo | truth | prediction rows), equal
    to the colours of what the model predicts; the matplotlib figure is drawn once, for samples.png at
    the end (a figure at every epoch boundary cost ~0.2 s of wall time on a CPU)."""
    from cityseg import report
    from cityseg.training.hooks import samples, tensorboard

    figures: list[Path] = []
    real_plot = report.plot_samples
    monkeypatch.setattr(samples, "plot_samples", lambda *a: (figures.append(a[-1]), real_plot(*a)))
    grids: list[torch.Tensor] = []
    real_grid = tensorboard.sample_grid
    monkeypatch.setattr(tensorboard, "sample_grid", lambda *a: grids.append(real_grid(*a)) or grids[-1])
    data = make_pair_dataset(tmp_path / "data", n_train=4, n_val=2)
    summary = train(config(data, tmp_path / "run", epochs=3, val_every="1", tensorboard=True))
    assert summary["validations"] == 3 and len(grids) == 3
    assert figures == [tmp_path / "run" / "samples.png"]
    grid, size = grids[-1], 32
    assert grid.shape == (3, 2 * size, 3 * size) and grid.dtype == torch.uint8
    palette = cityscapes_palette()
    for row, path in enumerate(list_split(data, "val")):  # the val loader's order: its first two images
        mask = torch.from_numpy(np.ascontiguousarray(read_pair(path)[1]))
        truth_panel = grid[:, row * size:(row + 1) * size, size:2 * size].permute(1, 2, 0)
        ids = map_colors_reference(mask, palette.centers, palette.classes)
        assert torch.equal(truth_panel, colorize(ids, palette))
