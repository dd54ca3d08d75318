"""`--batch-size auto`: the rule that turns "auto" into a batch, and the lr / warm-up that follow it.
Resolved once, with the rest of the run's config (cityseg/resolve.py); the GPU's trial steps that feed
`choose_by_throughput` are measured in cityseg/training/batch_size.py.

    choice = cpu_choice(train_files=160, world_size=1)       # 16: the reference batch, or the files' count if fewer
    choice = choose_by_throughput(trial, upper=59, free_bytes=80e9)   # a GPU: from measured trial steps
    cfg = apply_choice(cfg, choice)                           # batch, lr and warm-up set together

The batch is chosen for time to accuracy, not to fill memory: a larger batch gives more images a
second only until the GPU is busy, and past that it buys fewer updates an epoch for nothing. So on a
GPU, trial steps (compiled as the run will be) at 16, 32, 64, ... measure images/s and the memory
the step really reserves; the answer is the *smallest* batch within THROUGHPUT_TOLERANCE of the best
images/s whose reserved memory fits MEMORY_SHARE of the free memory. Candidates stop at the data's
cap: an epoch keeps at least MIN_STEPS_PER_EPOCH steps on each rank (never below the reference
batch), and no batch exceeds a rank's training files. On a CPU the answer is the reference batch
(16), or the rank's file count when that is smaller; no trial runs.

The lr and warm-up were tuned at batch 16 (REFERENCE_BATCH); with batch B the run uses
lr * sqrt(B / 16), the square-root rule for Adam-type optimisers (Malladi et al., "On the SDEs and
Scaling Rules for Adaptive Gradient Algorithms", NeurIPS 2022), and a warm-up over the same number of
images (warmup_steps * 16 / B steps). An explicit `--batch-size N` changes neither.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from cityseg.config import AUTO, Config
from cityseg.outputs import atomic_file, cache_dir

REFERENCE_BATCH = 16  # the default lr and warm-up were tuned here; auto's answer on a CPU
CANDIDATES = (16, 32, 64, 128, 256)  # the GPU's trial batches, up to the data's cap
MIN_STEPS_PER_EPOCH = 50  # an epoch of the full Kaggle set (2975 pairs) then allows up to batch 59
THROUGHPUT_TOLERANCE = 0.05  # the smallest batch within 5 % of the best images/s wins
MEMORY_SHARE = 0.80  # of the GPU memory free at start; the rest: the DALI pool, allocator slack
CACHE_FILE = "batch-size.json"


@dataclass(frozen=True)
class Trial:
    """One measured trial step at `batch`: images/s (0 when it did not run) and the bytes the CUDA
    caching allocator reserved at its peak (inf when it ran out of memory)."""

    batch: int
    images_per_s: float
    reserved_bytes: float


@dataclass(frozen=True)
class BatchChoice:
    """What auto chose and why: recorded in config.json ("resolved") and printed at start."""

    batch: int
    reason: str
    upper: int  # the data's cap
    trials: tuple[Trial, ...] = field(default=())

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"batch_size": self.batch, "reason": self.reason, "cap": self.upper}
        if self.trials:
            record["trials"] = [{k: (None if v == math.inf else v) for k, v in asdict(t).items()} for t in self.trials]
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> BatchChoice:
        trials = tuple(Trial(t["batch"], t["images_per_s"], math.inf if t["reserved_bytes"] is None
                             else t["reserved_bytes"]) for t in record.get("trials", ()))
        return cls(int(record["batch_size"]), str(record["reason"]), int(record["cap"]), trials)

    def summary(self) -> str:
        """One line: the batch, why, and the trials' images/s."""
        line = f"batch size auto: {self.batch} per {'GPU' if self.trials else 'process'} ({self.reason})"
        if self.trials:
            line += "; trials " + ", ".join(
                f"{t.batch}: {t.images_per_s:,.0f} img/s {t.reserved_bytes / 2**30:.1f} GiB"
                if math.isfinite(t.reserved_bytes) else f"{t.batch}: out of memory" for t in self.trials)
        return line


def data_cap(train_files: int, world_size: int) -> int:
    """The largest batch the data allows a rank: at least MIN_STEPS_PER_EPOCH steps an epoch (but
    never below the reference batch), and never more than the rank's files."""
    per_rank = max(1, train_files // max(1, world_size))
    return min(per_rank, max(REFERENCE_BATCH, per_rank // MIN_STEPS_PER_EPOCH))


def cpu_choice(train_files: int, world_size: int) -> BatchChoice:
    """A CPU's auto: the reference batch, or a rank's file count when that is smaller."""
    upper = data_cap(train_files, world_size)
    if upper < REFERENCE_BATCH:
        return BatchChoice(upper, f"{train_files} training files allow no batch of {REFERENCE_BATCH}", upper)
    return BatchChoice(REFERENCE_BATCH, "the reference batch on a CPU", upper)


def trial_batches(upper: int) -> list[int]:
    """The candidates a GPU measures: CANDIDATES up to `upper` (or `upper` alone when it is below them)."""
    return [b for b in CANDIDATES if b <= upper] or [upper]


def choose_by_throughput(trial: Callable[[int], Trial], upper: int, free_bytes: float, share: float = MEMORY_SHARE,
                         tolerance: float = THROUGHPUT_TOLERANCE) -> BatchChoice:
    """The smallest batch within `tolerance` of the best measured images/s whose reserved memory fits
    `share` of `free_bytes`. Trials stop at the first that does not fit (a larger one needs more)."""
    budget = share * free_bytes
    trials: list[Trial] = []
    for batch in trial_batches(upper):
        trials.append(trial(batch))
        if trials[-1].reserved_bytes > budget:
            break
    fitting = [t for t in trials if t.reserved_bytes <= budget and t.images_per_s > 0]
    if not fitting:
        smallest = trial_batches(upper)[0]
        return BatchChoice(smallest, f"no trial fitted {share:.0%} of the free memory: the smallest candidate",
                           upper, tuple(trials))
    best = max(t.images_per_s for t in fitting)
    chosen = min(t.batch for t in fitting if t.images_per_s >= (1 - tolerance) * best)
    reason = f"the smallest batch within {tolerance:.0%} of the best, {best:,.0f} img/s"
    if trials[-1].reserved_bytes > budget:
        reason += f"; batch {trials[-1].batch} needs more than {share:.0%} of the free memory"
    elif upper < CANDIDATES[-1]:
        reason += f"; capped at {upper} by the data ({MIN_STEPS_PER_EPOCH} steps an epoch, or batch {REFERENCE_BATCH})"
    return BatchChoice(chosen, reason, upper, tuple(trials))


def scaled_schedule(lr: float, warmup_steps: int, batch: int, reference: int = REFERENCE_BATCH) -> tuple[float, int]:
    """(lr, warm-up steps) for `batch` from those tuned at `reference`: sqrt scaling of the lr, the
    warm-up over the same number of images."""
    ratio = batch / reference
    return lr * math.sqrt(ratio), max(1, round(warmup_steps / ratio)) if warmup_steps else 0


def apply_choice(cfg: Config, choice: BatchChoice) -> Config:
    """`cfg` (batch size auto) with the chosen batch and the lr and warm-up that follow it."""
    assert cfg.data.batch_size == AUTO, "an explicit batch size keeps its lr and warm-up"
    lr, warmup = scaled_schedule(cfg.train.lr, cfg.train.warmup_steps, choice.batch)
    return replace(cfg, data=replace(cfg.data, batch_size=choice.batch),
                   train=replace(cfg.train, lr=lr, warmup_steps=warmup))


# The GPU's answer is measured once per (GPU, software, run shape) and kept in the cache folder.

def cache_key(cfg: Config, device_name: str, torch_version: str, world_size: int, upper: int) -> str:
    """Everything the trial's figures depend on: the GPU and torch, the model and its input, precision,
    loss and compile settings, and what else shares the GPU's memory (loader, EMA copy, DDP buckets)."""
    m, d, t = cfg.model, cfg.data, cfg.train
    return "|".join(str(v) for v in (
        device_name, torch_version, f"encoder={m.encoder}", f"width={m.width}", f"depth={m.depth}", m.upsample, m.norm,
        f"classes={m.num_classes}", f"size={d.image_size}", t.precision, f"compile={t.compile}:{t.compile_mode}",
        t.loss, f"loader={d.loader}", f"ema={t.ema > 0}", f"ranks={world_size}", f"cap={upper}",
    ))


def cache_path() -> Path:
    return cache_dir() / CACHE_FILE


def read_cache(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):  # absent or half-written by a crashed run: measure again
        return {}
    return found if isinstance(found, dict) else {}


def cached_choice(key: str, path: Path | None = None) -> BatchChoice | None:
    """The choice measured before for `key`, or None (absent, or written by an older version)."""
    record = read_cache(path or cache_path()).get(key)
    try:
        return BatchChoice.from_record(record) if isinstance(record, dict) else None
    except (KeyError, TypeError, ValueError):
        return None


def remember_choice(key: str, choice: BatchChoice, path: Path | None = None) -> None:
    """Add `key` atomically (a temp file renamed over the old one); a read-only cache is not an error."""
    path = path or cache_path()
    entries = read_cache(path) | {key: choice.to_record()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as f:
            f.write(json.dumps(entries, indent=1, sort_keys=True).encode())
    except OSError:
        pass
