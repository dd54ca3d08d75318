"""predict's logits path stays bounded in memory for huge photos (issue 35, item 7): above
FULL_LOGITS_MAX_BYTES the upsampled logits are made a strip of rows at a time, with the same ids as
the full-size `interpolate` (the independent reference here)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cityseg.inference.predict as predict
from cityseg.inference.predict import strip_upsampled_argmax, upsampled_argmax


def reference(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    full = nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False, antialias=True)
    return full[0].argmax(0).to(torch.uint8)


@pytest.mark.parametrize("small,size", [((16, 16), (300, 500)), ((32, 24), (1024, 777)), ((8, 12), (64, 96)),
                                        ((5, 7), (5, 700))])
def test_strips_give_the_full_size_ids(small: tuple[int, int], size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 19, *small)
    # strips of 7 rows: many strips, a short last one
    assert torch.equal(strip_upsampled_argmax(logits, size, strip_bytes=19 * size[1] * 4 * 7), reference(logits, size))


def test_a_large_output_never_builds_the_full_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: one (C, H, W) float map per photo (8000x8000: 4.9 GB, 6.2 GB of memory measured)."""
    logits = torch.randn(1, 19, 16, 16)
    size = (400, 300)
    full_bytes = 19 * 400 * 300 * 4
    made = []
    interpolate = nn.functional.interpolate

    def watched(x, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        out = interpolate(x, *args, **kwargs)
        made.append(out.numel() * out.element_size())
        return out

    monkeypatch.setattr(predict.nn.functional, "interpolate", watched)
    ids = upsampled_argmax(logits, size, max_bytes=full_bytes // 2)
    assert max(made) < full_bytes // 10  # the width pass only: (C, h, W)
    assert torch.equal(ids, reference(logits, size))
    made.clear()
    upsampled_argmax(logits, size)  # under the limit: the one full-size map, as before
    assert made == [full_bytes]
