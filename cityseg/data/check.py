"""`cityseg-fast check-data DIR`: validate every pair of a dataset and summarise it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.table import Table

from cityseg.data.loaders import palette_mismatch_check
from cityseg.data.pairs import SPLITS, PairError, PairInfo, list_split, overlap_warning, read_pair, validate_files
from cityseg.palette import cityscapes_palette, far_share, map_colors_lut


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

    def table(self) -> Table:
        t = Table(title=f"{self.root}")
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


def mask_stats(infos: list[PairInfo], sample: int, max_dist: float) -> tuple[float | None, list]:
    """Share of mask pixels near a palette colour and the top classes, over evenly spaced files."""
    if not infos or sample <= 0:
        return None, []
    picked = infos[:: max(1, len(infos) // sample)][:sample]
    palette = cityscapes_palette()
    counts = torch.zeros(256, dtype=torch.int64)
    far = 0.0
    for info in picked:
        mask = torch.from_numpy(read_pair(info.path)[1].copy())
        counts += torch.bincount(map_colors_lut(mask, palette).flatten(), minlength=256)
        far += far_share(mask, palette, max_dist)
    shares = counts[: palette.num_classes].double() / counts.sum()
    top = [(palette.names[c], shares[c].item()) for c in shares.argsort(descending=True)[:3].tolist() if shares[c] > 0]
    return 1.0 - far / len(picked), top


def check_dataset(root: str | Path, workers: int = 4, sample: int = 50, max_dist: float = 30.0) -> DatasetReport:
    """Validate train/ and val/. Raises PairError only when the folder itself is unusable."""
    root = Path(root)
    if not root.is_dir():
        raise PairError(root, "dataset folder not found")
    splits, bad, listed = [], [], {}
    for name in SPLITS:
        try:
            files = listed[name] = list_split(root, name)
        except PairError as e:
            bad.append(e)
            continue
        good, errors = validate_files(files, workers=workers, mask_check=palette_mismatch_check(cityscapes_palette()))
        bad += errors
        report = SplitReport(name, files=len(files), sizes=Counter((i.width, i.height) for i in good))
        report.near_share, report.top_classes = mask_stats(good, sample, max_dist)
        splits.append(report)
    warning = overlap_warning(listed["train"], listed["val"]) if len(listed) == 2 else None
    return DatasetReport(root, max_dist, splits, bad, [warning] if warning else [])
