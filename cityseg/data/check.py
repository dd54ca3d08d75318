"""`cityseg-fast check-data DIR`: validate every sample of a dataset (any layout) and summarise it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.table import Table

from cityseg.data.formats import Sample, Source, find_dataset, labels_to_ids, read_sample, validate_samples
from cityseg.data.loaders import palette_mismatch_check
from cityseg.data.pairs import SPLITS, PairError, overlap_warning
from cityseg.palette import cityscapes_palette, far_share


@dataclass
class SplitReport:
    name: str
    files: int = 0
    sizes: Counter = field(default_factory=Counter)
    near_share: float | None = None  # share of sampled mask pixels within max_dist of a palette colour
    top_classes: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class DatasetReport:
    root: Path
    max_dist: float
    splits: list[SplitReport]
    bad: list[PairError]
    warnings: list[str] = field(default_factory=list)
    format: str = "pairs"
    note: str | None = None  # which layout was detected, or which folder below was used

    def table(self) -> Table:
        t = Table(title=f"{self.root} ({self.format})")
        for col in ("split", "files", "sizes (WxH)", f"mask px within {self.max_dist:g} of a colour",
                    "most common classes"):
            t.add_column(col)
        for s in self.splits:
            sizes = ", ".join(f"{w}x{h}: {n}" for (w, h), n in s.sizes.most_common(3))
            near = "n/a" if s.near_share is None else f"{s.near_share:.1%}"
            top = ", ".join(f"{name} {share:.0%}" for name, share in s.top_classes)
            t.add_row(s.name, str(s.files), sizes, near, top)
        t.caption = f"{len(self.bad)} bad file(s)"
        return t


def mask_stats(source: Source, good: list[Sample], sample: int, max_dist: float) -> tuple[float | None, list]:
    """Share of mask pixels near a palette colour (colour masks only) and the top classes, over evenly
    spaced samples."""
    if not good or sample <= 0:
        return None, []
    picked = good[:: max(1, len(good) // sample)][:sample]
    palette = cityscapes_palette()
    counts = torch.zeros(256, dtype=torch.int64)
    far = 0.0
    for item in picked:
        label = torch.from_numpy(read_sample(item, source)[1])
        counts += torch.bincount(labels_to_ids(label, source, palette).flatten(), minlength=256)
        if not source.ids:
            far += far_share(label, palette, max_dist)
    shares = counts[: palette.num_classes].double() / counts.sum()
    top = [(palette.names[c], shares[c].item()) for c in shares.argsort(descending=True)[:3].tolist() if shares[c] > 0]
    return (None if source.ids else 1.0 - far / len(picked)), top


def check_dataset(root: str | Path, workers: int = 4, sample: int = 50, max_dist: float = 30.0,
                  fmt: str = "auto") -> DatasetReport:
    """Validate train/ and val/ of a dataset in any layout (`fmt`, detected by default). Raises
    PairError only when the folder itself is unusable."""
    dataset = find_dataset(root, fmt)
    palette = cityscapes_palette()
    splits, bad, listed = [], [], {}
    for name in SPLITS:
        try:
            source = dataset.source(name, palette)
        except PairError as e:
            bad.append(e)
            continue
        listed[name] = source.samples
        check = None if source.ids else palette_mismatch_check(palette)
        good, errors = validate_samples(source, workers=workers, mask_check=check)
        bad += errors
        report = SplitReport(name, files=len(source), sizes=Counter((i.width, i.height) for _, i in good))
        report.near_share, report.top_classes = mask_stats(source, [s for s, _ in good], sample, max_dist)
        splits.append(report)
    warning = overlap_warning(listed["train"], listed["val"]) if len(listed) == 2 else None
    return DatasetReport(dataset.root, max_dist, splits, bad, [warning] if warning else [], dataset.format,
                         dataset.note)
