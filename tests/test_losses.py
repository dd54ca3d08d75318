"""CE + Dice without a one-hot: equal to the dense one-hot formulation it replaced (kept here as the
reference), value and gradient, with ignored pixels, class weights and absent classes; and it
compiles into one graph with no recompile from batch to batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cityseg.palette import IGNORE_INDEX
from cityseg.training.losses import DiceCELoss, build_loss_fn


def dense_dice_ce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                  smooth: float = 1.0) -> torch.Tensor:
    """The previous DiceCELoss.forward, verbatim: a dense int64 one-hot (B, C, H, W)."""
    ce = nn.CrossEntropyLoss(weight=weight, ignore_index=IGNORE_INDEX)(logits, target)
    n_classes = logits.shape[1]
    valid = target != IGNORE_INDEX
    probs = logits.float().softmax(dim=1) * valid.unsqueeze(1)
    onehot = nn.functional.one_hot(torch.where(valid, target, 0), n_classes).permute(0, 3, 1, 2)
    onehot = onehot * valid.unsqueeze(1)
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    total = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + smooth) / (total + smooth)
    present = onehot.sum(dims) > 0
    dice_loss = 1 - (dice * present).sum() / present.sum().clamp(min=1)
    return ce + dice_loss


def random_batch(seed: int, b: int = 3, c: int = 19, h: int = 23, w: int = 17, absent: tuple[int, ...] = (4, 11),
                 channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits and targets with ~20 % ignored pixels and some classes absent (odd sizes)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, h, w, generator=g) * 3
    if channels_last:
        logits = logits.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, c, (b, h, w), generator=g)
    for k in absent:
        target[target == k] = (k + 1) % c
    target[torch.rand(b, h, w, generator=g) < 0.2] = IGNORE_INDEX
    return logits, target


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_the_one_hot_formulation_value_and_gradient(seed: int, weighted: bool) -> None:
    logits, target = random_batch(seed, channels_last=seed == 2)
    weight = torch.rand(19, generator=torch.Generator().manual_seed(seed)) + 0.5 if weighted else None
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    loss = DiceCELoss(weight)(a, target)
    ref = dense_dice_ce(b, target, weight)
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-5)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-5)


def test_every_pixel_ignored_and_one_class_only() -> None:
    logits, target = random_batch(3, b=2, c=5, h=8, w=8)
    everything_ignored = torch.full_like(target, IGNORE_INDEX)
    single_class = torch.full_like(target, 2)
    for t in (single_class, everything_ignored):
        torch.testing.assert_close(DiceCELoss()(logits, t), dense_dice_ce(logits, t), rtol=0, atol=1e-5, equal_nan=True)


def test_ce_kind_is_plain_cross_entropy() -> None:
    """`--loss ce`: the mean negative log-likelihood over the pixels that are not void (255), computed
    here by hand, unweighted and class-weighted (weighted mean: each pixel counts its class's weight)."""
    logits, target = random_batch(4)
    assert isinstance(build_loss_fn("ce+dice", None), DiceCELoss)
    valid = target != IGNORE_INDEX
    nll = -logits.log_softmax(1).gather(1, target.clamp(max=logits.shape[1] - 1)[:, None])[:, 0]  # (B, H, W)
    weight = torch.linspace(0.5, 2.0, logits.shape[1])
    pixel_weight = weight[target.clamp(max=logits.shape[1] - 1)] * valid
    for w, want in ((None, nll[valid].mean()), (weight, (nll * pixel_weight).sum() / pixel_weight.sum())):
        torch.testing.assert_close(build_loss_fn("ce", w)(logits, target), want, rtol=1e-5, atol=1e-6)


def test_compiles_as_one_graph_without_recompiles() -> None:
    """fullgraph=True fails on any graph break (a data-dependent bincount would be one); a second
    batch with other classes present and other ignored pixels reuses the same graph."""
    import torch._dynamo

    torch._dynamo.reset()
    fn = torch.compile(DiceCELoss(), backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in (5, 6):
            logits, target = random_batch(seed)
            torch.testing.assert_close(fn(logits, target), dense_dice_ce(logits, target), rtol=0, atol=1e-5)
    torch._dynamo.reset()


def aot_graph_ops(fn, *args) -> tuple[set[str], set[str]]:
    """The aten ops of the forward and backward graphs that AOTAutograd hands to a compiler (Inductor
    lowers exactly these): what the compiled loss computes, before any code generation."""
    import torch._dynamo
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    seen: dict[str, set[str]] = {"fw": set(), "bw": set()}

    def recorder(kind):
        def compiler(gm, example_inputs):  # noqa: ARG001
            seen[kind] |= {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
            return make_boxed_func(gm.forward)
        return compiler

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=aot_autograd(fw_compiler=recorder("fw"), bw_compiler=recorder("bw")),
                             fullgraph=True)
    compiled(*args).backward()
    torch._dynamo.reset()
    return seen["fw"], seen["bw"]


def test_compiled_graph_has_no_scatter_and_no_atomic_accumulation() -> None:
    """The class sums are reductions: no scatter_add (contended atomics on CUDA, nondeterministic) in
    the forward, and no gather whose backward is one; the forward's ops are also not index_put
    with accumulate. A `scatter_add` of the old form fails this test."""
    logits, target = random_batch(7)
    fw, bw = aot_graph_ops(DiceCELoss(), logits.requires_grad_(), target)
    accumulating = [op for op in fw | bw if "scatter_add" in op or "scatter_reduce" in op or "index_put" in op
                    or "index_add" in op]
    assert not accumulating, f"atomic-prone ops in the compiled loss: {accumulating}"
    assert not any("gather" in op for op in fw), fw  # its backward would be a scatter-add


def test_loss_and_gradient_are_deterministic() -> None:
    """Two evaluations of one batch give bitwise-equal loss and gradient."""
    logits, target = random_batch(8, channels_last=True)
    results = []
    for _ in range(2):
        x = logits.clone().requires_grad_()
        loss = DiceCELoss()(x, target)
        loss.backward()
        results.append((loss.detach(), x.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
