"""Training losses: cross-entropy with ignore index 255 (optionally class-weighted), and CE + soft
Dice, which weighs every class present by its overlap rather than its pixel count, so thin and rare
classes (poles, signs, riders) are not drowned by road and sky.

The Dice terms are per-class sums over the pixels, written as masked reductions: with
`is_class = target[:, None] == arange(C)[None, :, None, None]`, intersection_c = sum of p * is_class,
count_c = sum of is_class and sum_c = sum of p over valid pixels. Compiled, the comparison fuses into
the one reduction kernel that reads the probabilities: no one-hot tensor is written, and there is no
scatter. A scatter-add into C floats (the previous form) became contended atomics on CUDA (Inductor
partitions scatters on ROCm only), twice per step, and made the loss nondeterministic; a reduction
over a static (B, C, H, W) shape is deterministic and keeps the whole loss in the model's graph.
The ignore id (255) is never a class id, so ignored pixels fall out of `is_class` by themselves.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from cityseg.palette import IGNORE_INDEX


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
        classes = torch.arange(n_classes, device=target.device).view(1, n_classes, 1, 1)
        is_class = target.unsqueeze(1) == classes  # (B, C, H, W) bool; fused away when compiled
        valid = (target != IGNORE_INDEX).unsqueeze(1)  # (B, 1, H, W)
        dims = (0, 2, 3)
        inter = (probs * is_class).sum(dims)  # (C,)
        count = is_class.sum(dims, dtype=probs.dtype)  # (C,) target pixels per class
        prob_sum = (probs * valid).sum(dims)  # (C,)
        dice = (2 * inter + self.smooth) / (prob_sum + count + self.smooth)
        present = count > 0  # classes absent from the batch would only reward predicting nothing
        dice_loss = 1 - (dice * present).sum() / present.sum().clamp(min=1)
        return ce + dice_loss


def build_loss_fn(kind: str, weight: torch.Tensor | None) -> nn.Module:
    if kind == "ce+dice":
        return DiceCELoss(weight)
    return nn.CrossEntropyLoss(weight=weight, ignore_index=IGNORE_INDEX)
