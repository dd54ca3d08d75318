"""Every option of every command, run once as a user runs it (the installed script, its own process,
a hard timeout, the leftover-process check) with a value other than its default, and that value seen
in what the run wrote: config.json field by field, the checkpoint, summary.json, output files, or
figures recomputed here in-process with the same setting.

Options are grouped into few processes (one train run carries most train options at once); options
that exclude each other get a second run. Options already run as a process elsewhere are named in
ELSEWHERE, so the matrix below plus that list covers each option of each command.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cityseg.checkpoint import load_checkpoint, load_from_checkpoint
from cityseg.config import Config
from cityseg.data.check import check_dataset
from cityseg.inference.evaluate import evaluate_checkpoint
from cityseg.inference.export import run_exported
from cityseg.inference.predict import Predictor
from tests.cli_process import run_cli
from tests.conftest import make_pair_dataset

# Run as processes by other tests (file: options).
ELSEWHERE = {
    "tests/e2e/test_commands.py": "train --data/--out/--epochs/--max-steps/--patience/--resume/--nproc/--smoke, "
                                  "eval --ckpt/--data/--json, predict --pairs/--out, export --format, bench loader",
    "tests/e2e/test_user_features.py": "train --config/--print-config/--init-from/--log-every/--no-tensorboard",
    "tests/e2e/test_output_policy.py (issue 24)": "synth, profile, bench kernel, eval/predict/export --overwrite",
    "tests/test_bad_inputs.py": "train --loader torch|dali|cache, --skip-validate, --skip-bad, check-data",
}

SIZE = 64  # pairs are 64 px tall; the runs train at 32 px, so "native" and "model size" scoring differ
TRAIN_SIZE = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_pair_dataset(tmp_path_factory.mktemp("matrix") / "data", n_train=8, n_val=4, size=SIZE)
    (root / "train" / "9.jpg").write_bytes(b"not a jpeg" * 20)  # for --skip-bad
    return root


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same pairs without the bad file."""
    return make_pair_dataset(tmp_path_factory.mktemp("matrix") / "clean", n_train=8, n_val=4, size=SIZE)


# option flags -> (config key, the value config.json must hold); one process carries all of them.
TRAIN_A: list[tuple[list[str], str, object]] = [
    (["--image-size", "32"], "data.image_size", 32),
    (["--batch-size", "3"], "data.batch_size", 3),
    (["--loader", "torch"], "data.loader", "torch"),
    (["--workers", "1"], "data.workers", 1),
    (["--threads", "3"], "data.threads", 3),
    (["--prefetch", "3"], "data.prefetch", 3),
    (["--palette", "cityscapes"], "data.palette", "cityscapes"),
    (["--max-color-dist", "90"], "data.max_color_dist", 90.0),
    (["--skip-bad"], "data.skip_bad", True),
    (["--hflip", "0.3"], "data.augment.hflip", 0.3),
    (["--rotate", "5"], "data.augment.rotate_deg", 5.0),
    (["--scale", "0.9,1.1"], "data.augment.scale", [0.9, 1.1]),
    (["--jitter", "0.1"], "data.augment.brightness", 0.1),
    (["--hue", "0.05"], "data.augment.hue", 0.05),
    (["--width", "4"], "model.width", 4),
    (["--depth", "2"], "model.depth", 2),
    (["--upsample", "transpose"], "model.upsample", "transpose"),
    (["--norm", "group"], "model.norm", "group"),
    (["--encoder", "unet"], "model.encoder", "unet"),  # timm encoders: tests/test_encoders.py
    (["--encoder-weights", "none"], "model.encoder_weights", "none"),
    (["--epochs", "2"], "train.epochs", 2),
    (["--lr", "0.02"], "train.lr", 0.02),
    (["--weight-decay", "0.001"], "train.weight_decay", 0.001),
    (["--warmup-steps", "3"], "train.warmup_steps", 3),
    (["--grad-clip", "0.5"], "train.grad_clip", 0.5),
    (["--class-weights", "inverse-sqrt-freq"], "train.class_weights", "inverse-sqrt-freq"),
    (["--schedule", "onecycle"], "train.schedule", "onecycle"),
    (["--loss", "ce+dice"], "train.loss", "ce+dice"),
    (["--ema", "0.9"], "train.ema", 0.9),
    (["--patience", "5"], "train.patience", 5),
    (["--save-top-k", "2"], "train.save_top_k", 2),
    (["--set", "train.top_k_monitor=val_loss"], "train.top_k_monitor", "val_loss"),  # a config key, no flag
    (["--seed", "3"], "train.seed", 3),
    (["--log-every", "2"], "train.log_every", 2),
    (["--target-acc", "0.999"], "train.target_acc", 0.999),
    (["--no-tensorboard"], "train.tensorboard", False),
    (["--device", "cpu"], "train.device", "cpu"),
    (["--precision", "32"], "train.precision", "32"),
    (["--no-compile"], "train.compile", False),
]
# The second train run: the options that exclude the first run's (another loader, precision, compile).
TRAIN_B: list[tuple[list[str], str, object]] = [
    (["--cache", "device"], "data.loader", "cache"),  # the older spelling, made the current one
    (["--skip-validate"], "data.skip_validate", True),
    (["--precision", "bf16-mixed"], "train.precision", "bf16-mixed"),  # 16-mixed: GPU only (refused here)
    (["--compile"], "train.compile", True),
    (["--compile-mode", "default"], "train.compile_mode", "default"),
    (["--sync-bn"], "train.sync_bn", True),
    (["--max-steps", "3"], "train.max_steps", 3),
    (["--time-budget", "1h"], "train.time_budget_s", 3600.0),
    (["--tensorboard"], "train.tensorboard", True),
    (["--image-size", "32"], "data.image_size", 32),
    (["--batch-size", "2"], "data.batch_size", 2),
    (["--width", "4"], "model.width", 4),
    (["--depth", "2"], "model.depth", 2),
    (["--device", "cpu"], "train.device", "cpu"),
]


def flags(table: list[tuple[list[str], str, object]]) -> list[str]:
    return [arg for args, _, _ in table for arg in args]


def config_value(config: dict, key: str) -> object:
    for part in key.split("."):
        config = config[part]
    return config


def assert_config_holds(run: Path, table: list[tuple[list[str], str, object]]) -> None:
    config = json.loads((run / "config.json").read_text())
    wrong = {" ".join(args): (key, config_value(config, key), want) for args, key, want in table
             if config_value(config, key) != pytest.approx(want)}
    assert not wrong, f"options that did not reach config.json (key, found, expected): {wrong}"


@pytest.fixture(scope="module")
def run_a(data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("matrix") / "a"
    done = run_cli(["train", "--data", data, "--out", out, *flags(TRAIN_A)], timeout=400)
    assert done.returncode == 0, done.output
    return out, done.output


@pytest.mark.timeout(600)
def test_train_options_reach_the_run(run_a: tuple[Path, str]) -> None:
    out, output = run_a
    assert_config_holds(out, TRAIN_A)
    config = Config.from_dict(json.loads((out / "config.json").read_text()))
    assert (config.data.augment.contrast, config.data.augment.saturation) == (0.1, 0.1)  # --jitter's other keys
    # their effects: 8 good pairs of 9 (--skip-bad), 2 full batches of 3 an epoch, 2 epochs
    assert "skipped 1 bad train file(s)" in output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 * 2 and summary["epochs"] == 2
    assert (summary["precision"], summary["compile"], summary["loader"]) == ("32", False, "torch")
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["hooks"]["EMA"]["ema_updates"] == 4  # --ema: averaged weights saved, raw ones beside them
    model, _, _, _ = load_from_checkpoint(out / "checkpoints" / "last.pt")
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())  # --norm group
    assert any(isinstance(m, torch.nn.ConvTranspose2d) for m in model.modules())  # --upsample transpose
    assert not list(out.rglob("events.out.tfevents*"))  # --no-tensorboard
    # --save-top-k 2, ranked by val_loss: the lowest val losses of metrics.jsonl, one file each
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best = sorted(records, key=lambda r: r["val_loss"])[:2]
    assert {p.name for p in (out / "checkpoints" / "top-k").iterdir()} == {
        f"epoch={r['epoch']}-step={r['step']}-val_loss={r['val_loss']:.4f}.pt" for r in best}


@pytest.mark.slow
@pytest.mark.timeout(900)  # torch.compile with inductor on a loaded CPU
def test_train_options_that_exclude_the_first_run(clean: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    # torch.compile's worker processes take their time to go on a loaded machine: 30 s, not 10
    done = run_cli(["train", "--data", clean, "--out", out, *flags(TRAIN_B)], timeout=800, grace=30)
    assert done.returncode == 0, done.output
    assert_config_holds(out, TRAIN_B)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3  # --max-steps, long before the hour's budget
    # what the run really used (resolved at start-up), not only what it was asked
    assert (summary["precision"], summary["compile"], summary["loader"]) == ("bf16-mixed", True, "cache")
    assert list(out.rglob("events.out.tfevents*"))  # --tensorboard


def test_amp_switch_sets_the_precision(data: Path, tmp_path: Path) -> None:
    """--amp is the older spelling of --precision bf16-mixed (--no-amp of 32: every TINY run uses it)."""
    done = run_cli(["train", "--data", data, "--out", tmp_path / "run", "--amp", "--print-config"], timeout=120)
    assert done.returncode == 0, done.output
    assert yaml.safe_load(done.stdout)["train"]["precision"] == "bf16-mixed", done.stdout  # --print-config is YAML


def test_eval_options(run_a: tuple[Path, str], clean: Path, tmp_path: Path) -> None:
    """--split train --tta flip --model-size: the figures are those computed in-process with the same
    settings, and not those of the defaults."""
    out, _ = run_a
    ckpt = out / "checkpoints" / "last.pt"
    json_out = tmp_path / "train.json"
    done = run_cli(["eval", "--ckpt", ckpt, "--data", clean,
                    "--split", "train", "--tta", "flip", "--model-size", "--batch-size", "3", "--workers", "1",
                    "--device", "cpu", "--json", json_out], timeout=180)
    assert done.returncode == 0, done.output
    got = json.loads(json_out.read_text())
    want = evaluate_checkpoint(ckpt, clean, split="train", batch_size=3, device="cpu", workers=0, tta="flip",
                               native=False)
    assert got["confusion"] == want["confusion"] and got["pixel_acc"] == pytest.approx(want["pixel_acc"])
    assert np.array(got["confusion"]).sum() + got["ignored_pixels"] == 8 * TRAIN_SIZE**2  # train split, model size


def test_predict_options(run_a: tuple[Path, str], data: Path, tmp_path: Path) -> None:
    """--tta flip --skip-bad --batch-size --threads: the class ids are the flip-averaged predictor's."""
    out, _ = run_a
    ckpt = out / "checkpoints" / "last.pt"
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(photos / f"{i}.png")
    (photos / "broken.png").write_bytes(b"no png")
    done = run_cli(["predict", "--ckpt", ckpt, photos, "--out", tmp_path / "pred", "--tta", "flip", "--skip-bad",
                    "--batch-size", "2", "--threads", "1", "--device", "cpu"], timeout=180)
    assert done.returncode == 0, done.output
    assert "skipped 1" in done.stdout and "broken.png" in done.output
    flip = Predictor(ckpt, device="cpu", tta="flip")
    for i in range(3):
        (want,) = flip.predict_batch([np.asarray(Image.open(photos / f"{i}.png").convert("RGB"))])
        assert np.array_equal(np.asarray(Image.open(tmp_path / "pred" / f"{i}_ids.png")), want), i


def test_export_options(run_a: tuple[Path, str], tmp_path: Path) -> None:
    """--no-check skips the parity check; --image-size sets the traced size; torchscript loads and runs."""
    out, _ = run_a
    path = tmp_path / "unet.pt"
    done = run_cli(["export", "--ckpt", out / "checkpoints" / "last.pt", "--format", "torchscript", "--out", path,
                    "--image-size", "64", "--no-check"], timeout=180)
    assert done.returncode == 0, done.output
    assert "agreement" not in done.output
    assert run_exported(path, "torchscript", torch.zeros(1, 3, 64, 64)).shape == (1, 19, 64, 64)


@pytest.mark.parametrize("names", [("--far-dist", "--threads"), ("--max-color-dist", "--workers")],
                         ids=["names", "older-names"])
def test_check_data_options(data: Path, names: tuple[str, str]) -> None:
    """--sample 1 --far-dist 60 --threads 1 (or their older names, kept for one release): the
    near-colour share is that of one file at 60."""
    far, threads = names
    done = run_cli(["check-data", data, "--sample", "1", far, "60", threads, "1"], timeout=180)
    assert done.returncode == 1, done.output  # the bad file planted for --skip-bad
    report = check_dataset(data, workers=1, sample=1, max_dist=60.0)
    wide = check_dataset(data, workers=1, sample=50, max_dist=60.0)
    for one, many in zip(report.splits, wide.splits, strict=True):
        assert f"{one.near_share:.1%}" in done.stdout
        assert one.near_share != many.near_share  # one file is not all of them: --sample mattered
    assert "within 60" in done.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)  # three benchmark processes, one compiling
def test_bench_train_e2e_kernel_quickest(tmp_path: Path) -> None:
    """bench train / e2e / kernel once each at their quickest sizes, each result file holding what was asked."""
    train_json, e2e_json, kernel_json = tmp_path / "train.json", tmp_path / "e2e.json", tmp_path / "kernel.json"
    # torch.compile's worker processes take their time to go on a loaded machine: 30 s, not 10
    done = run_cli(["bench", "train", "--quick", "--widths", "4", "--batch", "2", "--size", "32",
                    "--json", train_json], timeout=300, grace=30)
    assert done.returncode == 0, done.output
    assert {row["width"] for row in json.loads(train_json.read_text())["results"]} == {4}
    many = make_pair_dataset(tmp_path / "data", n_train=64, n_val=2, size=32)  # 6 steps > 5 warm-up, in one epoch
    done = run_cli(["bench", "e2e", "--data", many, "--steps", "6", "--loaders", "torch", "--json", e2e_json],
                   timeout=300)
    assert done.returncode == 0, done.output
    assert [row["loader"] for row in json.loads(e2e_json.read_text())["results"]] == ["torch"]
    done = run_cli(["bench", "kernel", "--json", kernel_json], timeout=300)
    assert done.returncode == 0, done.output
    assert json.loads(kernel_json.read_text())["results"]
