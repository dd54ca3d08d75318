"""The optimiser's parameter groups: weight decay on conv and linear weights, never on norms or biases
(decaying BatchNorm scales and biases towards 0 only hurts), every parameter trained exactly once.

    pytest tests/test_optimizer.py
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cityseg.config import ModelConfig, TrainConfig
from cityseg.model import build_model
from cityseg.training.setup import build_optimizer

NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def expected_decay(model: nn.Module) -> dict[str, bool]:
    """Parameter name -> whether it should decay, from what each parameter is (not from its shape):
    weights of convolutions and linear layers yes; biases and every norm's parameters no."""
    want = {}
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            want[full] = name == "weight" and not isinstance(module, NORMS)
    return want


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(width=4, depth=2))


@pytest.mark.parametrize("compiled", [False, True])
def test_decay_groups_hold_weights_not_norms_or_biases(model: nn.Module, compiled: bool) -> None:
    cfg = TrainConfig(weight_decay=0.05)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"), compiled=compiled)
    group_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in group_of, "a parameter in two groups"
            group_of[id(p)] = group
    want = expected_decay(model)
    assert {name for name, p in model.named_parameters() if id(p) in group_of} == set(want)  # all, once
    decayed = {name for name, p in model.named_parameters() if group_of[id(p)]["weight_decay"] > 0}
    assert decayed == {name for name, d in want.items() if d}
    assert all(group_of[id(p)]["weight_decay"] == cfg.weight_decay
               for name, p in model.named_parameters() if name in decayed)
    # the model has both kinds, so the split is not vacuous
    assert any(want.values()) and not all(want.values())
    assert any(isinstance(m, NORMS) for m in model.modules())


def test_one_step_with_zero_gradients_shrinks_only_the_decayed(model: nn.Module) -> None:
    """What the groups mean: AdamW with zero gradients moves a parameter only by its decay,
    p <- p (1 - lr wd); norms and biases stay where they are."""
    cfg = TrainConfig(weight_decay=0.1, lr=0.01)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        lr = next(g["lr"] for g in optimizer.param_groups if any(q is p for q in g["params"]))
        factor = 1 - lr * cfg.weight_decay if expected_decay(model)[name] else 1.0
        torch.testing.assert_close(p.detach(), before[name] * factor, rtol=1e-6, atol=0, msg=name)
