"""torchrun + DDP on CPU (gloo, 2 processes): one epoch, identical weights, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cityseg.checkpoint import load_checkpoint
from cityseg.inference.evaluate import evaluate_checkpoint
from tests.cli_process import Finished, run_cli
from tests.cli_process import torchrun as launch
from tests.conftest import TINY_FP32 as TINY
from tests.conftest import make_pair_dataset


def torchrun(*args: str) -> Finished:
    """2 ranks of `cityseg-fast train ARGS`: hard timeout, and no process of the run left behind."""
    return launch(["train", *args], timeout=600)


@pytest.mark.slow
@pytest.mark.timeout(1500)  # three 2-rank runs
def test_two_rank_gloo_run_and_exact_resume(tmp_path: Path) -> None:
    data = make_pair_dataset(tmp_path / "data", n_train=10, n_val=5)
    straight = tmp_path / "straight"
    done = torchrun("--data", str(data), "--out", str(straight), "--epochs", "2", *TINY)
    assert done.returncode == 0, done.output[-3000:]
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 2
    # 10 pairs over 2 ranks: 5 each, 2 full batches of 2 per rank and epoch (drop_last).
    assert summary["steps"] == 4
    assert (straight / "metrics.jsonl").read_text().count("\n") == 2  # rank 0 alone writes
    # Sharded validation (3 + 2 images, no padding) equals one process scoring the saved checkpoint.
    single = evaluate_checkpoint(straight / "checkpoints" / "last.pt", data, batch_size=2, workers=0, device="cpu")
    assert single["pixel_acc"] == summary["final"]["pixel_acc"]
    assert single["miou"] == summary["final"]["miou"]

    split = tmp_path / "split"
    first = torchrun("--data", str(data), "--out", str(split), "--epochs", "2", "--max-steps", "3", *TINY)
    assert first.returncode == 0, first.output[-3000:]
    resumed = torchrun("--resume", str(split))
    assert resumed.returncode == 0, resumed.output[-3000:]
    a = load_checkpoint(straight / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(split / "checkpoints" / "last.pt")["model"]
    for k in a:  # BatchNorm buffers too: DDP broadcasts rank 0's, which the checkpoint holds
        assert torch.equal(a[k], b[k]), k


@pytest.mark.timeout(600)
def test_two_ranks_under_a_time_budget_agree(tmp_path: Path) -> None:
    """The training clock is the same number on every rank (agreed at log steps), so the ranks use the
    same learning rate and stop at the same step: the run ends, and its end-of-run check finds the
    weights identical."""
    data = make_pair_dataset(tmp_path / "data", n_train=10, n_val=5)
    done = torchrun("--data", str(data), "--out", str(tmp_path / "run"), "--time-budget", "3s", "--log-every", "2",
                    *TINY)
    assert done.returncode == 0, done.output[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["train_seconds"] >= 3.0


def test_a_cuda_graph_compile_mode_is_refused_for_several_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before torchrun starts any rank (--nproc), and in a rank that torchrun started (WORLD_SIZE)."""
    done = run_cli(["train", "--nproc", "2", "--compile-mode", "reduce-overhead", "--device", "cpu"], timeout=60)
    assert done.returncode == 2, done.output
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "--compile-mode reduce-overhead" in errors[0] and "DDP" in errors[0], done.output
    from cityseg.errors import OptionError
    from cityseg.resolve import resolve_run

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(OptionError, match="records CUDA graphs"):
        resolve_run({"train.compile_mode": "max-autotune", "train.device": "cpu"})
    assert resolve_run({"train.compile_mode": "max-autotune-no-cudagraphs", "train.device": "cpu"})


def test_ddp_compiles_model_and_loss_as_one_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """One gloo rank in this process: the step's DDP module (model and loss inside) compiles to one graph
    holding the convolutions and the loss's log-softmax together, and its loss and gradients equal an
    eager single-process step's. A function that calls a DDP model and then the loss compiles to two
    graphs (model, then loss): that is what `for_ranks` avoids."""
    import socket

    import torch.distributed as dist

    from cityseg.config import ModelConfig, TrainConfig
    from cityseg.distributed import DistInfo
    from cityseg.runtime import Runtime
    from cityseg.training.losses import build_loss_fn
    from cityseg.training.setup import build_models, build_optimizer, for_ranks
    from cityseg.training.step import TrainStep

    with socket.socket() as s:  # a free port on this machine for the one-rank store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        graphs: list[set[str]] = []

        def recording_backend(gm, example_inputs):  # noqa: ARG001
            graphs.append({str(n.target) for n in gm.graph.nodes if n.op.startswith("call_")})
            return gm.forward

        rt = Runtime(torch.device("cpu"), "32", compile=True)
        steps, losses, grads = {}, {}, {}
        for ranks in ("ddp", "single"):
            torch.manual_seed(0)
            model, step_model = build_models(ModelConfig(width=4, depth=2), rt, DistInfo(grouped=ranks == "ddp"), False)
            loss_fn = build_loss_fn("ce+dice", None)
            step_model = for_ranks(step_model, loss_fn, rt, DistInfo(grouped=ranks == "ddp"))
            optimizer = build_optimizer(model, TrainConfig(), rt.device)
            backend = recording_backend if ranks == "ddp" else "eager"
            steps[ranks] = TrainStep(step_model, model, loss_fn, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                                     rt, 1.0, compile_backend=backend)
            g = torch.Generator().manual_seed(1)
            image = torch.randn(2, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
            target = torch.randint(0, 19, (2, 32, 32), generator=g)
            torch._dynamo.reset()
            steps[ranks].optimizer.step = lambda: None  # compare the gradients of the first step, not an update
            losses[ranks] = steps[ranks](image, target)
            grads[ranks] = [p.grad.clone() for p in model.parameters()]
        torch._dynamo.reset()
        fused = [ops for ops in graphs if any("convolution" in op or "conv2d" in op for op in ops)]
        assert len(fused) == 1 and any("log_softmax" in op for op in fused[0]), graphs
        torch.testing.assert_close(losses["ddp"], losses["single"])
        for a, b in zip(grads["ddp"], grads["single"], strict=True):
            torch.testing.assert_close(a, b)
    finally:
        dist.destroy_process_group()
