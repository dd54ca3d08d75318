"""The training step (cityseg/training/step.py): one code path for the loop and the benchmark, no
host read-back inside a step, and compiled (CPU inductor) it trains with no recompile after warm-up,
the learning rate live in a compiled optimiser."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks import train_step as bench
from cityseg.config import AugmentConfig, Config, DataConfig, ModelConfig, TrainConfig
from cityseg.distributed import DistInfo
from cityseg.runtime import Runtime, resolve_runtime
from cityseg.training import setup, train
from cityseg.training.losses import DiceCELoss, build_loss_fn
from cityseg.training.schedule import ProgressLR
from cityseg.training.step import TrainStep, step_compile_mode
from tests.conftest import make_pair_dataset

TINY = ModelConfig(width=4, depth=2, upsample="bilinear")


def tiny_batch(seed: int = 0, batch: int = 2, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 19, (batch, size, size), generator=g)
    target[:, :4] = 255
    return image, target


def tiny_step(rt: Runtime, compile_optimizer: bool = False, optimizer: type | None = None) -> TrainStep:
    torch.manual_seed(0)
    model, step_model = setup.build_models(TINY, rt, DistInfo(), sync_bn=False)
    opt = (optimizer(model.parameters(), lr=1e-2, momentum=0.9) if optimizer else
           setup.build_optimizer(model, TrainConfig(lr=1e-2), rt.device, compiled=compile_optimizer))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return TrainStep(step_model, model, build_loss_fn("ce+dice", None), opt, scaler, rt, 1.0,
                     compile_optimizer=compile_optimizer)


def test_loop_and_benchmark_call_the_same_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Training and benchmarks/train_step.py build the step from the same functions and call
    TrainStep.__call__; the benchmark's is the product recipe (bilinear, CE + Dice, channels-last,
    the precision policy)."""
    assert bench.TrainStep is TrainStep
    assert (bench.build_models, bench.build_optimizer, bench.build_scheduler) == (
        setup.build_models, setup.build_optimizer, setup.build_scheduler)
    calls: list[str] = []
    original = TrainStep.__call__

    def spy(self: TrainStep, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls.append(type(self.loss_fn).__name__)
        return original(self, image, target)

    monkeypatch.setattr(TrainStep, "__call__", spy)
    data = make_pair_dataset(tmp_path / "data", n_train=4, n_val=2)
    train(Config(data=DataConfig(data_dir=str(data), image_size=32, batch_size=2, workers=0,
                                 augment=AugmentConfig(hflip=0)),
                 model=ModelConfig(width=4, depth=2),
                 train=TrainConfig(epochs=1, device="cpu", precision="32", compile=False, out=str(tmp_path / "run"))))
    assert calls == ["CrossEntropyLoss"] * (1 + 2)  # the warm-up's one eager call, then 4 pairs at batch 2
    calls.clear()
    cell = bench.Cell(width=4, depth=2, batch=2, size=32)
    step, _ = bench.build_step(bench.product_config(cell, "ce+dice"), torch.device("cpu"), "off", "inductor")
    step(*bench.random_batch(cell, step, 0))
    assert calls == ["DiceCELoss"]
    assert step.model.upsample == "bilinear" and step.grad_clip == 1.0
    assert step.model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert step.rt.precision == resolve_runtime("cpu").precision


def test_default_compile_mode() -> None:
    cuda = Runtime(torch.device("cuda"), "bf16-mixed", compile=True)
    assert step_compile_mode(cuda, distributed=False) == "reduce-overhead"  # CUDA graphs on one GPU
    assert step_compile_mode(cuda, distributed=True) is None  # DDP's all-reduce hooks: no CUDA graphs
    assert step_compile_mode(Runtime(torch.device("cpu"), "32", compile=True), distributed=False) is None
    overridden = Runtime(torch.device("cuda"), "bf16-mixed", compile=True, compile_mode="max-autotune-no-cudagraphs")
    assert step_compile_mode(overridden, distributed=False) == "max-autotune-no-cudagraphs"


def test_a_step_reads_nothing_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensor.item and Tensor.__bool__ (an `if` on a tensor) raise during eager steps: loss, backward,
    clipping and the step wrapper never wait for the device. (SGD stands in for AdamW, whose CPU
    path reads its step count with .item(); the fused CUDA AdamW does not.)"""
    step = tiny_step(resolve_runtime("cpu", "32", compile=False), optimizer=torch.optim.SGD)

    def sync(*_args: object) -> None:
        raise AssertionError("a host read-back inside a training step")

    image, target = tiny_batch()
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "item", sync)
        m.setattr(torch.Tensor, "__bool__", sync)
        losses = [step(image, target) for _ in range(3)]
    assert losses[-1].item() < losses[0].item()


@pytest.mark.slow
def test_compiled_step_trains_without_recompiling() -> None:
    """Model and loss compile (CPU inductor) into graphs that match eager on the first step, train
    (the loss falls) and are not recompiled after warm-up, across lr changes and a validation
    pass in eval mode between steps."""
    import torch._dynamo

    torch._dynamo.reset()
    image, target = tiny_batch()
    eager = tiny_step(resolve_runtime("cpu", "32", compile=False))
    step = tiny_step(resolve_runtime("cpu", "32", compile=True))
    assert isinstance(step.loss_fn, DiceCELoss)
    schedule = ProgressLR(step.optimizer, warmup=2, min_ratio=0.1, total_steps=10)
    first = step(image, target)
    torch.testing.assert_close(first, eager(image, target), rtol=1e-4, atol=1e-4)
    schedule.step()
    losses = [first, step(image, target)]
    schedule.step()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(4):
            losses.append(step(image, target))
            schedule.step()
            step.model.eval()  # validation runs the plain model between epochs
            with torch.no_grad():
                step.model(image)
            step.model.train()
    values = [v.item() for v in losses]
    assert values[-1] < values[0] - 0.05, values
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_optimizer_reads_the_schedules_lr() -> None:
    """With clipping and AdamW compiled too, the lr is a tensor input, not a constant folded into the
    graph: an lr of 0 leaves every weight where it was, and changing it recompiles nothing."""
    import torch._dynamo

    torch._dynamo.reset()
    image, target = tiny_batch()
    step = tiny_step(resolve_runtime("cpu", "32", compile=True), compile_optimizer=True)
    step(image, target)
    step(image, target)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for group in step.optimizer.param_groups:
            group["lr"] = 0.0
        before = [p.detach().clone() for p in step.model.parameters()]
        step(image, target)
        assert all(torch.equal(a, p) for a, p in zip(before, step.model.parameters(), strict=True))
        for group in step.optimizer.param_groups:
            group["lr"] = 1e-2
        step(image, target)
        assert not all(torch.equal(a, p) for a, p in zip(before, step.model.parameters(), strict=True))
    assert all(isinstance(g["lr"], float) for g in step.optimizer.param_groups)  # what the schedule and logs see
    torch._dynamo.reset()


def test_compiled_optimizer_refuses_the_fp16_scaler() -> None:
    rt = resolve_runtime("cpu", "32", compile=True)
    model = nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    with pytest.raises(ValueError, match="scaler"):
        TrainStep(model, model, nn.MSELoss(), opt, scaler, rt, 1.0, compile_optimizer=True)


def test_warm_up_runs_the_step_as_often_as_its_resolved_mode_needs() -> None:
    """The default CUDA mode is CUDA graphs although `--compile-mode` is unset: the warm-up must ask
    the step (record, warm, replay = 3 calls), not the runtime's unset mode (1 call)."""
    from cityseg.training.warmup import warmup_calls

    rt = resolve_runtime("cpu", "32", compile=False)
    step = tiny_step(rt)
    assert warmup_calls(rt, step) == 1
    step.cudagraphs = True  # what a step built on one CUDA GPU with the default mode holds
    assert warmup_calls(rt, step) == 3
