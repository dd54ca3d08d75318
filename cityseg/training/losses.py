"""Training losses: cross-entropy with ignore index 255 (optionally class-weighted), and CE + soft
Dice, which weighs every class present by its overlap rather than its pixel count, so thin and rare
classes (poles, signs, riders) are not drowned by road and sky."""

from __future__ import annotations

import torch
from torch import nn

from cityseg.palette import IGNORE_INDEX


class DiceCELoss(nn.Module):
    """cross_entropy + (1 - mean soft Dice over the classes present in the batch's targets)."""

    def __init__(self, weight: torch.Tensor | None = None, smooth: float = 1.0) -> None:
        super().__init__()
        self.ce = nn.CrossEntropyLoss(weight=weight, ignore_index=IGNORE_INDEX)
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = self.ce(logits, target)
        n_classes = logits.shape[1]
        valid = target != IGNORE_INDEX  # (B, H, W)
        probs = logits.float().softmax(dim=1) * valid.unsqueeze(1)
        onehot = nn.functional.one_hot(torch.where(valid, target, 0), n_classes).permute(0, 3, 1, 2)
        onehot = onehot * valid.unsqueeze(1)
        dims = (0, 2, 3)
        inter = (probs * onehot).sum(dims)
        total = probs.sum(dims) + onehot.sum(dims)
        dice = (2 * inter + self.smooth) / (total + self.smooth)
        present = onehot.sum(dims) > 0  # classes absent from the batch would only reward predicting nothing
        dice_loss = 1 - (dice * present).sum() / present.sum().clamp(min=1)
        return ce + dice_loss


def build_loss_fn(kind: str, weight: torch.Tensor | None) -> nn.Module:
    if kind == "ce+dice":
        return DiceCELoss(weight)
    return nn.CrossEntropyLoss(weight=weight, ignore_index=IGNORE_INDEX)
