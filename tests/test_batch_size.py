"""`--batch-size auto`: the rule against fake GPUs (throughput that saturates, memory that runs out),
the data's cap, the cache that makes a GPU's trial a one-off, the lr / warm-up rule, the CPU answer
resolved before anything is built (and printed by --print-config as config.json records it), and the
option's parsing as a user types it."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console

from cityseg import batch_rule as rule
from cityseg.config import AUTO, Config, DataConfig, TrainConfig
from cityseg.distributed import DistInfo
from cityseg.errors import OptionError
from cityseg.options import check_config, check_options
from cityseg.resolve import resolve_run
from cityseg.runtime import Runtime
from cityseg.settings import parse_batch_size
from cityseg.training import batch_size as bs
from tests.cli_process import assert_one_line, run_cli
from tests.conftest import make_pair_dataset

GiB = 2**30


def fake_gpu(saturates_at: float, peak: float, fixed: float, per_image: float, oom_above: int | None = None):
    """trial(batch) of a GPU whose images/s grows as peak * B / (B + saturates_at) (busy from about
    `saturates_at` on) and whose step reserves fixed + per_image * B bytes; records the batches tried."""
    calls: list[int] = []

    def trial(batch: int) -> rule.Trial:
        calls.append(batch)
        if oom_above is not None and batch > oom_above:
            return rule.Trial(batch, 0.0, math.inf)
        return rule.Trial(batch, peak * batch / (batch + saturates_at), fixed + per_image * batch)

    return trial, calls


def expected_by_hand(saturates_at: float, peak: float, fixed: float, per_image: float, upper: int,
                     budget: float, tolerance: float = 0.05) -> int:
    """The rule, computed from the curves directly: the smallest fitting batch within tolerance of the best."""
    fits = [b for b in rule.trial_batches(upper) if fixed + per_image * b <= budget]
    speed = {b: peak * b / (b + saturates_at) for b in fits}
    return min(b for b in fits if speed[b] >= (1 - tolerance) * max(speed.values()))


def test_smallest_batch_within_five_percent_of_the_best_throughput() -> None:
    # Saturating at ~8 images: 16 -> 67 % of peak, 32 -> 80 %, 64 -> 89 %, 128 -> 94 %, 256 -> 97 %:
    # 128 is within 5 % of 256's 97 % (94.1 >= 92.1), 64 is not.
    trial, calls = fake_gpu(8, 10_000, 2 * GiB, 0.1 * GiB)
    choice = rule.choose_by_throughput(trial, upper=10_000, free_bytes=100 * GiB)
    assert choice.batch == 128 == expected_by_hand(8, 10_000, 2 * GiB, 0.1 * GiB, 10_000, 80 * GiB)
    assert calls == [16, 32, 64, 128, 256] and len(choice.trials) == 5
    assert "within 5%" in choice.reason


def test_a_gpu_busy_from_small_batches_keeps_the_reference_batch() -> None:
    trial, _ = fake_gpu(0.1, 10_000, 2 * GiB, 0.1 * GiB)  # full speed from batch 16: more batch buys nothing
    assert rule.choose_by_throughput(trial, upper=10_000, free_bytes=100 * GiB).batch == 16


def test_memory_share_caps_the_batch_and_stops_the_trials() -> None:
    # 0.5 GiB an image, 40 GiB free: 32 GiB budget -> 64 (34 GiB) does not fit; 128 is never tried.
    trial, calls = fake_gpu(1000, 10_000, 2 * GiB, 0.5 * GiB)
    choice = rule.choose_by_throughput(trial, upper=10_000, free_bytes=40 * GiB)
    assert choice.batch == 32 and calls == [16, 32, 64]
    assert "batch 64 needs more than 80%" in choice.reason


def test_out_of_memory_trial_counts_as_not_fitting() -> None:
    trial, calls = fake_gpu(1000, 10_000, 1 * GiB, 0.01 * GiB, oom_above=48)
    choice = rule.choose_by_throughput(trial, upper=10_000, free_bytes=100 * GiB)
    assert choice.batch == 32 and calls == [16, 32, 64]
    assert "64: out of memory" in choice.summary()


def test_nothing_fits_gives_the_smallest_candidate() -> None:
    trial, _ = fake_gpu(8, 10_000, 200 * GiB, 0.1 * GiB)
    assert rule.choose_by_throughput(trial, upper=10_000, free_bytes=100 * GiB).batch == 16


@pytest.mark.parametrize(("files", "ranks", "cap"), [
    (2975, 1, 59),  # the full Kaggle train split: >= 50 steps an epoch
    (2975, 4, 16),  # 743 a rank: 14 by the steps rule, but never below the reference batch
    (100_000, 1, 2000),
    (160, 1, 16),
    (10, 1, 10),  # never more than the files
    (10, 4, 2),
])
def test_the_data_caps_the_batch(files: int, ranks: int, cap: int) -> None:
    assert rule.data_cap(files, ranks) == cap


def test_trials_stop_at_the_data_cap() -> None:
    trial, calls = fake_gpu(1000, 10_000, 1 * GiB, 0.01 * GiB)  # memory and speed would favour 256
    choice = rule.choose_by_throughput(trial, upper=rule.data_cap(2975, 1), free_bytes=100 * GiB)
    assert calls == [16, 32] and choice.batch == 32 and "capped at 59 by the data" in choice.reason
    tiny, calls = fake_gpu(1000, 10_000, 1 * GiB, 0.01 * GiB)
    assert rule.choose_by_throughput(tiny, upper=10, free_bytes=100 * GiB).batch == 10 and calls == [10]


def test_cpu_answer_is_the_reference_batch_or_the_files() -> None:
    assert rule.cpu_choice(2975, 1).batch == 16
    assert rule.cpu_choice(10, 1).batch == 10
    assert rule.cpu_choice(10, 2).batch == 5


def test_lr_and_warmup_follow_the_batch() -> None:
    assert rule.scaled_schedule(3e-3, 100, 16) == (3e-3, 100)
    lr, warmup = rule.scaled_schedule(3e-3, 100, 64)
    assert lr == pytest.approx(6e-3) and warmup == 25  # sqrt(4) = 2; the same images in warm-up
    assert rule.scaled_schedule(3e-3, 0, 128)[1] == 0
    assert rule.scaled_schedule(3e-3, 1, 256)[1] == 1
    cfg = rule.apply_choice(Config(), rule.BatchChoice(10, "files", 10))
    assert cfg.data.batch_size == 10 and cfg.train.lr == pytest.approx(3e-3 * math.sqrt(10 / 16))
    assert cfg.train.warmup_steps == 160


def test_record_round_trips_through_json() -> None:
    trial, _ = fake_gpu(1000, 10_000, 1 * GiB, 0.01 * GiB, oom_above=48)
    choice = rule.choose_by_throughput(trial, upper=10_000, free_bytes=100 * GiB)
    assert rule.BatchChoice.from_record(json.loads(json.dumps(choice.to_record()))) == choice


def test_resolved_on_a_cpu_before_anything_is_built(tmp_path: Path) -> None:
    """A 10-pair folder: auto is 10 (the files allow no batch of 16), lr and warm-up scaled, and the
    record says why; an explicit number is kept with its lr."""
    data = make_pair_dataset(tmp_path / "d", n_train=10, n_val=2)
    run = resolve_run({"data.data_dir": str(data), "train.device": "cpu"})
    assert run.config.data.batch_size == 10 and run.config.train.lr == pytest.approx(3e-3 * math.sqrt(10 / 16))
    assert run.derived["batch_size"]["batch_size"] == 10 and "10 training files" in run.derived["batch_size"]["reason"]
    explicit = resolve_run({"data.data_dir": str(data), "train.device": "cpu", "data.batch_size": 4})
    assert explicit.config.data.batch_size == 4 and explicit.config.train.lr == 3e-3 and explicit.derived == {}


def test_gpu_choice_is_measured_once_then_read_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """A fake 'H200' with 100 GiB free: the first run measures (and says so), writes batch-size.json in
    $CITYSEG_CACHE; then resolve_run finds the answer there (so --print-config shows the number) and
    the run measures nothing; another image size or an EMA copy is another key."""
    monkeypatch.setenv("CITYSEG_CACHE", str(tmp_path))
    trials: list[tuple[int, int]] = []

    def fake_trial(cfg: Config, rt: Runtime, world_size: int):
        def trial(batch: int) -> rule.Trial:
            trials.append((batch, cfg.data.image_size))
            return rule.Trial(batch, 10_000 * batch / (batch + 8), 4 * GiB + 0.55 * GiB * batch)
        return trial

    monkeypatch.setattr(bs, "cuda_trial", fake_trial)
    monkeypatch.setattr(bs, "fork_rng", lambda devices: contextlib.nullcontext())  # no CUDA RNG to fork here
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * GiB, 140 * GiB))
    rt = Runtime(torch.device("cuda"), "bf16-mixed", compile=True)
    cfg = Config(train=TrainConfig(lr=3e-3, warmup_steps=100))
    console = Console(record=True, width=200)
    first, derived = bs.finish_auto_batch(cfg, rt, DistInfo(), 100_000, console)
    # 80 GiB: 128 (74.4 GiB) fits, 256 does not; 128 is within 5 % of the best that fits (itself)
    assert first.data.batch_size == 128 and derived["batch_size"]["batch_size"] == 128
    assert first.train.lr == pytest.approx(3e-3 * math.sqrt(128 / 16))
    assert first.train.warmup_steps == round(100 * 16 / 128)
    assert "batch size auto: timing compiled trial steps" in console.export_text()
    assert (tmp_path / "batch-size.json").is_file()
    measured = len(trials)
    assert bs.finish_auto_batch(cfg, rt, DistInfo(), 100_000, console)[0].data.batch_size == 128
    assert len(trials) == measured  # from the cache
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("cityseg.data.loaders.train_file_count", lambda cfg: 100_000)
    resolved = resolve_run({"train.lr": 3e-3, "train.device": "cuda"})
    assert resolved.config.data.batch_size == 128 and len(trials) == measured  # known before anything is built
    with_ema = resolve_run({"train.device": "cuda", "train.ema": 0.999})
    assert with_ema.config.data.batch_size == AUTO and "trial steps" in with_ema.derived["batch_size"]["reason"]
    bs.finish_auto_batch(Config(data=DataConfig(image_size=128)), rt, DistInfo(), 100_000, console)
    assert (256, 128) in trials  # a new key: measured at its own size


def test_option_parsing() -> None:
    assert parse_batch_size("auto") == "auto" and parse_batch_size("32") == 32
    with pytest.raises(OptionError, match="--batch-size big: expected a whole number from 1 to 65536 or auto"):
        check_options({"batch_size": parse_batch_size("big")})
    check_config(Config(data=DataConfig(batch_size="auto")))
    with pytest.raises(OptionError, match="data.batch_size"):
        check_config(Config(data=DataConfig(batch_size="big")))


def test_cli_says_what_is_wrong_in_one_line() -> None:
    done = run_cli(["train", "--batch-size", "lots", "--print-config"], timeout=60)
    assert_one_line(done, "--batch-size lots", "or auto")


def test_print_config_shows_what_config_json_records_and_a_ten_pair_folder_trains(tmp_path: Path) -> None:
    """The values the run derives (auto's batch, lr and warm-up scaled to it, the class count from the
    palette) are the same in --print-config and in the run's config.json; the run uses them."""
    data = make_pair_dataset(tmp_path / "d", n_train=10, n_val=2)
    args = ["train", "--data", data, "--device", "cpu", "--image-size", "32", "--width", "8", "--depth", "2",
            "--epochs", "1", "--no-compile", "--batch-size", "auto"]
    printed = run_cli([*args, "--print-config"], timeout=60)
    assert printed.returncode == 0, printed.output
    shown = yaml.safe_load(printed.stdout)
    done = run_cli([*args, "--out", tmp_path / "run"], timeout=240)
    assert done.returncode == 0, done.output
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    for section, key in (("data", "batch_size"), ("train", "lr"), ("train", "warmup_steps"), ("model", "num_classes")):
        assert shown[section][key] == saved[section][key], (section, key)
    assert shown["resolved"] == saved["resolved"]
    assert saved["data"]["batch_size"] == 10 and saved["train"]["lr"] == pytest.approx(3e-3 * math.sqrt(10 / 16))
    assert "batch size auto: 10 per process (10 training files allow no batch of 16)" in done.stdout


def test_a_class_count_the_palette_would_replace_is_one_line() -> None:
    done = run_cli(["train", "--set", "model.num_classes=5", "--print-config"], timeout=60)
    assert_one_line(done, "model.num_classes=5", "19 classes")
    same = run_cli(["train", "--set", "model.num_classes=19", "--print-config"], timeout=60)
    assert same.returncode == 0, same.output
