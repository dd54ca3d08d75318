"""`--batch-size auto`: the chooser against fake memory capacities (a linear model plus a convex
excess the model cannot see), the cache that makes it a one-off, the lr / warm-up rule, the CPU
answer, and the option's parsing as a user types it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from rich.console import Console

from cityseg.config import Config, DataConfig, TrainConfig
from cityseg.distributed import DistInfo
from cityseg.errors import OptionError
from cityseg.options import check_config, check_options
from cityseg.runtime import Runtime
from cityseg.settings import parse_batch_size
from cityseg.training import batch_size as bs
from tests.cli_process import run_cli

GiB = 2**30


def fake_gpu(fixed: float, per_image: float, convex: float = 0.0):
    """trial(batch) of a GPU whose step needs fixed + per_image * B (+ convex * B**2) bytes; records calls."""
    calls: list[int] = []

    def trial(batch: int) -> float:
        calls.append(batch)
        return fixed + per_image * batch + convex * batch**2

    return trial, calls


def test_largest_batch_under_the_share_of_a_linear_gpu() -> None:
    # 2 GiB fixed + 0.5 GiB an image, 80 GiB free: 64 GiB budget -> (64 - 2) / 0.5 = 124 -> 112
    trial, calls = fake_gpu(2 * GiB, 0.5 * GiB)
    assert bs.choose_batch(trial, 80 * GiB) == 112
    assert calls == [16, 32, 112]  # two trials fit the line, one confirms the answer


@pytest.mark.parametrize(("free_gib", "expected"), [(1, 16), (8, 16), (12, 32), (200, 256), (10_000, 256)])
def test_range_is_16_to_256(free_gib: float, expected: int) -> None:
    trial, _ = fake_gpu(1 * GiB, 0.25 * GiB)
    assert bs.choose_batch(trial, free_gib * GiB) == expected


def test_steps_down_when_memory_grows_faster_than_the_line() -> None:
    """Convex memory: the line from 16 and 32 promises more than fits; each failed trial steps down
    until one fits, and the answer is the largest that fits by the fake GPU's own count."""
    fixed, per_image, convex = 1 * GiB, 0.1 * GiB, 0.002 * GiB
    trial, calls = fake_gpu(fixed, per_image, convex)
    free = 40 * GiB
    batch = bs.choose_batch(trial, free)
    fits = [b for b in range(16, 257, 16) if fixed + per_image * b + convex * b * b <= 0.8 * free]
    assert batch == max(fits)
    assert len(calls) > 3  # the model's first guess was refused at least once


def test_out_of_memory_trial_counts_as_not_fitting() -> None:
    def trial(batch: int) -> float:
        return math.inf if batch > 48 else 1 * GiB + 0.1 * GiB * batch
    assert bs.choose_batch(trial, 100 * GiB) == 48


def test_lr_and_warmup_follow_the_batch() -> None:
    assert bs.scaled_schedule(3e-3, 100, 16) == (3e-3, 100)
    lr, warmup = bs.scaled_schedule(3e-3, 100, 64)
    assert lr == pytest.approx(6e-3) and warmup == 25  # sqrt(4) = 2; the same images in warm-up
    assert bs.scaled_schedule(3e-3, 0, 128)[1] == 0
    assert bs.scaled_schedule(3e-3, 1, 256)[1] == 1


def test_on_a_cpu_auto_is_the_old_default_and_a_number_is_kept() -> None:
    rt = Runtime(torch.device("cpu"), "32", compile=False)
    quiet = Console(quiet=True)
    cfg = bs.resolve_batch_size(Config(), rt, DistInfo(), quiet)
    assert cfg.data.batch_size == 16 and cfg.train == Config().train
    explicit = Config(data=DataConfig(batch_size=24))
    assert bs.resolve_batch_size(explicit, rt, DistInfo(), quiet) == explicit
    assert Config().data.batch_size == "auto"


def test_gpu_choice_is_measured_once_then_read_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """A fake 'H200' with 100 GiB free: the first run measures (and says so), writes batch-size.json
    in $CITYSEG_CACHE, scales lr and warm-up; the second run reads the file and runs no trial; another
    image size is another key."""
    monkeypatch.setenv("CITYSEG_CACHE", str(tmp_path))
    trials: list[int] = []

    def fake_trial(cfg: Config, rt: Runtime):
        def trial(batch: int) -> float:
            trials.append(batch)
            return 4 * GiB + 0.55 * GiB * batch * (cfg.data.image_size / 256) ** 2
        return trial

    monkeypatch.setattr(bs, "cuda_trial", fake_trial)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * GiB, 140 * GiB))
    rt = Runtime(torch.device("cuda"), "bf16-mixed", compile=True)
    cfg = Config(train=TrainConfig(lr=3e-3, warmup_steps=100))
    console = Console(record=True, width=200)
    first = bs.resolve_batch_size(cfg, rt, DistInfo(), console)
    assert first.data.batch_size == 128  # 80 GiB budget: 4 + 0.55 * 128 = 74.4 fits, 144 would need 83.2
    assert first.train.lr == pytest.approx(3e-3 * math.sqrt(128 / 16))
    assert first.train.warmup_steps == round(100 * 16 / 128)
    assert "batch size auto: 128" in console.export_text()
    assert (tmp_path / "batch-size.json").is_file()
    measured = len(trials)
    assert bs.resolve_batch_size(cfg, rt, DistInfo(), console).data.batch_size == 128
    assert len(trials) == measured  # from the cache
    smaller_images = Config(data=DataConfig(image_size=128))
    assert bs.resolve_batch_size(smaller_images, rt, DistInfo(), console).data.batch_size == 256
    assert len(trials) > measured


def test_option_parsing() -> None:
    assert parse_batch_size("auto") == "auto" and parse_batch_size("32") == 32
    with pytest.raises(OptionError, match="--batch-size big: expected a whole number from 1 to 65536 or auto"):
        check_options({"batch_size": parse_batch_size("big")})
    check_config(Config(data=DataConfig(batch_size="auto")))
    with pytest.raises(OptionError, match="data.batch_size"):
        check_config(Config(data=DataConfig(batch_size="big")))


def test_cli_says_what_is_wrong_in_one_line() -> None:
    done = run_cli(["train", "--batch-size", "lots", "--print-config"], timeout=60)
    assert done.returncode == 2, done.output
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "--batch-size lots" in errors[0] and "or auto" in errors[0], done.output
    assert "Traceback" not in done.output
    done = run_cli(["train", "--batch-size", "auto", "--print-config"], timeout=60)
    assert done.returncode == 0, done.output
    assert "auto" in done.stdout
