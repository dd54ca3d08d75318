"""The dataset layouts through the installed command, as a user types it: `check-data` says which
layout it found and names a bad label, and `train`, `eval` and `predict --pairs` run on the official
Cityscapes layout (labelIds mapped to trainIds everywhere, checked against the labels by hand)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.cli_process import assert_one_line, run_cli
from tests.test_formats import LABEL_ID_OF_TRAIN_ID, scene, write_sample

TINY = ["--image-size", "32", "--width", "8", "--batch-size", "4", "--epochs", "1", "--no-compile", "--workers", "0",
        "--device", "cpu"]


def official_tree(root: Path, n_train: int = 8, n_val: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(1, n + 1):
            photo, ids = scene(rng, 32, 64)
            write_sample(root, "cityscapes", split, i, photo, ids, rng, city=("aachen", "bonn", "zurich")[i % 3])
    return root


def test_check_data_says_the_layout_and_names_a_bad_label(tmp_path: Path) -> None:
    root = official_tree(tmp_path / "cityscapes")
    done = run_cli(["check-data", root, "--threads", "1", "--sample", "2"])
    assert done.returncode == 0, done.output
    assert f"{root}: the official Cityscapes layout" in done.stdout and "(--format cityscapes)" in done.stdout
    bad = root / "gtFine" / "val" / "bonn" / "bonn_000000_000001_gtFine_labelIds.png"
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(bad)  # a colour image where class ids belong
    done = run_cli(["check-data", root, "--threads", "1", "--sample", "2"])
    assert done.returncode == 1 and "Traceback" not in done.output, done.output
    assert f"{bad}: RGB colour mask among class-id masks" in done.stderr
    # The wrong layout named: one line saying what was expected.
    assert_one_line(run_cli(["check-data", root, "--format", "folders"]), f"{root}: not a folders dataset", code=1)


@pytest.mark.slow
def test_train_eval_predict_on_the_official_layout(tmp_path: Path) -> None:
    root = official_tree(tmp_path / "cityscapes")
    run = tmp_path / "run"
    done = run_cli(["train", "--data", root, "--format", "cityscapes", "--out", run, "--max-steps", "2", *TINY])
    assert done.returncode == 0, done.output
    ckpt = run / "checkpoints" / "best.pt"
    done = run_cli(["eval", "--ckpt", ckpt, "--workers", "0", "--device", "cpu", "--json", tmp_path / "eval.json"])
    assert done.returncode == 0, done.output
    assert "scored at 64x32 px" in done.stdout  # the labels' native size, from the run's own --format
    scored = json.loads((tmp_path / "eval.json").read_text())
    done = run_cli(["predict", "--ckpt", ckpt, root, "--pairs", "--out", tmp_path / "pred", "--device", "cpu"])
    assert done.returncode == 0, done.output
    # The reference: predict's own id PNGs scored against the labelIds mapped by the written-out table.
    table = np.full(256, 255, np.uint8)
    table[LABEL_ID_OF_TRAIN_ID] = np.arange(19)
    right = total = 0
    for label in sorted((root / "gtFine" / "val").rglob("*_labelIds.png")):
        truth = table[np.asarray(Image.open(label))]
        name = label.name.replace("_gtFine_labelIds.png", "_leftImg8bit_ids.png")
        predicted = np.asarray(Image.open(tmp_path / "pred" / name))
        assert predicted.shape == truth.shape == (32, 64)
        right += int(((predicted == truth) & (truth != 255)).sum())
        total += int((truth != 255).sum())
    metrics = json.loads((tmp_path / "pred" / "metrics.json").read_text())
    assert metrics["images"] == 3
    assert metrics["pixel_acc"] == pytest.approx(right / total, abs=1e-9)
    assert scored["images"] == 3 and scored["scored_at_px"] == [32, 64]
