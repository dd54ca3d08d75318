"""One owner per option (issue 25): each setting is declared once, as a config field with its Setting
(cityseg/config.py); the CLI flags, the rules, the choice lists, what --resume may change, the help's
defaults and the README's option table all come from there, and one library function
(`cityseg.resolve.resolve_run`) resolves a run, whichever way it comes in."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
import typer.main
import yaml

import cityseg.checkpoint as checkpoint
from cityseg.cli import app
from cityseg.cli.train import COMMAND_ONLY, NOT_IN_FILE, config_text, options_table
from cityseg.config import SETTINGS, Config, DataConfig, ModelConfig, TrainConfig, flatten
from cityseg.options import read_config_file
from cityseg.resolve import resolve_run
from cityseg.settings import MAX_EPOCHS
from cityseg.training import train
from tests.cli_process import run_cli
from tests.conftest import ROOT, TINY, make_pair_dataset


def train_options() -> dict[str, object]:
    """The `train` command's click options by parameter name."""
    command = typer.main.get_command(app).commands["train"]
    return {p.name: p for p in command.params}


def printed(done) -> dict:  # noqa: ANN001
    assert done.returncode == 0, done.output
    return flatten(yaml.safe_load(done.stdout))


def test_the_cli_the_config_file_reader_and_print_config_agree_on_every_key(tmp_path: Path) -> None:
    # Every setting with a flag is a train option under that flag, and every train option is a setting
    # or one of the command's own.
    options = train_options()
    flagged = {s.name: s for s in SETTINGS.values() if s.name}
    assert set(options) == set(flagged) | set(COMMAND_ONLY)
    for name, setting in flagged.items():
        assert setting.option in options[name].opts, name
    # --print-config prints every key a config file holds, and a config file may hold every key it prints.
    shown = printed(run_cli(["train", "--print-config"], timeout=120))
    assert set(shown) == set(SETTINGS) - set(NOT_IN_FILE)
    path = tmp_path / "all.yaml"
    path.write_text(config_text(Config()))
    assert set(read_config_file(path)) == set(SETTINGS) - set(NOT_IN_FILE)


def literal_tuples(tree: ast.AST) -> list[tuple]:
    return [tuple(e.value for e in node.elts) for node in ast.walk(tree)
            if isinstance(node, ast.Tuple) and node.elts and all(isinstance(e, ast.Constant) for e in node.elts)]


@pytest.mark.parametrize("key", ["train.schedule", "data.workers", "data.loader", "train.time_budget_s",
                                 "data.format"])
def test_these_settings_are_defined_in_one_place(key: str) -> None:
    """Their flag, default, range or choices appear in one declaration: a second `setting(...)` for the
    flag, a second literal of the choice list, or a typer option of the flag anywhere else fails this."""
    setting = SETTINGS[key]
    declared, choice_lists, typed = [], [], []
    for path in (ROOT / "cityseg").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            called = getattr(node.func, "id", getattr(node.func, "attr", ""))
            if called == "setting" and any(k.arg == "flag" and getattr(k.value, "value", None) == setting.flag
                                           for k in node.keywords):
                declared.append(path.name)
            if called == "Option" and path.name == "train.py":
                typed += [a.value for a in node.args if isinstance(a, ast.Constant) and a.value == setting.flag]
        if setting.choices:
            choice_lists += [path.name for t in literal_tuples(tree) if set(t) == set(setting.choices)]
    assert declared == ["config.py"] and not typed
    assert choice_lists in ([], ["config.py"])


def test_the_readme_option_table_is_the_declarations() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- train options: start -->\n(.*?)<!-- train options: end -->", readme, re.S)
    assert block is not None, "README lacks the generated option table"
    assert block.group(1) == options_table(), (
        "README's option table is stale: paste `python -c 'from cityseg.cli.train import options_table as t; "
        "print(t(), end=\"\")'` between its markers")


def test_the_help_states_the_declared_defaults() -> None:
    options = train_options()
    assert "(default 32; 16 for synthetic data on a CPU)" in " ".join(options["width"].help.split())
    assert "(default transpose; bilinear with --data)" in " ".join(options["upsample"].help.split())


def test_api_and_cli_resolve_the_same_config(tmp_path: Path) -> None:
    data = make_pair_dataset(tmp_path / "data", n_train=4, n_val=2)
    cli = printed(run_cli(["train", "--data", data, "--lr", "0.01", "--time-budget", "5m", "--cache", "device",
                           "--jitter", "0.2", "--device", "cpu", "--print-config"], timeout=120))
    api = resolve_run({"data.data_dir": str(data), "train.lr": 0.01, "train.time_budget_s": 300.0,
                       "data.cache": "device", "data.augment.brightness": 0.2, "data.augment.contrast": 0.2,
                       "data.augment.saturation": 0.2, "train.device": "cpu"})
    assert flatten(yaml.safe_load(config_text(api.config, api.derived))) == cli
    # the presets applied alike, the older spelling made the current one, the budget lifted the epochs
    assert cli["model.upsample"] == "bilinear" and cli["data.loader"] == "cache" and cli["data.cache"] == "none"
    assert cli["train.epochs"] == MAX_EPOCHS


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("settings")
    data = make_pair_dataset(root / "data", n_train=4, n_val=2)
    run = root / "run"
    done = run_cli(["train", "--data", data, "--out", run, "--epochs", "1", *TINY], timeout=300)
    assert done.returncode == 0, done.output
    return data, run


def test_a_time_budget_lifts_the_epochs_for_a_resume_as_for_a_new_run(short_run: tuple[Path, Path]) -> None:
    """`train --resume RUN --time-budget 1h` trains for the hour, as a new run with the budget does,
    unless --epochs is given too (it kept `epochs 1` before: the rule lived on one path only)."""
    data, run = short_run
    assert printed(run_cli(["train", "--data", data, "--time-budget", "1h", "--print-config"]))["train.epochs"] \
        == MAX_EPOCHS
    resumed = printed(run_cli(["train", "--resume", run, "--time-budget", "1h", "--print-config"]))
    assert resumed["train.epochs"] == MAX_EPOCHS and resumed["train.time_budget_s"] == 3600.0
    capped = printed(run_cli(["train", "--resume", run, "--time-budget", "1h", "--epochs", "3", "--print-config"]))
    assert capped["train.epochs"] == 3


def test_checkpoints_are_read_once_per_run(short_run: tuple[Path, Path], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    data, run = short_run
    reads: list[str] = []
    load = torch.load

    def counted(f, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        reads.append(Path(f).name if isinstance(f, (str, Path)) else "?")
        return load(f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "load", counted)
    fine_tune = tmp_path / "fine"
    values = {"data.data_dir": str(data), "train.init_from": str(run / "checkpoints" / "best.pt"),
              "train.out": str(fine_tune), "train.epochs": 1, "train.device": "cpu", "train.compile": False,
              "data.batch_size": 2}
    train(resolve_run(values))
    assert reads == ["best.pt"]  # --init-from: read once (architecture, size and weights)
    reads.clear()
    train(resolve_run({"train.resume": str(fine_tune), "train.epochs": 2}))
    assert reads == ["last.pt"]  # --resume: read once (config and state)
    reads.clear()
    cfg = Config(data=DataConfig(data_dir=str(data), image_size=32, batch_size=2), model=ModelConfig(width=4, depth=2),
                 train=TrainConfig(epochs=3, device="cpu", compile=False, resume=str(fine_tune)))
    cfg = Config(data=cfg.data, model=ModelConfig(width=4, depth=2, upsample="bilinear"), train=cfg.train)
    train(cfg)  # a complete Config through the API: the same single read
    assert reads == ["last.pt"]


def test_typed_options_are_checked_before_torchrun_starts_ranks() -> None:
    """`--nproc 2 --lr 0`: one line from the command itself, not one per rank after a launch."""
    done = run_cli(["train", "--nproc", "2", "--lr", "0", "--device", "cpu"], timeout=120)
    assert done.returncode == 2 and "launching: torchrun" not in done.output, done.output
    assert [ln for ln in done.stderr.splitlines() if ln.startswith("error:")] == \
        ["error: --lr 0.0: expected a number from 0 to 10 (above 0)"], done.stderr


def test_print_config_is_block_style_yaml_that_reads_back() -> None:
    """--print-config's YAML uses one style, block (lists as `- item` lines, not `[a, b]` inline)."""
    import yaml

    from cityseg.cli.train import config_text
    from cityseg.config import Config

    text = config_text(Config())
    assert "[" not in text and "{" not in text, text
    assert "  - 1.0" in text  # data.augment.scale, a list, one item a line
    assert yaml.safe_load(text)["model"]["width"] == Config().model.width
