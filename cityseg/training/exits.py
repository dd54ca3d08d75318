"""A run that cannot go on: out of memory (the position is saved, a smaller batch suggested) or a loss
that became NaN/inf (the last good checkpoint named). Each returns the one-line error to raise."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from cityseg.distributed import any_rank
from cityseg.training.setup import TrainingError


def out_of_memory(t: Any) -> TrainingError:
    """Save the position (the failed step changed no weights) and suggest a smaller batch."""
    t.parts.optimizer.zero_grad(set_to_none=True)
    if t.rt.device.type == "cuda":
        torch.cuda.empty_cache()
    t.saver.save(t.run.last)
    bs = t.cfg.data.batch_size
    return TrainingError(
        f"out of {t.rt.device.type} memory at batch size {bs}: try --batch-size {max(1, bs // 2)} "
        f"(or a smaller --image-size / --width); continue with --resume {t.run.root}"
    )


def check_finite(t: Any, nonfinite: torch.Tensor) -> None:
    """`nonfinite`: a loss since the epoch's start was NaN/inf, on any rank (a device sync)."""
    if any_rank(bool(nonfinite.item()), t.dist, t.rt.device):
        raise TrainingError(
            f"loss became NaN/inf at epoch {t.epoch + 1}, step {t.global_step}; "
            f"the last good checkpoint is {t.run.last} (try a lower --lr or --precision 32)"
        )


@contextmanager
def saved_if_out_of_memory(t: Any) -> Iterator[None]:
    """Out of memory in the block: `out_of_memory`'s error instead."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise out_of_memory(t) from None
