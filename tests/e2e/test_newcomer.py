"""What a newcomer meets, through the installed command (and the library in a fresh interpreter):
a printed config that is a config file, `--set` for keys without a flag, no litter from a failed
start, an interrupted run that keeps its pictures, a quiet library, and `--init-from` at the
checkpoint's image size."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from cityseg.config import flatten
from tests.cli_process import CliProcess, run_cli
from tests.conftest import TINY as TINY_ALL

# The tiny flags without --image-size: these runs keep the size a newcomer gets.
FAULTS = Path(__file__).resolve().parents[1] / "faults"
TINY = [flag for flag in TINY_ALL if flag not in ("--image-size", "32")]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("newcomer") / "data"
    done = run_cli(["synth", "--out", out, "--train", "8", "--val", "4", "--size", "64"])
    assert done.returncode == 0, done.output
    return out


def printed(done) -> dict:
    assert done.returncode == 0, done.output
    return flatten(yaml.safe_load(done.stdout))


@pytest.mark.parametrize("args", [[], ["--data", "DATA", "--smoke", "--lr", "0.01", "--scale", "0.5,2"]],
                         ids=["synthetic", "data"])
def test_print_config_is_a_config_file_that_reads_back_the_same(data: Path, tmp_path: Path, args: list) -> None:
    args = [str(data) if a == "DATA" else a for a in args]
    first = run_cli(["train", *args, "--set", "train.min_lr_ratio=0.05", "--print-config"], cwd=tmp_path)
    values = printed(first)
    assert values["train.min_lr_ratio"] == 0.05
    assert "train.out" not in values and "train.resume" not in values
    if "--data" in args:  # keys that do not apply are left out
        assert not [k for k in values if k.startswith("data.synth_")]
        assert values["data.augment.scale"] == [0.5, 2.0] and values["train.lr"] == 0.01
    path = tmp_path / "run.yaml"
    path.write_text(first.stdout)
    again = run_cli(["train", "--config", path, "--print-config"], cwd=tmp_path)
    assert again.returncode == 0, again.output
    assert again.stdout == first.stdout
    assert not list(tmp_path.glob("runs"))  # printing the config starts no run


@pytest.mark.parametrize("item,fragment", [
    ("train.min_lr_ratio=2", "train.min_lr_ratio 2.0: expected a number from 0 to 1"),
    ("train.nope=1", "--set: unknown config key 'train.nope'"),
    ("train.min_lr_ratio", "--set train.min_lr_ratio: expected KEY=VALUE"),
    ("model.width=wide", "model.width = 'wide': expected int"),
])
def test_set_is_checked_like_a_config_file(item: str, fragment: str) -> None:
    done = run_cli(["train", "--set", item, "--print-config"])
    assert done.returncode == 2 and "Traceback" not in done.output, done.output
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], done.stderr


def test_a_failed_start_leaves_no_run_folder(data: Path, tmp_path: Path) -> None:
    """A typo in --data, or a bad file found before training, adds no runs/<date-time> (nor an
    --out folder) and prints the error, not the config."""
    done = run_cli(["train", "--data", tmp_path / "data" / "[x]", *TINY], cwd=tmp_path)
    assert done.returncode == 2 and "[x]" in done.stderr, done.output
    assert not (tmp_path / "runs").exists(), list(tmp_path.rglob("*"))
    assert "data.image_size" not in done.stdout and "batch_size" not in done.stdout
    (data / "train" / "9.jpg").write_bytes(b"not a jpeg")
    try:
        done = run_cli(["train", "--data", data, "--out", tmp_path / "new" / "run", *TINY], cwd=tmp_path)
    finally:
        (data / "train" / "9.jpg").unlink()
    assert done.returncode == 2 and "9.jpg" in done.stderr, done.output
    assert not (tmp_path / "new").exists() and not (tmp_path / "runs").exists()


def test_a_sigtermed_run_keeps_its_summary_and_curves(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = CliProcess(["train", "--data", data, "--out", out, "--epochs", "50", "--image-size", "64",
                       "--log-every", "1", *TINY])
    proc.wait_for_output("epoch 1: mean loss", timeout=240)
    proc.wait_for_output("epoch 2/50 step 2/4", timeout=120)
    proc.signal(signal.SIGTERM)
    done = proc.finish(timeout=180)
    assert done.returncode == 143, done.output
    assert "resume with: cityseg-fast train --resume" in done.stderr, done.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] is False and summary["epochs"] >= 1
    assert summary["final"]["epoch"] == summary["epochs"]
    assert (out / "curves.png").stat().st_size > 0
    # samples.png reads the val loader, which a signal to the group has ended: the run that completes draws it
    assert not (out / "samples.png").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out), size_guidance={"images": 0})
    events.Reload()
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e.step for e in events.Images("samples")] == [r["step"] for r in records]  # one per epoch


LIBRARY_RUN = textwrap.dedent("""
    import logging, sys
    from cityseg import Config, DataConfig, ModelConfig, TrainConfig, evaluate, train
    if sys.argv[2] == "logging":
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    cfg = Config(data=DataConfig(data_dir=sys.argv[1], image_size=32, batch_size=2),
                 model=ModelConfig(width=4, depth=2), train=TrainConfig(epochs=1, device="cpu", compile=False))
    summary = train(cfg, verbose=sys.argv[2] == "verbose")
    evaluate(summary["run_dir"] + "/checkpoints/best.pt", data=sys.argv[1], device="cpu",
             verbose=sys.argv[2] == "verbose")
""")


@pytest.mark.parametrize("mode", ["quiet", "logging", "verbose"])
def test_the_library_is_quiet_unless_asked(data: Path, tmp_path: Path, mode: str) -> None:
    proc = subprocess.run([sys.executable, "-c", LIBRARY_RUN, str(data), mode], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "CITYSEG_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    if mode == "quiet":
        assert proc.stdout == "" and proc.stderr == "", proc.stdout + proc.stderr
    elif mode == "logging":
        assert proc.stdout == ""
        assert "cityseg.training: epoch 1: mean loss" in proc.stderr, proc.stderr
    else:
        assert "epoch 1: mean loss" in proc.stdout and "val: per-class IoU" in proc.stdout, proc.stdout


def test_init_from_fine_tunes_at_the_checkpoints_image_size(data: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    done = run_cli(["train", "--data", data, "--out", base, "--max-steps", "1", "--image-size", "32", *TINY])
    assert done.returncode == 0, done.output
    ckpt = base / "checkpoints" / "last.pt"
    shown = run_cli(["train", "--data", data, "--init-from", ckpt, "--print-config"])
    assert printed(shown)["data.image_size"] == 32  # not the real-data default of 256
    assert "checkpoint's image size, 32 px" in shown.stderr
    resized = run_cli(["train", "--data", data, "--init-from", ckpt, "--image-size", "64", "--print-config"])
    assert printed(resized)["data.image_size"] == 64 and "image size" not in resized.stderr


def test_a_double_ctrl_c_still_names_the_run_to_resume(data: Path, tmp_path: Path) -> None:
    """The second Ctrl-C stops at once, while the first one is being honoured, and the run is still
    named for --resume (last.pt is there). Both are placed (tests/faults/sitecustomize.py), not timed:
    the first as a loader worker reads its 6th train image (epoch 2), the second as the stopping run
    writes summary.json, which it does only once the first has been handled."""
    out, mark = tmp_path / "run", tmp_path / "signalled"
    env = {"PYTHONPATH": str(FAULTS), "CITYSEG_TEST_SIGNAL": "SIGINT:parent:worker:/train/:6+main:summary.json:1",
           "CITYSEG_TEST_SIGNAL_MARK": str(mark)}
    proc = CliProcess(["train", "--data", data, "--out", out, "--epochs", "3", "--val-every", "1", "--log-every", "1",
                       *TINY, "--image-size", "32", "--workers", "2"], env=env)
    done = proc.finish(timeout=300)
    assert mark.is_file() and Path(f"{mark}.1").is_file(), f"the two signals were not both sent:\n{done.output}"
    assert done.returncode == 130, done.output
    assert "Traceback" not in done.output, done.output
    assert f"cityseg-fast train --resume {out}" in done.stderr, done.output
    assert (out / "checkpoints" / "last.pt").is_file()
    # The second one did stop at once: the summary it interrupted was not written (the first alone writes it).
    assert not (out / "summary.json").exists()


def test_profile_on_a_cpu_prints_no_cuda_error(data: Path, tmp_path: Path) -> None:
    done = run_cli(["profile", "--steps", "1", "--out", tmp_path / "prof", "--data", data, "--image-size", "32",
                    *TINY], timeout=300)
    assert done.returncode == 0, done.output
    assert "gpuGetDeviceCount" not in done.output and "ERROR:" not in done.output, done.stderr
