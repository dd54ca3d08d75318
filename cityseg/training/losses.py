"""Training losses: cross-entropy with ignore index 255 (optionally class-weighted), and CE + soft
Dice, which weighs every class present by its overlap rather than its pixel count, so thin and rare
classes (poles, signs, riders) are not drowned by road and sky.

The Dice terms are O(pixels): no one-hot tensor. Per class c over the valid pixels,
intersection_c = sum of p_c where the target is c (a gather of the target's probability, then a
scatter-add by class), count_c = the pixels of class c (a scatter-add of ones), and
sum_c = sum of p_c. A dense int64 one-hot costs 8 * C bytes a pixel (152 for 19 classes) and two
extra passes over it; the scatter-adds write into a fixed (C,) tensor, so the shapes stay static
and the loss compiles into the same graph as the model (bincount's output size is data-dependent).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from cityseg.palette import IGNORE_INDEX


def class_sums(values: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C,) sums of `values` (any shape) grouped by `target` (same shape, ids in [0, C))."""
    sums = torch.zeros(num_classes, dtype=values.dtype, device=values.device)
    return sums.scatter_add(0, target.reshape(-1), values.reshape(-1))


class DiceCELoss(nn.Module):
    """cross_entropy + (1 - mean soft Dice over the classes present in the batch's targets)."""

    def __init__(self, weight: torch.Tensor | None = None, smooth: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        n_classes = logits.shape[1]
        # One log-softmax serves both terms: CE is its NLL, Dice its exp.
        log_probs = logits.float().log_softmax(dim=1)  # (B, C, H, W)
        ce = F.nll_loss(log_probs, target, weight=self.weight, ignore_index=IGNORE_INDEX)
        probs = log_probs.exp()
        valid = target != IGNORE_INDEX  # (B, H, W)
        ids = torch.where(valid, target, 0)  # ignored pixels count for class 0 with weight 0
        validf = valid.to(probs.dtype)
        p_target = probs.gather(1, ids.unsqueeze(1)).squeeze(1) * validf  # (B, H, W)
        inter = class_sums(p_target, ids, n_classes)  # (C,)
        count = class_sums(validf, ids, n_classes)  # (C,) target pixels per class
        prob_sum = (probs * validf.unsqueeze(1)).sum((0, 2, 3))  # (C,)
        dice = (2 * inter + self.smooth) / (prob_sum + count + self.smooth)
        present = count > 0  # classes absent from the batch would only reward predicting nothing
        dice_loss = 1 - (dice * present).sum() / present.sum().clamp(min=1)
        return ce + dice_loss


def build_loss_fn(kind: str, weight: torch.Tensor | None) -> nn.Module:
    if kind == "ce+dice":
        return DiceCELoss(weight)
    return nn.CrossEntropyLoss(weight=weight, ignore_index=IGNORE_INDEX)
