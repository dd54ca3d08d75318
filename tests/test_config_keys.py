"""Every key a config file or `--set` accepts takes effect exactly as its flag does, or is refused in one
line naming the flag to use (issue 35, item 3); numbers are read alike everywhere (`1e-3`, item 4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cityseg.checkpoint import load_checkpoint
from cityseg.cli.train import parse_set_values
from cityseg.config import NO_AUGMENT, Config, DataConfig, ModelConfig, TrainConfig
from cityseg.errors import OptionError
from cityseg.options import read_config_file
from cityseg.resolve import resolve_run
from cityseg.training import train
from tests.cli_process import assert_one_line, run_cli
from tests.conftest import make_pair_dataset


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data, a checkpoint of width 8) from two steps of a tiny run."""
    root = tmp_path_factory.mktemp("keys")
    data = make_pair_dataset(root / "data", n_train=4, n_val=2)
    cfg = Config(data=DataConfig(data_dir=str(data), image_size=32, batch_size=2, workers=0, augment=NO_AUGMENT),
                 model=ModelConfig(width=8, depth=2),
                 train=TrainConfig(epochs=1, device="cpu", precision="32", compile=False, out=str(root / "run")))
    train(cfg)
    return data, root / "run" / "checkpoints" / "last.pt"


BASE = {"train.device": "cpu", "train.compile": False, "data.batch_size": 2, "train.max_steps": 1, "train.lr": 1e-9,
        "data.workers": 0}


def test_init_from_by_set_or_config_file_is_the_flag(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """--set train.init_from, a config file's (relative to the file) and a fine-tuned run's own
    config.json: the same run as --init-from (before: trained from scratch, exit 0)."""
    data, ckpt = trained
    flag = resolve_run({**BASE, "data.data_dir": str(data), "train.init_from": str(ckpt)})
    assert flag.init is not None and flag.config.model.width == 8
    by_set = resolve_run({**BASE, "data.data_dir": str(data)}, set_values={"train.init_from": str(ckpt)})
    (tmp_path / "sub").mkdir()
    config = tmp_path / "sub" / "c.yaml"  # init_from relative to the file, as data_dir is
    config.write_text(f"data:\n  data_dir: {data}\ntrain:\n  init_from: ../ckpt.pt\n")
    (tmp_path / "ckpt.pt").write_bytes(ckpt.read_bytes())
    by_file = resolve_run(BASE, config_file=config)
    for run in (by_set, by_file):
        assert run.init is not None, "init_from accepted but not honoured"
        assert run.config.model == flag.config.model and run.config.data.image_size == flag.config.data.image_size
    copy = tmp_path / "ckpt.pt"
    assert Path(by_file.config.train.init_from).resolve() == copy.resolve()

    # A fine-tune started from its own config.json: the checkpoint's weights, not a fresh model.
    tuned = tmp_path / "tuned"
    train(resolve_run({**BASE, "train.out": str(tuned)}, config_file=config))
    again = tmp_path / "again"
    train(resolve_run({"train.out": str(again)}, config_file=tuned / "config.json"))
    before = load_checkpoint(ckpt)["model"]
    for run_dir in (tuned, again):
        after = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
        for key, value in before.items():
            if key.endswith(".weight") and value.dim() > 1:  # lr 1e-9, one step: the weights it started from
                torch.testing.assert_close(after[key], value, atol=1e-6, rtol=0)
    assert Path(json.loads((again / "config.json").read_text())["train"]["init_from"]).resolve() == copy.resolve()


def test_set_train_resume_is_one_line_naming_the_flag(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """Before: a 64-line AssertionError traceback."""
    done = run_cli(["train", "--set", f"train.resume={trained[1].parents[1]}", "--device", "cpu", "--out",
                    tmp_path / "run"], timeout=120)
    assert_one_line(done, "--set train.resume=", "--resume RUN")
    assert not (tmp_path / "run").exists()


def test_exponents_without_a_dot_are_numbers_everywhere(tmp_path: Path) -> None:
    """`--lr 1e-3` and TOML took it; `--set` and YAML refused it (YAML 1.1 wants `1.0e-3`)."""
    assert parse_set_values(["train.lr=1e-3", "train.weight_decay=5E-5", "train.seed=7", "data.palette=1e"]) == \
        {"train.lr": 0.001, "train.weight_decay": 5e-5, "train.seed": 7, "data.palette": "1e"}
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  lr: 1e-3\n  min_lr_ratio: 2.5e-2\n")
    assert read_config_file(config) == {"train.lr": 0.001, "train.min_lr_ratio": 0.025}
    assert resolve_run({"train.device": "cpu"}, config_file=config).config.train.lr == 0.001


@pytest.mark.parametrize("name,text,key", [
    ("c.yaml", "train:\n  lr: 0.001\n  lr: 0.002\n", "'lr' (line 3)"),
    ("c.yaml", "train: {lr: 0.001, lr: 0.002}\n", "'lr'"),
    ("c.yaml", "train:\n  lr: 0.001\ntrain:\n  epochs: 2\n", "'train' (line 3)"),
    ("c.json", '{"train": {"lr": 0.001, "lr": 0.002}}', "'lr'"),
    ("c.json", '{"train": {"lr": 0.001}, "train": {"epochs": 2}}', "'train'"),
])
def test_a_duplicate_key_is_refused_naming_file_and_key(tmp_path: Path, name: str, text: str, key: str) -> None:
    """Before: the last value won without a word (TOML refuses: so do these now)."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(OptionError) as refused:
        read_config_file(path)
    assert str(refused.value).startswith(f"--config {path}: duplicate key {key}"), refused.value


def test_a_duplicate_key_through_the_command_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.001\n  lr: 0.002\n")
    assert_one_line(run_cli(["train", "--config", path, "--print-config"], timeout=60), str(path), "duplicate key 'lr'")


def test_yaml_merge_keys_still_override(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("base: &b {lr: 0.001, epochs: 3}\ntrain:\n  <<: *b\n  lr: 0.002\n")
    assert read_config_file(path)["train.lr"] == 0.002
