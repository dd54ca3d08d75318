"""Bad inputs through the CLI (check-data, train with each loader), fuzzing, interrupted runs and
determinism. Every bad input must give exit status 1 or 2 and one line naming the file, no traceback."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from cityseg.checkpoint import load_checkpoint
from cityseg.cli import app
from cityseg.data.pairs import PairError, validate_pair
from cityseg.data.torch_loader import PairDataset
from cityseg.palette import cityscapes_palette
from tests.cli_process import CliProcess, run_cli
from tests.conftest import TINY_FP32 as TINY
from tests.conftest import make_pair_dataset, write_pair
from tests.test_pairs import BAD_FILES

# Tiny sizes; the loaders keep their default workers (2 processes or threads), as users run them.


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


def assert_one_line_error(output: str, path: Path, fragment: str, prefix: str = "") -> None:
    """No traceback, and exactly one line names `path`: it starts with `prefix` and says `fragment`."""
    assert "Traceback" not in output, output
    lines = [ln for ln in output.splitlines() if str(path) in ln]
    assert len(lines) == 1, output
    assert lines[0].startswith(prefix) and fragment in lines[0], output


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


LOADERS = {"torch": ["--loader", "torch"], "dali": ["--loader", "dali"], "cache": ["--loader", "cache"]}


@pytest.mark.parametrize("validate", ["validate", "skip-validate"])
@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_train_stops_with_one_line(dataset: Path, tmp_path: Path, case: str, loader: str, validate: str) -> None:
    """Found by the up-front validation, or (--skip-validate) by the loader itself when it meets the
    file: either way one line naming it; a start that failed leaves no run folder, a run that
    started says why in its error.log."""
    inject, fragment = CASES[case]
    bad = inject(dataset)
    out = tmp_path / "run"
    skip = ["--skip-validate"] if validate == "skip-validate" else []
    result = CliRunner().invoke(app, ["train", "--data", str(dataset), "--out", str(out), *LOADERS[loader], *skip,
                                      *TINY])
    assert result.exit_code == 2, result.output
    assert_one_line_error(result.output, bad, fragment, prefix="error: ")
    # Found before training (always without --skip-validate): no run folder at all. Met by a loader
    # mid-run (--skip-validate): the run folder says why.
    if out.exists():
        assert skip and (out / "config.json").is_file() and fragment in (out / "error.log").read_text()
    if not skip:
        assert not out.exists()


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
    assert_one_line_error(result.output, bad, "truncated", prefix="error: ")


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
        return
    # Accepted: then the bytes must really be a whole RGB image twice as wide as tall (Pillow decodes it).
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        assert image.mode == "RGB" and image.width == 2 * image.height


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    h=st.integers(1, 48), w=st.integers(1, 96), mode=st.sampled_from(["RGB", "L", "CMYK", "RGBA", "P"]),
    fmt=st.sampled_from(["JPEG", "PNG"]), cut=st.integers(0, 3),
)
@example(h=16, w=32, mode="RGB", fmt="JPEG", cut=0)  # whole RGB 2:1 pairs, which random draws rarely hit
@example(h=1, w=2, mode="RGB", fmt="PNG", cut=0)
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
        assert not (mode == "RGB" and w == 2 * h and cut == 0), f"a whole RGB 2:1 pair was refused: {e}"
        return
    assert mode == "RGB" and w == 2 * h and cut == 0
    photo, target = PairDataset([path], cityscapes_palette(), image_size=16, augment=None).load(0)
    assert photo.shape == (3, 16, 16) and target.shape == (16, 16) and info.height == h


# -- interrupted runs ------------------------------------------------------------------------------
# Ctrl-C and SIGTERM mid-epoch: tests/e2e/test_commands.py.

FAULTS = Path(__file__).resolve().parent / "faults"
# Where each session is SIGKILLed (tests/faults/sitecustomize.py; the whole process group, workers too):
# the first as its 3rd last.pt write opens (a checkpoint write in flight), the second at a loader worker's
# 30th train image read (mid-epoch, an epoch or more into the resumed run), the third at a worker's 5th
# val image read (inside the resumed run's second validation or a later one: how the 4 val images of a
# validation split between the workers varies, so one worker may read 3 in the first, before that
# session saved anything). Placed moments, not sleeps.
KILLS = ["main:.last.pt.:3", "worker:/train/:30", "worker:/val/:5"]


@pytest.mark.slow
@pytest.mark.timeout(900)  # a 12-epoch run, then the same run killed three times
def test_sigkill_at_placed_moments_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    """SIGKILL to the whole process (workers too) while a checkpoint is written, mid-epoch and during a
    validation, each after the run made progress: the run always resumes from a loadable checkpoint,
    best.pt is never corrupt, metrics.jsonl holds each epoch once, and the final weights are those of
    a run never interrupted."""
    dataset = make_pair_dataset(tmp_path / "data", n_train=40, n_val=4)  # 20 steps an epoch
    args = ["train", "--data", dataset, *TINY, "--epochs", "12", "--val-every", "1"]  # a checkpoint every epoch
    straight = run_cli([*args, "--out", tmp_path / "straight"], timeout=300)
    assert straight.returncode == 0, straight.output
    out = tmp_path / "run"
    last = out / "checkpoints" / "last.pt"
    steps = [0]
    command = [*args, "--out", out]
    for i, moment in enumerate(KILLS):
        mark = tmp_path / f"killed-{i}"
        env = {"PYTHONPATH": str(FAULTS), "CITYSEG_TEST_SIGNAL": f"SIGKILL:group:{moment}",
               "CITYSEG_TEST_SIGNAL_MARK": str(mark)}
        done = CliProcess(command, env=env).finish(timeout=300)
        assert mark.is_file() and done.returncode == -9, f"not killed at {moment}:\n{done.output}"
        steps.append(load_checkpoint(last)["global_step"])
        if (out / "checkpoints" / "best.pt").exists():
            load_checkpoint(out / "checkpoints" / "best.pt")
        command = ["train", "--resume", out]
    done = CliProcess(command).finish(timeout=300)
    assert done.returncode == 0, done.output
    assert steps == sorted(steps) and len(set(steps)) == len(steps), steps  # every session made progress
    epochs = [json.loads(ln)["epoch"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 13))
    a, b = (load_checkpoint(run / "checkpoints" / "last.pt")["model"] for run in (tmp_path / "straight", out))
    for key in a:
        assert torch.equal(a[key], b[key]), key
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
