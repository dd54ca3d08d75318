"""What users of Lightning / timm / mmseg expect, through the installed command: TensorBoard, config
files, fine-tuning, the Python API as the README shows it, a fast --help, progress off a terminal,
the Kaggle archive layout, and two nodes."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cityseg.checkpoint import load_checkpoint
from tests.cli_process import TORCHRUN_EXIT_GRACE_S, CliProcess, run_cli
from tests.conftest import ROOT, TINY, make_pair_dataset


@pytest.fixture(scope="module")
def data(pair_data: Path) -> Path:
    return pair_data  # tests/e2e/conftest.py: one set and one trained run (--log-every 1) for the session


@pytest.fixture(scope="module")
def run(trained_run: Path) -> Path:
    return trained_run


def test_tensorboard_events_match_metrics_jsonl(run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    for key in ("pixel_acc", "miou", "val_loss"):
        logged = [(e.step, e.value) for e in events.Scalars(f"val/{key}")]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in records], key
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))  # every log step (--log-every 1)
    assert [e.value for e in events.Scalars("train/lr")][-1] == pytest.approx(records[-1]["lr"], rel=1e-6)
    assert len(events.Scalars("val_iou/road")) == 2 and events.Images("samples")
    assert "perf/images_per_s" in events.Tags()["scalars"]


def test_no_tensorboard_writes_no_events(data: Path, tmp_path: Path) -> None:
    done = run_cli(["train", "--data", data, "--out", tmp_path / "run", "--epochs", "1", "--no-tensorboard", *TINY])
    assert done.returncode == 0, done.output
    assert not list((tmp_path / "run").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("fmt", ["toml", "yaml", "json"])
def test_config_file_and_command_line_overrides(data: Path, tmp_path: Path, fmt: str) -> None:
    values = {"data": {"image_size": 48, "batch_size": 3}, "model": {"width": 6}, "train": {"lr": 0.005}}
    path = tmp_path / f"cfg.{fmt}"
    if fmt == "toml":
        path.write_text("[data]\nimage_size = 48\nbatch_size = 3\n[model]\nwidth = 6\n[train]\nlr = 0.005\n")
    elif fmt == "yaml":
        path.write_text("data: {image_size: 48, batch_size: 3}\nmodel: {width: 6}\ntrain: {lr: 0.005}\n")
    else:
        path.write_text(json.dumps(values))
    done = run_cli(["train", "--config", path, "--data", data, "--width", "8", "--print-config"])
    assert done.returncode == 0, done.output
    shown = printed_config(done.stdout)
    assert shown["data.image_size"] == 48 and shown["data.batch_size"] == 3 and shown["train.lr"] == 0.005
    assert shown["model.width"] == 8  # the command line wins over the file


def printed_config(text: str) -> dict:
    """`--print-config` output (YAML) as {dotted key: value}."""
    import yaml

    from cityseg.config import flatten

    return flatten(yaml.safe_load(text))


def test_real_data_gets_the_measured_recipe_by_default(data: Path) -> None:
    """With --data the `real-data` preset (the recipe benchmarks/accuracy.py measured best) is the
    default, the synthetic data keeps the plain one, and a flag still wins over the preset."""
    from cityseg.config import PRESETS

    def shown(args: list) -> dict:
        done = run_cli(["train", *args, "--print-config"])
        assert done.returncode == 0, done.output
        return printed_config(done.stdout)

    real, synthetic = shown(["--data", data]), shown([])
    assert PRESETS["real-data"] and all(real[k] == v for k, v in PRESETS["real-data"].items())
    assert synthetic["model.upsample"] == "transpose" and synthetic["train.loss"] == "ce"
    assert shown(["--data", data, "--upsample", "transpose"])["model.upsample"] == "transpose"


def test_a_runs_own_config_json_is_a_config_file(run: Path, data: Path) -> None:
    done = run_cli(["train", "--config", run / "config.json", "--print-config"])
    assert done.returncode == 0, done.output
    shown = printed_config(done.stdout)
    assert shown["model.width"] == 4
    assert "train.out" not in shown  # the run folder is the command line's


@pytest.mark.parametrize("content,fragment", [
    ("[model]\nwidht = 6\n", "unknown config key 'model.widht'"),
    ("[model]\nwidth = \"wide\"\n", "model.width = 'wide': expected int"),
    ("[train]\nlr = -1.0\n", "--lr (train.lr) -1.0"),
    ("[model\n", "not valid TOML"),
])
def test_bad_config_file_is_one_line(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "cfg.toml"
    path.write_text(content)
    done = run_cli(["train", "--config", path, "--print-config"])
    assert done.returncode == 2 and "Traceback" not in done.output, done.output
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], done.stderr


def test_init_from_takes_the_weights_and_the_architecture(run: Path, data: Path, tmp_path: Path) -> None:
    ckpt = run / "checkpoints" / "last.pt"
    out = tmp_path / "tuned"
    done = run_cli(["train", "--data", data, "--out", out, "--init-from", ckpt, "--max-steps", "1", "--lr", "1e-9",
                    "--device", "cpu", "--no-compile", "--image-size", "32", "--batch-size", "2"])
    assert done.returncode == 0, done.output
    before, after = load_checkpoint(ckpt), load_checkpoint(out / "checkpoints" / "last.pt")
    assert after["config"]["model"]["width"] == 4 and after["global_step"] == 1  # a new run, the old model
    for key, value in before["model"].items():
        if key.endswith(".weight") and value.dim() > 1:
            torch.testing.assert_close(after["model"][key], value, atol=1e-6, rtol=0)


def test_init_from_with_another_class_count_reinitialises_the_head(run: Path, data: Path, tmp_path: Path) -> None:
    done = run_cli(["train", "--data", data, "--out", tmp_path / "k", "--init-from", run / "checkpoints" / "last.pt",
                    "--palette", "kmeans:5", "--epochs", "1", "--device", "cpu", "--no-compile", "--image-size", "32",
                    "--batch-size", "2"])
    assert done.returncode == 0, done.output
    assert "the head is re-initialised" in done.stdout
    assert load_checkpoint(tmp_path / "k" / "checkpoints" / "last.pt")["model"]["head.weight"].shape[0] <= 5


def test_init_from_another_architecture_is_refused(run: Path, data: Path, tmp_path: Path) -> None:
    done = run_cli(["train", "--data", data, "--out", tmp_path / "w", "--init-from", run / "checkpoints" / "last.pt",
                    "--width", "8", *TINY[:5]])
    assert done.returncode == 2 and "same architecture" in done.stderr and "width" in done.stderr, done.output


def readme_python_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(r"<!-- python-api -->\n```python\n(.*?)```", text, re.S).group(1)


@pytest.mark.timeout(600)  # its subprocess alone may take 300 s
def test_the_readme_python_api_snippet_runs_as_written(tmp_path: Path) -> None:
    """From an empty folder, twice (a second run must not trip over the first's folders), and quiet:
    the only output is the snippet's own prints."""
    for attempt in (1, 2):
        proc = subprocess.run([sys.executable, "-c", readme_python_snippet()], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "CITYSEG_CACHE": str(tmp_path / "cache")})
        assert proc.returncode == 0, f"run {attempt}: {proc.stderr[-3000:]}"
        assert len(proc.stdout.splitlines()) == 2, proc.stdout  # the snippet's two prints, nothing of the library
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all((run / "summary.json").is_file() for run in runs)


def test_help_does_not_import_torch() -> None:
    """`--help` and option errors answer at once: nothing heavy is imported to print them."""
    code = "import sys; from cityseg.cli import app; import cityseg; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_help_panels_and_version() -> None:
    done = run_cli(["train", "--help"], env={"COLUMNS": "140"})
    assert done.returncode == 0
    for panel in ("Data", "Augmentation", "Model", "Training", "Speed", "Output"):
        assert re.search(rf"─ {panel} ─", done.stdout), panel
    version = run_cli(["--version"])
    assert version.returncode == 0 and re.fullmatch(r"cityseg-fast \S+\n", version.stdout)


def test_progress_lines_off_a_terminal(data: Path, tmp_path: Path) -> None:
    proc = CliProcess(["train", "--data", data, "--out", tmp_path / "run", "--epochs", "2", "--log-every", "2", *TINY])
    done = proc.finish(timeout=180)
    assert done.returncode == 0, done.output
    lines = [ln for ln in done.stdout.splitlines() if re.match(r"epoch \d+/2 step \d+/4 ", ln)]
    assert [ln.split()[3] for ln in lines] == ["2/4", "4/4", "2/4", "4/4"]
    assert all(re.search(r"loss \d+\.\d+ .* img/s .*  eta \d+:\d\d:\d\d$", ln) for ln in lines), lines
    assert all(ln.count("eta") == 1 for ln in lines), lines  # one ETA: the run's (two used to disagree)
    assert re.search(r"^val after epoch 2 step 2/2", done.stdout, re.M)


def test_the_kaggle_archive_root_is_found(tmp_path: Path) -> None:
    """The Kaggle download unpacks to cityscapes_data/ with train/, val/ and a nested copy of both."""
    archive = tmp_path / "archive"
    inner = make_pair_dataset(archive / "cityscapes_data", n_train=4, n_val=2)
    make_pair_dataset(inner / "cityscapes_data", n_train=4, n_val=2)
    done = run_cli(["check-data", archive])
    assert done.returncode == 0 and f"using {inner}" in done.stdout, done.output
    done = run_cli(["train", "--data", archive, "--out", tmp_path / "run", "--epochs", "1", *TINY])
    assert done.returncode == 0, done.output
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["data"] == str(inner)
    two = tmp_path / "two"
    make_pair_dataset(two / "a", n_train=2, n_val=2)
    make_pair_dataset(two / "b", n_train=2, n_val=2)
    done = run_cli(["check-data", two])
    assert done.returncode == 1 and "folders below it that hold both: a, b" in done.stderr, done.output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(600)
def test_two_nodes_on_this_machine(data: Path, tmp_path: Path) -> None:
    """Two torchrun launchers (--nnodes 2, one process each) meeting at a localhost c10d rendezvous:
    both finish, leaving no process behind, the run has 2 ranks, and the engine's end-of-run check
    found identical weights."""
    port = free_port()
    launcher = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                f"127.0.0.1:{port}", "--rdzv-id", "cityseg-test"]
    args = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1", *TINY]
    program = [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "cityseg"]
    nodes = [CliProcess(args, cwd=ROOT, env={"GLOO_SOCKET_IFNAME": "lo"}, program=program) for _ in range(2)]
    try:
        deadline = time.monotonic() + 300
        for node in nodes:
            node.proc.wait(max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass  # finish() below names the hung node and kills its whole session
    # The launchers wait for each other at torchrun's exit barrier: each is done once the last line of
    # either has appeared (the other node's rank may still be writing the run's files).
    last = max(node.last_output for node in nodes)
    for node in nodes:
        node.last_output = last
    try:
        outputs = [node.finish(timeout=5, grace=TORCHRUN_EXIT_GRACE_S) for node in nodes]
    finally:
        for node in nodes:
            if node.proc.poll() is None:
                node.kill_all()
    for done in outputs:
        assert done.returncode == 0, done.output[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ddp"] is True
