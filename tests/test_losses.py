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
    logits, target = random_batch(4)
    assert isinstance(build_loss_fn("ce", None), nn.CrossEntropyLoss)
    assert isinstance(build_loss_fn("ce+dice", None), DiceCELoss)


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
