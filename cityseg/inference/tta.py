"""Test-time augmentation: `--tta flip` for eval and predict."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from cityseg.errors import OptionError

Tta = Literal["flip"] | None


class FlipTTA(nn.Module):
    """Average of the logits of x and of its mirror image, mirrored back: (B, C, H, W) -> same.

    The result is exactly flip-equivariant, and costs two forward passes. Averaged in float32 so bf16
    autocast logits do not lose their last bits in the sum.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.model(x).float()
        b = self.model(x.flip(-1)).float().flip(-1)
        return (a + b) / 2


def resolve_tta(tta: str | None) -> Tta:
    if tta in (None, "none"):
        return None
    if tta == "flip":
        return "flip"
    raise OptionError(f"--tta {tta}: expected none or flip")
