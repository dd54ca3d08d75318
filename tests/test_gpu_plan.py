"""The GPU suite's plan against what it must guarantee before a lease is spent on it: the lease keeps
>= 150 s free, run 1 needs no DALI, FLOPs counted for one image and scaled equal a full-batch count,
the warm-up compiles the very shapes the engine test and the real-data run use, the mask kernel is
warmed at the run's batch and benchmarked with training's block sizes. All on a CPU, in process."""

from __future__ import annotations

import contextlib
import io
import tarfile
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import gpu_plan, mask_kernel, train_step
from cityseg.config import AugmentConfig
from cityseg.data.contract import LoaderSpec
from cityseg.distributed import DistInfo
from cityseg.palette import cityscapes_palette
from cityseg.runtime import resolve_runtime
from cityseg.training import warmup
from cityseg.training.losses import build_loss_fn
from cityseg.training.setup import build_models
from kernels import mask_to_class


@pytest.fixture(scope="module")
def gpu_steps() -> list[gpu_plan.Step]:
    _, steps, errors = gpu_plan.plan(dry=False, overrides={})
    assert not errors
    return steps


def test_the_lease_keeps_150_s_free(gpu_steps: list[gpu_plan.Step]) -> None:
    """Added up here from each step's cap, grace and packing: both runs and the lease's overhead leave
    >= 150 of the 900 s, each run fits one device command, and an over-long plan is refused."""
    runs = {r: sum(st.cap_s + st.grace_s + gpu_plan.PACK_S for st in gpu_steps if st.run == r) for r in (1, 2)}
    overhead = 30 + 30 + 30 + 2 * 15  # machine start, idle between the runs, release, transfers
    assert 900 - runs[1] - runs[2] - overhead >= 150
    assert max(runs.values()) <= 600 and gpu_plan.lease(gpu_steps)["free"] == 900 - runs[1] - runs[2] - overhead
    assert all(st.cap_s >= st.estimate_s for st in gpu_steps)
    _, _, errors = gpu_plan.plan(dry=False, overrides={"real.train_s": "120"})
    assert any("at least 150s must stay free" in e for e in errors), errors


def test_run_1_needs_no_dali_and_does_real_work(gpu_steps: list[gpu_plan.Step]) -> None:
    run1 = {st.name: st for st in gpu_steps if st.run == 1}
    assert {"warmup", "tests", "kernel", "train_step", "batch_auto"} <= run1.keys()
    assert not {"loader", "real_e2e", "dali_tests", "unpack"} & run1.keys()
    words = [w for cmd in run1["tests"].commands for w in cmd]
    for dali_test in gpu_plan.DALI_SHARD:  # named only to be deselected in run 1
        assert all(words[i - 1] == "--deselect" for i, w in enumerate(words) if w == dali_test)
    run2 = [st.name for st in gpu_steps if st.run == 2]
    assert run2[0] == "unpack" and "real_e2e" in run2  # DALI and every real pair come with run 2


def test_real_e2e_gets_time_to_write_its_summary(gpu_steps: list[gpu_plan.Step]) -> None:
    real = next(st for st in gpu_steps if st.name == "real_e2e")
    assert real.grace_s >= 15 > gpu_plan.KILL_GRACE_S
    shell = (gpu_plan.ROOT / "benchmarks" / "gpu_suite.sh").read_text()
    assert "timeout --kill-after=\"$grace\"" in shell and "trap ':' TERM" in shell


@pytest.mark.parametrize("loss", ["ce", "ce+dice"])
def test_flops_of_one_image_scaled_equal_a_full_batch_count(loss: str) -> None:
    """Reference: torch's flop counter over a real fp32 forward and backward of the whole batch on the CPU."""
    cell = train_step.Cell(width=4, depth=2, batch=3, size=32)
    cfg = train_step.product_config(cell, loss)
    model, _ = build_models(cfg.model, resolve_runtime(torch.device("cpu"), "32", compile=False), DistInfo(),
                            sync_bn=False)
    g = torch.Generator().manual_seed(0)
    image = torch.randn(3, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 19, (3, 32, 32), generator=g)
    with FlopCounterMode(display=False) as counter:
        build_loss_fn(loss, None)(model(image), target).backward()
    assert counter.get_total_flops() > 0
    assert train_step.count_flops(cell, loss) == counter.get_total_flops()


def test_the_engine_warm_up_trains_the_engine_tests_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--warm-engine` writes the engine test's data and trains its compiled config (only the output
    folder differs): the test's graph is the one in the cache."""
    import cityseg.data.synth
    import cityseg.training

    seen = {}
    monkeypatch.setattr(cityseg.data.synth, "write_dataset", lambda root, **kw: seen.update(data=kw) or root)
    monkeypatch.setattr(cityseg.training, "train",
                        lambda cfg: seen.update(cfg=cfg) or {"steps": 1, "compile": cfg.train.compile})
    assert gpu_plan.main(["--warm-engine", str(tmp_path)]) == 0
    assert seen["data"] == gpu_plan.ENGINE_DATA
    test_cfg = gpu_plan.engine_run_config(tmp_path / "data", tmp_path / "elsewhere")
    warm = seen["cfg"].to_dict()
    warm["train"]["out"] = test_cfg.train.out
    assert warm == test_cfg.to_dict() and test_cfg.train.compile
    test_source = (gpu_plan.ROOT / "tests" / "test_gpu.py").read_text()
    assert "train(engine_run_config(data, " in test_source and "write_dataset(" in test_source
    assert "**ENGINE_DATA)" in test_source


def test_the_real_data_warm_up_has_the_real_runs_shapes(gpu_steps: list[gpu_plan.Step], tmp_path: Path,
                                                        real_sample: Path) -> None:
    """Run 1 trains the real-data graph on real-0.tar: it holds every val pair (the val batches, [16, 8]
    for 40 pairs) and at least one batch of train pairs, and the warm-up passes the real run's flags."""
    parts = gpu_plan.pack_real(real_sample, tmp_path, part_mb=2.5)
    with tarfile.open(parts[0]) as tar:
        first = tar.getnames()
    with tarfile.open(parts[1]) as tar:
        assert not [n for n in tar.getnames() if n.startswith("val/")]
    assert sorted(n for n in first if n.startswith("val/")) == sorted(f"val/{p.name}" for p in
                                                                     (real_sample / "val").glob("*.jpg"))
    assert sum(n.startswith("train/") for n in first) >= gpu_plan.gpu_sizes()["batch"]
    warm = next(cmd for cmd in next(st for st in gpu_steps if st.name == "warmup").commands
                if cmd[:4] == ["$PYTHON", "-m", "cityseg", "train"])
    real = next(st for st in gpu_steps if st.name == "real_e2e").commands[0][1:]

    def flags(cmd: list[str]) -> dict[str, str]:  # shape-setting flags, and what data it trains on
        keys = ("--data", "--batch-size", "--image-size", "--width", "--depth", "--compile-mode", "--loss",
                "--upsample", "--precision")
        return {w: cmd[i + 1] for i, w in enumerate(cmd) if w in keys}

    assert flags(warm) == flags(real) and flags(real)["--data"] == "$REAL" and "--batch-size" in flags(real)
    with pytest.raises(SystemExit, match="do not fit the first"):
        gpu_plan.pack_real(real_sample, tmp_path / "small", part_mb=0.5)


def test_the_warm_up_maps_masks_at_the_runs_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Triton kernel autotunes once per size bucket (log2 of the pixels // 2): the warm-up maps the
    training batch and each val batch, so the run's first batches find their bucket tuned."""
    shapes = []
    monkeypatch.setattr(warmup, "map_colors", lambda mask, palette: shapes.append(tuple(mask.shape)))
    spec = LoaderSpec(image_size=32, batch_size=16, augment=AugmentConfig(), shuffle=True, drop_last=True)
    val_spec = LoaderSpec(image_size=32, batch_size=16, augment=None, shuffle=False, drop_last=False, target_size=48)
    model = torch.nn.Conv2d(3, 19, 1)
    optimizer = torch.optim.AdamW(model.parameters())
    rt = resolve_runtime(torch.device("cpu"), "32", compile=False)
    warmup.warm_up(lambda image, target: model(image).sum().backward(), 1, model, optimizer,
                   torch.amp.GradScaler("cpu", enabled=False), rt, spec, cityscapes_palette(), (), val_spec, [16, 8])

    def bucket(n: int, side: int) -> int:  # as kernels/mask_to_class.py computes SIZE_BUCKET
        return (n * side * side).bit_length() // 2

    warmed = {bucket(n, h) for n, h, w, c in shapes}
    assert {bucket(16, 32), bucket(16, 48), bucket(8, 48)} <= warmed
    assert (16, 32, 32, 3) in shapes and (8, 48, 48, 3) in shapes


def test_the_kernel_benchmark_times_trainings_blocks() -> None:
    """One definition: the blocks the autotuner tries, each with its warps, are the benchmark's default,
    and a pinned block launches with the same warps as its autotune candidate."""
    tuned = [(c.kwargs["BLOCK"], c.num_warps) for c in mask_to_class._AUTOTUNE_CONFIGS]
    assert tuned == list(mask_to_class.AUTOTUNE_BLOCKS)
    assert [(b, mask_to_class.block_warps(b)) for b, _ in tuned] == tuned
    assert [int(b) for b in mask_kernel.TRAINING_BLOCKS.split(",")] == [b for b, _ in tuned]
    help_text = io.StringIO()
    with contextlib.redirect_stdout(help_text), pytest.raises(SystemExit):
        mask_kernel.main(["--help"])
    assert f"(default: {mask_kernel.TRAINING_BLOCKS}, the candidates training autotunes" in " ".join(
        help_text.getvalue().replace("│", " ").split())  # the help's words, out of its panel's lines
    kernel_step = next(st for st in gpu_plan.plan(dry=False, overrides={})[1] if st.name == "kernel")
    assert "--blocks" not in kernel_step.commands[0]  # the suite times the default: training's blocks
