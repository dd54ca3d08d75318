"""Training core: exact resume, atomic checkpoints, safe loading, NaN stop, overfitting, run folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cityseg.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cityseg.config import NO_AUGMENT, AugmentConfig, Config, DataConfig, ModelConfig, TrainConfig
from cityseg.data.pairs import list_split, read_pair
from cityseg.errors import OptionError, OutputError
from cityseg.model import UNet
from cityseg.palette import cityscapes_palette, map_colors_lut
from cityseg.training import TrainingError, train
from cityseg.training.schedule import warmup_cosine
from tests.conftest import ROOT

RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "curves.png", "samples.png",
             "checkpoints/best.pt", "checkpoints/last.pt")


def tiny_config(data: Path, out: Path, **train_kw) -> Config:
    return Config(
        data=DataConfig(data_dir=str(data), image_size=32, batch_size=2, workers=0,
                        augment=AugmentConfig(hflip=0.5, rotate_deg=5)),
        model=ModelConfig(width=4, depth=2),
        train=TrainConfig(**{"epochs": 2, "lr": 1e-2, "warmup_steps": 2, "device": "cpu", "precision": "32",
                             "compile": False, "log_every": 1, "out": str(out), **train_kw}),
    )


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_continues_exactly(pair_dataset: Path, tmp_path: Path) -> None:
    """2 epochs straight == 1 epoch, stop, resume, 1 more; also when stopping mid-epoch."""
    straight = tmp_path / "straight"
    train(tiny_config(pair_dataset, straight))
    for stop_at in (4, 5):  # end of epoch 1 (4 steps per epoch), and one step into epoch 2
        split = tmp_path / f"split{stop_at}"
        train(tiny_config(pair_dataset, split, max_steps=stop_at))
        assert load_checkpoint(split / "checkpoints" / "last.pt")["global_step"] == stop_at
        train(tiny_config(pair_dataset, split, resume=str(split)))
        assert_same_weights(final_weights(straight), final_weights(split))


@pytest.mark.timeout(120)
def test_a_resume_position_past_the_epoch_still_ends_it(pair_dataset: Path, tmp_path: Path) -> None:
    """A checkpoint whose position lies past its epoch's last batch (what a wrong resume offset
    produces) ends that epoch at once: the run finishes instead of spinning (a hang before the fix)."""
    run = tmp_path / "run"
    train(tiny_config(pair_dataset, run, max_steps=5))  # 4 steps an epoch: one step into epoch 2
    last = run / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    state["step_in_epoch"] = 4 + 3
    save_checkpoint(state, last)
    summary = train(tiny_config(pair_dataset, run, resume=str(run)))
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["partial"]) for r in records] == [(1, False), (2, True), (2, False)]
    assert summary["steps"] == 5  # no batch of the finished epoch was run again


def test_run_folder_is_complete(pair_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    summary = train(tiny_config(pair_dataset, run, epochs=1))
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    lines = (run / "metrics.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    for key in ("loss", "pixel_acc", "miou", "per_class_iou", "images_per_s", "data_wait_share", "lr", "seconds"):
        assert key in record
    saved = json.loads((run / "summary.json").read_text())
    assert saved["final"]["pixel_acc"] == pytest.approx(summary["final"]["pixel_acc"])
    assert set(saved["time_to_pixel_acc_s"]) == {"0.80", "0.85", "0.90", "0.94"}
    assert Config.from_dict(json.loads((run / "config.json").read_text())).model.width == 4


def test_existing_run_folder_is_not_overwritten(pair_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny_config(pair_dataset, run, max_steps=1))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(OutputError, match="already holds files"):
        train(tiny_config(pair_dataset, run, max_steps=1))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_nan_loss_stops_with_clear_message(pair_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A loss that turns NaN at the third step (an lr of 1e30 once did it; such an lr is now refused)."""
    import cityseg.training as training

    build = training.build_loss

    def poisoned(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        loss_fn, calls = build(*args, **kwargs), iter(range(1_000_000))
        return lambda logits, target: loss_fn(logits, target) * (float("nan") if next(calls) >= 2 else 1.0)

    monkeypatch.setattr(training, "build_loss", poisoned)
    with pytest.raises(TrainingError, match="NaN/inf") as error:
        train(tiny_config(pair_dataset, tmp_path / "run"))
    assert "the last good checkpoint" in str(error.value)


def test_the_api_checks_a_config_as_the_command_line_does(pair_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(OptionError, match=r"--lr \(train.lr\) 1e\+30: expected a number from 0 to 10"):
        train(tiny_config(pair_dataset, tmp_path / "run", lr=1e30))
    assert not (tmp_path / "run").exists()


def test_warmup_cosine_schedule() -> None:
    assert warmup_cosine(0, 10, 100, 0.01) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.01) == pytest.approx(1.0)
    assert warmup_cosine(100, 10, 100, 0.01) == pytest.approx(0.01)
    values = [warmup_cosine(s, 10, 100, 0.01) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "config": {}}, path)

    def dies_midway(obj, f, *a, **kw):
        f.write(b"partial garbage")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(OSError):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "config": {}}, path)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


# A child writes one checkpoint over the file and is SIGKILLed at a placed moment of that write (its
# `torch.save` or `os.replace` made to kill it there): no sleep, no luck, every moment every time.
KILL_IN_WRITE = """
import io, os, signal, sys, torch
from cityseg.checkpoint import save_checkpoint
path, moment = sys.argv[1], sys.argv[2]
real_save, real_replace = torch.save, os.replace
def die():
    os.kill(os.getpid(), signal.SIGKILL)
def half_then_die(obj, f):  # the kill lands inside the write: half the bytes are on disk
    buf = io.BytesIO()
    real_save(obj, buf)
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    f.flush()
    die()
def replaced_then_die(src, dst):
    real_replace(src, dst)
    die()
if moment == "mid-write":
    torch.save = half_then_die
elif moment == "before-rename":
    os.replace = lambda src, dst: die()
elif moment == "after-rename":
    os.replace = replaced_then_die
save_checkpoint({"model": {"w": torch.full((200_000,), 2.0)}, "config": {}}, path)
"""


@pytest.mark.parametrize("moment, survivor", [("mid-write", 1.0), ("before-rename", 1.0), ("after-rename", 2.0)])
def test_checkpoint_survives_sigkill_mid_write(tmp_path: Path, moment: str, survivor: float) -> None:
    """A process killed while rewriting a checkpoint never leaves a broken file: killed half-way
    through the bytes, after the write but before the rename, or just after the rename, the checkpoint
    loads whole, the old one or the new one, never a mix."""
    path = tmp_path / "best.pt"
    save_checkpoint({"model": {"w": torch.ones(200_000)}, "config": {}}, path)
    proc = subprocess.run([sys.executable, "-c", KILL_IN_WRITE, str(path), moment], cwd=ROOT, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    w = load_checkpoint(path)["model"]["w"]
    assert w.numel() == 200_000 and torch.equal(w, torch.full_like(w, survivor))
    leftovers = list(tmp_path.glob(".best.pt.*.tmp"))
    if moment == "mid-write":  # the proof that the kill landed inside the write
        assert len(leftovers) == 1 and 0 < leftovers[0].stat().st_size < path.stat().st_size
    elif moment == "after-rename":
        assert leftovers == []


class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


def test_crafted_pickle_checkpoint_is_refused(tmp_path: Path) -> None:
    """A checkpoint whose unpickling would run a shell command is refused, and the command never ran."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "x": Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file does carry the payload: a plain unpickle runs it
    assert marker.read_text().strip() == "pwned"


def test_resume_with_other_model_config_names_fields(pair_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny_config(pair_dataset, run, max_steps=1))
    cfg = tiny_config(pair_dataset, run, resume=str(run))
    with pytest.raises(CheckpointError, match="width: 4 in checkpoint vs 8"):
        train(replace(cfg, model=replace(cfg.model, width=8)))


@pytest.mark.slow
@pytest.mark.timeout(900)  # 230 s measured on the loaded 2-core machine
def test_tiny_unet_overfits_four_real_pairs(real_sample: Path) -> None:
    """>= 95 % train pixel accuracy on 4 real pairs within 300 steps (64 x 64, width 16)."""
    torch.manual_seed(0)
    p = cityscapes_palette()
    photos, targets = [], []
    for f in list_split(real_sample, "train")[:4]:
        photo, mask = read_pair(f)
        photos.append(torch.from_numpy(photo.copy()).permute(2, 0, 1).float() / 255)
        targets.append(map_colors_lut(torch.from_numpy(mask.copy()), p))
    x = torch.nn.functional.interpolate(torch.stack(photos), size=64, mode="bilinear", antialias=True)
    y = torch.nn.functional.interpolate(torch.stack(targets)[:, None].float(), size=64, mode="nearest")[:, 0].long()
    model = UNet(num_classes=19, width=16, depth=3)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for step in range(300):
        loss = torch.nn.functional.cross_entropy(model(x), y, ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 24:
            with torch.no_grad():
                model.eval()
                acc = (model(x).argmax(1) == y)[y != 255].float().mean().item()
                model.train()
            if acc >= 0.95:
                break
    assert acc >= 0.95, acc


def test_no_augment_constant_is_all_off() -> None:
    assert not NO_AUGMENT.geometric and not NO_AUGMENT.color


def test_kmeans_palette_run_saves_its_palette(pair_dataset: Path, tmp_path: Path) -> None:
    from cityseg.palette import load_palette

    run = tmp_path / "run"
    cfg = tiny_config(pair_dataset, run, epochs=1)
    summary = train(replace(cfg, data=replace(cfg.data, palette="kmeans:6")))
    palette = load_palette(run / "palette.json")
    assert 2 <= palette.num_classes <= 6
    assert len(summary["final"]["per_class_iou"]) == palette.num_classes
    assert load_checkpoint(run / "checkpoints" / "last.pt")["config"]["model"]["num_classes"] == palette.num_classes
