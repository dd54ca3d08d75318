"""Confusion-matrix metrics: hand-computed cases, torchmetrics as the reference, edge cases.

/work/venv/bin/pytest tests/test_metrics.py
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist
from rich.console import Console
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from cityseg.metrics import ConfusionMatrix, SegMetrics, iou_table

IGNORE = 255
N = 19


def random_batch(seed: int, batch: int = 2, size: tuple[int, int] = (24, 40)) -> tuple[Tensor, Tensor]:
    """Logits and targets where truth uses classes 0..14 (10% ignored), prediction never picks
    17 or 18: so 15, 16 are predicted but absent from truth, and 17, 18 are absent from both."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 15, (batch, *size), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.1] = IGNORE
    logits = torch.randn(batch, N, *size, generator=g)
    logits[:, 17:] = -1e4
    # Nudge towards the truth so IoUs are far from zero and from each other.
    logits += 2.0 * torch.nn.functional.one_hot(target.clamp(max=N - 1), N).permute(0, 3, 1, 2)
    return logits, target


def compute(pred: torch.Tensor, target: torch.Tensor, num_classes: int = N) -> SegMetrics:
    cm = ConfusionMatrix(num_classes, ignore_index=IGNORE)
    cm.update(pred, target)
    return cm.compute()


def same(a: SegMetrics, b: SegMetrics) -> bool:
    """Equality with nan == nan (to_dict maps nan to None)."""
    return a.to_dict() == b.to_dict()


def test_hand_computed_2x3() -> None:
    target = torch.tensor([[[0, 1, IGNORE], [2, 2, 1]]])
    pred = torch.tensor([[[0, 2, 1], [2, 1, 1]]])
    m = compute(pred, target, num_classes=4)  # class 3 appears nowhere
    assert m.confusion == [[1, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    assert m.pixel_acc == pytest.approx(3 / 5)
    assert m.per_class_iou[:3] == pytest.approx([1.0, 1 / 3, 1 / 3])
    assert math.isnan(m.per_class_iou[3])
    assert m.present == [True, True, True, False]
    assert m.miou == pytest.approx(5 / 9)
    assert m.ignored_pixels == 1
    assert m.truth_pixels == [1, 2, 2, 0]
    assert m.excluded_classes(["a", "b", "c", "d"]) == ["d"]


def test_matches_torchmetrics() -> None:
    logits, target = random_batch(0)
    m = compute(logits, target)
    tm_iou = MulticlassJaccardIndex(num_classes=N, ignore_index=IGNORE, average=None)(logits, target)
    tm_acc = MulticlassAccuracy(num_classes=N, ignore_index=IGNORE, average="micro")(logits, target)
    present = torch.tensor(m.present)
    assert present.tolist() == [True] * 17 + [False] * 2
    # torchmetrics reports 0 for classes absent from truth and prediction; we exclude them (nan).
    ours = torch.tensor(m.per_class_iou, dtype=torch.float64)
    torch.testing.assert_close(ours[present], tm_iou[present].double(), rtol=1e-5, atol=1e-6)
    assert m.miou == pytest.approx(tm_iou[present].double().mean().item(), rel=1e-5)
    assert m.pixel_acc == pytest.approx(tm_acc.item(), rel=1e-5)


def test_predicted_but_absent_from_truth_counts_as_zero() -> None:
    logits, target = random_batch(1)
    m = compute(logits, target)
    assert m.truth_pixels[15] == 0 and m.present[15] and m.per_class_iou[15] == 0.0
    ious = [v for v, p in zip(m.per_class_iou, m.present, strict=True) if p]
    assert m.miou == pytest.approx(sum(ious) / 17)


def test_accumulation_equals_concatenation() -> None:
    batches = [random_batch(seed, size=(8 + 4 * seed, 12)) for seed in range(3)]
    cm = ConfusionMatrix(N)
    for logits, target in batches:
        cm.update(logits, target)
    flat = [(lg.argmax(1).flatten(), t.flatten()) for lg, t in batches]
    once = compute(torch.cat([p for p, _ in flat])[None], torch.cat([t for _, t in flat])[None])
    assert same(cm.compute(), once)


def test_logits_equal_ids_and_dtypes() -> None:
    logits, target = random_batch(2)
    from_logits = compute(logits, target)
    assert same(compute(logits.argmax(1), target), from_logits)
    assert same(compute(logits.argmax(1).to(torch.uint8), target.to(torch.uint8)), from_logits)
    assert compute(logits.bfloat16(), target).present == from_logits.present


def test_all_ignored() -> None:
    target = torch.full((2, 4, 6), IGNORE)
    m = compute(torch.randn(2, N, 4, 6), target)
    assert math.isnan(m.miou) and math.isnan(m.pixel_acc)
    assert not any(m.present) and all(math.isnan(v) for v in m.per_class_iou)
    d = m.to_dict()
    assert d["miou"] is None and d["pixel_acc"] is None and d["per_class_iou"] == [None] * N
    assert d["ignored_pixels"] == 48
    json.dumps(d, allow_nan=False)
    console = Console(width=100, record=True)
    console.print(iou_table(m, [f"c{i}" for i in range(N)]))
    assert "19 classes absent" in " ".join(console.export_text().split())


def test_to_dict_json_safe() -> None:
    m = compute(*random_batch(3))
    d = json.loads(json.dumps(m.to_dict(), allow_nan=False))
    assert d["per_class_iou"][17] is None and d["per_class_iou"][0] == pytest.approx(m.per_class_iou[0])
    assert "confusion" not in m.to_dict(with_confusion=False)


def test_reset_and_merge() -> None:
    logits, target = random_batch(4)
    a, b = ConfusionMatrix(N), ConfusionMatrix(N)
    a.update(logits[:1], target[:1])
    b.update(logits[1:], target[1:])
    a.merge(b)
    assert same(a.compute(), compute(logits, target))
    a.reset()
    assert int(a.matrix.sum()) == 0
    with pytest.raises(ValueError, match="merge"):
        a.merge(ConfusionMatrix(3))


def test_all_reduce(tmp_path) -> None:
    logits, target = random_batch(5)
    cm = ConfusionMatrix(N)
    cm.update(logits, target)
    before = cm.compute()
    cm.all_reduce()  # no process group: a no-op
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        cm.all_reduce()  # one gloo rank: the SUM is the matrix itself, but the call path is real
    finally:
        dist.destroy_process_group()
    assert same(cm.compute(), before)


def test_invalid_inputs() -> None:
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[0, 1]]), torch.tensor([[0, 7]]))  # 7: neither a class nor ignore_index
    with pytest.raises(ValueError, match="1 pixels had a target outside"):
        cm.compute()
    with pytest.raises(ValueError, match="differ in shape"):
        cm.update(torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="logits must be"):
        cm.update(torch.randn(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))


def test_iou_table() -> None:
    target = torch.tensor([[[0, 1, IGNORE], [2, 2, 1]]])
    pred = torch.tensor([[[0, 2, 1], [2, 1, 1]]])
    m = compute(pred, target, num_classes=4)
    console = Console(width=100, record=True)
    console.print(iou_table(m, ["road", "sidewalk", "building", "wall"], title="val"))
    text = console.export_text()
    flat = " ".join(text.split())  # the caption wraps at the table width
    assert "val" in text and "100.0" in text and "33.3" in text
    wall_row = next(line for line in text.splitlines() if "wall" in line)
    assert "—" in wall_row
    assert "1 class absent from truth and prediction: excluded from mIoU" in flat
    assert "55.6" in text and "pixel acc 60.0 %" in text  # mIoU 5/9, pixel acc 3/5
    with pytest.raises(ValueError, match="class names"):
        iou_table(m, ["road"])
