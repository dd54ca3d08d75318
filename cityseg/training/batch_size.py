"""`--batch-size auto`: on a CUDA GPU, the largest batch from 16 to 256 whose training step fits
MEMORY_SHARE of the GPU memory free at start; on a CPU, the reference batch 16 (what it always was).

    cfg = resolve_batch_size(cfg, rt, dist_info, console)   # an int batch, lr and warm-up scaled

How: two trial steps (batch 16 and 32, eager, the run's precision and loss, a random batch) give a
linear memory model, bytes(B) = fixed + per_image * B (weights, gradients, AdamW moments and
workspaces are fixed; activations grow with B); the largest multiple of 16 under the share is then
confirmed by one trial step at that batch (one step down per failed trial). The answer is kept in
the cache folder (`batch-size.json`) keyed by GPU, torch version, model, image size, precision, loss
and compile mode, so a run finds it once. The 20 % left is for the allocator's fragmentation, cuDNN
workspaces, the CUDA-graph pools of a compiled step and the DALI loader.

The learning rate and warm-up were tuned at batch 16 (REFERENCE_BATCH); with batch B the run uses
lr * sqrt(B / 16), the square-root rule for Adam-type optimisers (Malladi et al., "On the SDEs and
Scaling Rules for Adaptive Gradient Algorithms", NeurIPS 2022), and a warm-up over the same number
of images (warmup_steps * 16 / B steps). An explicit `--batch-size N` changes neither.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from cityseg.config import AUTO, Config
from cityseg.distributed import DistInfo, broadcast_object
from cityseg.outputs import atomic_file, cache_dir
from cityseg.runtime import Runtime

REFERENCE_BATCH = 16  # the default lr and warm-up were tuned here; auto's answer on a CPU
MIN_BATCH, MAX_BATCH, BATCH_STEP = 16, 256, 16  # auto tries 16, 32, ..., 256
MEMORY_SHARE = 0.80  # of the GPU memory free at start
CACHE_FILE = "batch-size.json"


@dataclass(frozen=True)
class MemoryModel:
    """Peak bytes of a training step as a line in the batch size."""

    fixed: float
    per_image: float

    @classmethod
    def from_trials(cls, small: tuple[int, int], large: tuple[int, int]) -> MemoryModel:
        """From two (batch, peak bytes) trials; never below the larger trial's bytes per image."""
        (b1, m1), (b2, m2) = small, large
        per_image = max((m2 - m1) / (b2 - b1), 0.0)
        return cls(fixed=m2 - per_image * b2, per_image=per_image)

    def bytes_at(self, batch: int) -> float:
        return self.fixed + self.per_image * batch


def largest_batch(memory: MemoryModel, budget: float, lo: int = MIN_BATCH, hi: int = MAX_BATCH,
                  step: int = BATCH_STEP) -> int:
    """The largest of lo, lo + step, ..., hi that the model says fits `budget` bytes (lo if none)."""
    for batch in range(hi, lo - 1, -step):
        if memory.bytes_at(batch) <= budget:
            return batch
    return lo


def choose_batch(trial: Callable[[int], float], free_bytes: float, share: float = MEMORY_SHARE,
                 lo: int = MIN_BATCH, hi: int = MAX_BATCH, step: int = BATCH_STEP) -> int:
    """The largest batch whose `trial(batch)` (peak bytes of one step; inf when out of memory) fits
    `share` of `free_bytes`: the model's guess, confirmed by a trial, one step down per failure."""
    budget = share * free_bytes
    memory = MemoryModel.from_trials((lo, trial(lo)), (2 * lo, trial(2 * lo)))
    batch = largest_batch(memory, budget, lo, hi, step)
    while batch > lo and trial(batch) > budget:
        batch -= step
    return batch


def scaled_schedule(lr: float, warmup_steps: int, batch: int, reference: int = REFERENCE_BATCH) -> tuple[float, int]:
    """(lr, warm-up steps) for `batch` from those tuned at `reference`: sqrt scaling of the lr, the
    warm-up over the same number of images."""
    ratio = batch / reference
    return lr * math.sqrt(ratio), max(1, round(warmup_steps / ratio)) if warmup_steps else 0


def cache_key(cfg: Config, rt: Runtime, compile_mode: str | None) -> str:
    m = cfg.model
    return "|".join(str(v) for v in (
        torch.cuda.get_device_name(rt.device), torch.__version__, f"width={m.width}", f"depth={m.depth}",
        m.upsample, m.norm, f"classes={m.num_classes}", f"size={cfg.data.image_size}", rt.precision,
        f"compile={compile_mode if rt.compile else 'off'}", cfg.train.loss,
    ))


def read_cache(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):  # absent or half-written by a crashed run: measure again
        return {}
    return found if isinstance(found, dict) else {}


def write_cache(path: Path, key: str, batch: int) -> None:
    """Add `key` atomically (a temp file renamed over the old one); a read-only cache is not an error."""
    entries = read_cache(path) | {key: batch}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as f:
            f.write(json.dumps(entries, indent=1, sort_keys=True).encode())
    except OSError:
        pass


def cuda_trial(cfg: Config, rt: Runtime) -> Callable[[int], float]:
    """trial(batch): peak bytes allocated by one eager training step of this run's model, loss and
    optimiser on a random batch (inf when it runs out of memory). Eager: compiled steps fuse and
    keep fewer activations, so the eager peak is the safer side."""
    from cityseg.model import build_model
    from cityseg.training.losses import build_loss_fn
    from cityseg.training.setup import build_optimizer
    from cityseg.training.step import TrainStep

    eager = replace(rt, compile=False)

    def trial(batch: int) -> float:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(rt.device)
        torch.cuda.reset_peak_memory_stats(rt.device)
        try:
            model = build_model(cfg.model).to(rt.device, memory_format=torch.channels_last)
            optimizer = build_optimizer(model, cfg.train, rt.device)
            scaler = torch.amp.GradScaler("cuda", enabled=rt.needs_grad_scaler)
            step = TrainStep(model, model, build_loss_fn(cfg.train.loss, None), optimizer, scaler, eager, 1.0)
            size = cfg.data.image_size
            image = torch.randn(batch, 3, size, size, device=rt.device, dtype=rt.batch_dtype)
            target = torch.randint(0, cfg.model.num_classes, (batch, size, size), device=rt.device)
            step(image.contiguous(memory_format=torch.channels_last), target)
            torch.cuda.synchronize(rt.device)
            return float(torch.cuda.max_memory_allocated(rt.device) - base)
        except torch.cuda.OutOfMemoryError:  # the measurement itself: this batch does not fit
            return math.inf
        finally:
            torch.cuda.empty_cache()

    return trial


def auto_batch_cuda(cfg: Config, rt: Runtime, console: Console) -> int:
    from cityseg.training.step import step_compile_mode

    path = cache_dir() / CACHE_FILE
    key = cache_key(cfg, rt, step_compile_mode(rt, distributed=False))
    cached = read_cache(path).get(key)
    if isinstance(cached, int) and MIN_BATCH <= cached <= MAX_BATCH:
        return cached
    console.print(f"batch size auto: trial steps for the largest batch in {MEMORY_SHARE:.0%} of the free GPU memory "
                  "(once; remembered in the cache folder)", soft_wrap=True)
    batch = choose_batch(cuda_trial(cfg, rt), torch.cuda.mem_get_info(rt.device)[0])
    write_cache(path, key, batch)
    return batch


def resolve_batch_size(cfg: Config, rt: Runtime, dist_info: DistInfo, console: Console) -> Config:
    """`cfg` with an int batch size: `auto` becomes REFERENCE_BATCH on a CPU, or the GPU's largest
    fitting batch (rank 0's on every rank) with lr and warm-up scaled to it; says what it chose."""
    if cfg.data.batch_size != AUTO:
        return cfg
    if rt.device.type != "cuda":
        return replace(cfg, data=replace(cfg.data, batch_size=REFERENCE_BATCH))
    batch = broadcast_object(auto_batch_cuda(cfg, rt, console) if dist_info.is_main else None, dist_info)
    lr, warmup = scaled_schedule(cfg.train.lr, cfg.train.warmup_steps, batch)
    console.print(f"batch size auto: {batch} per GPU (lr {cfg.train.lr:g} -> {lr:.3g}, warm-up "
                  f"{cfg.train.warmup_steps} -> {warmup} steps: tuned at batch {REFERENCE_BATCH})", soft_wrap=True)
    return replace(cfg, data=replace(cfg.data, batch_size=batch), train=replace(cfg.train, lr=lr, warmup_steps=warmup))
