"""Photo / truth / prediction of the first val images: samples.png (Reporter) and TensorBoard's
samples image. Drawing them changes nothing a resumed run would see."""

from __future__ import annotations

from typing import Any

import torch

from cityseg.data.contract import denormalize
from cityseg.report import plot_samples
from cityseg.runtime import autocast


def first_val_batch(t: Any, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` val images and targets. The global RNG is left as it was (a loader's iterator
    draws its seed from it): drawing pictures must not change what a resumed run would see."""
    with torch.random.fork_rng(devices=[]):
        image, target = next(iter(t.data.val))
    return image[:n], target[:n]


@torch.no_grad()
def predict_samples(t: Any, batch: tuple[torch.Tensor, torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(photos uint8 (N, H, W, 3), truths, predictions) of `batch`, predicted in eval mode at the scored size."""
    was_training = t.model.training
    t.model.eval()
    try:
        image, target = batch
        with torch.no_grad(), autocast(t.rt):
            logits = t.model(image).float()
        if logits.shape[-2:] != target.shape[-2:]:  # labels scored at their native size
            logits = torch.nn.functional.interpolate(logits, size=target.shape[-2:], mode="bilinear")
            image = torch.nn.functional.interpolate(image.float(), size=target.shape[-2:], mode="bilinear")
        return denormalize(image), target.cpu(), logits.argmax(1).cpu()
    finally:
        t.model.train(was_training)


def draw_samples(t: Any, batch: tuple[torch.Tensor, torch.Tensor], path: Any) -> None:
    """Photo / truth / prediction of `batch`, predicted in eval mode, scored size, to `path`."""
    plot_samples(*predict_samples(t, batch), t.data.palette, path)
