"""Bad inputs through the CLI (check-data, train with each loader), fuzzing, interrupted runs and
determinism. Every bad input must give exit status 1 or 2 and one line naming the file, no traceback."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from cityseg.checkpoint import load_checkpoint
from cityseg.cli import app
from cityseg.data.pairs import PairError, validate_pair
from cityseg.data.torch_loader import PairDataset
from cityseg.palette import cityscapes_palette
from tests.conftest import ROOT, make_pair_dataset, write_pair
from tests.test_pairs import BAD_FILES

TINY = ["--device", "cpu", "--no-compile", "--no-amp", "--image-size", "32", "--width", "4", "--depth", "2",
        "--batch-size", "2", "--workers", "0"]


def inject_file(name: str, content: bytes) -> Callable[[Path], Path]:
    def inject(root: Path) -> Path:
        path = root / "train" / name
        path.write_bytes(content)
        return path

    return inject


def inject_dir(root: Path) -> Path:
    (root / "train" / "x.jpg").mkdir()
    return root / "train" / "x.jpg"


def inject_broken_link(root: Path) -> Path:
    (root / "train" / "link.jpg").symlink_to(root / "nowhere.jpg")
    return root / "train" / "link.jpg"


def inject_far_colours(root: Path) -> Path:
    rng = np.random.default_rng(0)
    weird = np.zeros((32, 32, 3), np.uint8) + np.array([40, 200, 90], np.uint8)  # no Cityscapes colour nearby
    return write_pair(root / "train" / "weird.jpg", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), weird)


def empty_split(root: Path) -> Path:
    for f in (root / "val").iterdir():
        f.unlink()
    return root / "val"


def missing_split(root: Path) -> Path:
    for f in (root / "val").iterdir():
        f.unlink()
    (root / "val").rmdir()
    return root / "val"


CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    **{case: (inject_file(name, content), fragment) for case, (name, content, fragment) in BAD_FILES.items()},
    "directory named x.jpg": (inject_dir, "is a directory"),
    "broken symlink": (inject_broken_link, "broken symbolic link"),
    "mask far from every palette colour": (inject_far_colours, "do not match the palette"),
    "empty split": (empty_split, "empty split"),
    "missing split": (missing_split, "missing split folder"),
}


def assert_one_line_error(output: str, path: Path, fragment: str) -> None:
    assert "Traceback" not in output, output
    lines = [ln for ln in output.splitlines() if str(path) in ln]
    assert lines, output
    assert any(fragment in ln for ln in lines), output


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_pair_dataset(tmp_path / "data", n_train=4, n_val=2)


@pytest.mark.parametrize("case", sorted(CASES))
def test_check_data_lists_the_bad_file(dataset: Path, case: str) -> None:
    inject, fragment = CASES[case]
    bad = inject(dataset)
    result = CliRunner().invoke(app, ["check-data", str(dataset)])
    assert result.exit_code == 1, result.output
    assert_one_line_error(result.output, bad, fragment)


LOADERS = {"torch": ["--loader", "torch"], "dali": ["--loader", "dali"], "cache": ["--cache", "device"]}


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_train_stops_before_training_with_one_line(dataset: Path, tmp_path: Path, case: str, loader: str) -> None:
    inject, fragment = CASES[case]
    bad = inject(dataset)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--data", str(dataset), "--out", str(out), *LOADERS[loader], *TINY])
    assert result.exit_code == 2, result.output
    assert_one_line_error(result.output, bad, fragment)
    assert [p.name for p in out.iterdir()] == ["error.log"]
    assert fragment in (out / "error.log").read_text()


def test_skip_bad_trains_on_the_rest_and_says_how_many(dataset: Path, tmp_path: Path) -> None:
    inject_file("a.jpg", b"")(dataset)
    inject_file("b.jpg", b"garbage" * 50)(dataset)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--data", str(dataset), "--out", str(out), "--skip-bad",
                                      "--epochs", "1", *TINY])
    assert result.exit_code == 0, result.output
    assert "skipped 2 bad train file(s)" in result.output
    assert (out / "summary.json").is_file()


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_corrupt_jpeg_met_mid_epoch_without_validation(dataset: Path, tmp_path: Path, loader: str) -> None:
    """--skip-validate: the loader itself meets the truncated file and still reports one line."""
    # Same size as the good pairs so only the data is bad: cut a real 64x32 pair short.
    good = (dataset / "train" / "1.jpg").read_bytes()
    bad = dataset / "train" / "0.jpg"
    bad.write_bytes(good[: len(good) // 2])
    args = ["train", "--data", str(dataset), "--out", str(tmp_path / "run"), *LOADERS[loader],
            "--skip-validate", "--epochs", "1", *TINY]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert_one_line_error(result.output, bad, "truncated")


# -- fuzzing ---------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=0, max_size=3000))
def test_fuzz_random_bytes_give_clean_errors(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzz.jpg"
    path.write_bytes(data)
    try:
        validate_pair(path)
    except PairError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    h=st.integers(1, 48), w=st.integers(1, 96), mode=st.sampled_from(["RGB", "L", "CMYK", "RGBA", "P"]),
    fmt=st.sampled_from(["JPEG", "PNG"]), cut=st.integers(0, 3),
)
def test_fuzz_image_shapes_validator_and_loader_agree(tmp_path: Path, h: int, w: int, mode: str, fmt: str,
                                                      cut: int) -> None:
    """Random shapes, modes and truncations: the validator accepts exactly the RGB 2:1 pairs, and
    the loader then produces the contract shapes; everything else is a clean PairError."""
    if (fmt == "JPEG" and mode in ("RGBA", "P")) or (fmt == "PNG" and mode == "CMYK"):
        return  # combinations Pillow cannot write
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(h * 97 + w).integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(
        mode).save(buf, fmt)
    data = buf.getvalue()
    data = data[: len(data) * (4 - cut) // 4] if cut else data
    path = tmp_path / f"1.{'png' if fmt == 'PNG' else 'jpg'}"
    path.write_bytes(data)
    try:
        info = validate_pair(path)
    except PairError as e:
        assert "\n" not in str(e)
        return
    assert mode == "RGB" and w == 2 * h and cut == 0
    photo, target = PairDataset([path], cityscapes_palette(), image_size=16, augment=None).load(0)
    assert photo.shape == (3, 16, 16) and target.shape == (16, 16) and info.height == h


# -- interrupted runs ------------------------------------------------------------------------------

def train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cityseg", "train", "--data", str(data), "--out", str(out), *TINY, *extra]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t < timeout, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_last_and_exits(dataset: Path, tmp_path: Path, sig: int, code: int) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(dataset, out, "--epochs", "1000"), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(out / "config.json", proc)
    time.sleep(1.0)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    assert f"--resume {out}" in stderr
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["global_step"] > 0


def test_sigkill_at_random_moments_then_resume_finishes(dataset: Path, tmp_path: Path) -> None:
    """Killed with SIGKILL (also while checkpoints are written, which happens every epoch here),
    the run always resumes from a loadable checkpoint and finishes; best.pt is never corrupt."""
    out = tmp_path / "run"
    epochs = ["--epochs", "30"]
    rng = random.Random(0)
    proc = subprocess.Popen(train_cmd(dataset, out, *epochs), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for(out / "checkpoints" / "last.pt", proc)
    for attempt in range(3):
        time.sleep(rng.uniform(0.0, 1.5))
        proc.kill()
        proc.wait()
        load_checkpoint(out / "checkpoints" / "last.pt")
        if (out / "checkpoints" / "best.pt").exists():
            load_checkpoint(out / "checkpoints" / "best.pt")
        resume = [sys.executable, "-m", "cityseg", "train", "--resume", str(out)]
        proc = subprocess.Popen(resume, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if attempt < 2:
            time.sleep(3.0)  # let it get past start-up and into training before the next kill
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["epoch"] == 30
    load_checkpoint(out / "checkpoints" / "best.pt")


def test_same_seed_same_metrics(dataset: Path, tmp_path: Path) -> None:
    records = []
    for name in ("a", "b"):
        result = CliRunner().invoke(app, ["train", "--data", str(dataset), "--out", str(tmp_path / name),
                                          "--epochs", "2", "--rotate", "10", "--jitter", "0.2", *TINY])
        assert result.exit_code == 0, result.output
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        records.append([json.loads(ln) for ln in lines])
    keys = ("loss", "val_loss", "pixel_acc", "miou", "per_class_iou", "lr")
    assert [[r[k] for k in keys] for r in records[0]] == [[r[k] for k in keys] for r in records[1]]


def test_unreadable_file_is_reported(dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = dataset / "train" / "2.jpg"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if Path(p) == bad else real_access(p, m))
    result = CliRunner().invoke(app, ["check-data", str(dataset)])
    assert result.exit_code == 1
    assert_one_line_error(result.output, bad, "permission denied")
