"""`--batch-size auto` on a CUDA GPU when the cache holds no answer yet: trial steps, compiled as the
run will compile them, at the candidate batches; the rule that picks from them is cityseg/batch_rule.py
(the smallest batch within 5 % of the best images/s that fits 80 % of the free memory).

    choice = measure_batch(cfg, rt, train_files=2975, world_size=1, console=console)

Each trial builds the run's model, optimiser, loss and step (TrainStep, with its compile mode and
CUDA graphs), runs the step's warm-up calls, then times TIMED_STEPS synchronised steps (median); its
memory is the peak the caching allocator *reserved* (what a graphed step's pools and workspaces
really hold, not only the live tensors), plus what the run keeps beside the step: an EMA copy of the
weights and DDP's gradient buckets. Between trials the step (a reference cycle: its compiled bound
method holds it) is collected and the allocator's cache emptied, so no trial inherits another's
memory; dynamo is reset so the trials' graphs do not count against the run's recompile limit (the
inductor cache on disk keeps the chosen shape's kernels: the run's own compile is then warm).
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from rich.console import Console
from torch.random import fork_rng

from cityseg.batch_rule import (
    BatchChoice,
    Trial,
    apply_choice,
    cache_key,
    cached_choice,
    choose_by_throughput,
    cpu_choice,
    data_cap,
    remember_choice,
    trial_batches,
)
from cityseg.config import Config
from cityseg.distributed import DistInfo, broadcast_object
from cityseg.runtime import Runtime

TIMED_STEPS = 5


def kept_beside_the_step(cfg: Config, model: torch.nn.Module, world_size: int) -> int:
    """Bytes a run holds that one trial step does not: an EMA copy of the weights, DDP's buckets."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights * ((cfg.train.ema > 0) + (world_size > 1))


def cuda_trial(cfg: Config, rt: Runtime, world_size: int) -> Callable[[int], Trial]:
    """trial(batch): images/s and reserved bytes of this run's compiled step on a random batch."""
    from cityseg.model import build_model
    from cityseg.training.losses import build_loss_fn
    from cityseg.training.setup import build_optimizer
    from cityseg.training.step import TrainStep

    device, size = rt.device, cfg.data.image_size

    def trial(batch: int) -> Trial:
        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_reserved(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            model = build_model(cfg.model).to(device, memory_format=torch.channels_last)
            optimizer = build_optimizer(model, cfg.train, device)
            scaler = torch.amp.GradScaler("cuda", enabled=rt.needs_grad_scaler)
            step = TrainStep(model, model, build_loss_fn(cfg.train.loss, None), optimizer, scaler, rt,
                             cfg.train.grad_clip)
            image = torch.randn(batch, 3, size, size, device=device, dtype=rt.batch_dtype)
            image = image.contiguous(memory_format=torch.channels_last)
            target = torch.randint(0, cfg.model.num_classes, (batch, size, size), device=device)
            for _ in range(step.warmup_calls):
                step(image, target)
            seconds = []
            for _ in range(TIMED_STEPS):
                torch.cuda.synchronize(device)
                start = time.perf_counter()
                step(image, target)
                torch.cuda.synchronize(device)
                seconds.append(time.perf_counter() - start)
            reserved = torch.cuda.max_memory_reserved(device) - base + kept_beside_the_step(cfg, model, world_size)
            return Trial(batch, batch / statistics.median(seconds), float(reserved))
        except torch.cuda.OutOfMemoryError:  # the measurement itself: this batch does not fit
            return Trial(batch, 0.0, math.inf)
        finally:
            model = optimizer = step = image = target = None  # noqa: F841 - dropped before collecting
            gc.collect()
            torch.cuda.empty_cache()
            torch._dynamo.reset()

    return trial


def measure_batch(cfg: Config, rt: Runtime, train_files: int, world_size: int, console: Console) -> BatchChoice:
    """The GPU's auto batch for this run: from the cache folder, else measured (and remembered)."""
    upper = data_cap(train_files, world_size)
    key = cache_key(cfg, torch.cuda.get_device_name(rt.device), torch.__version__, world_size, upper)
    found = cached_choice(key)
    if found is not None:
        return found
    console.print(f"batch size auto: timing compiled trial steps at {', '.join(map(str, trial_batches(upper)))} "
                  "(once for this GPU and run shape; remembered in the cache folder)", soft_wrap=True)
    with fork_rng(devices=[rt.device]):  # the trials' random weights and batches leave the run's RNG as it was
        choice = choose_by_throughput(cuda_trial(cfg, rt, world_size), upper, torch.cuda.mem_get_info(rt.device)[0])
    remember_choice(key, choice)
    return choice


def finish_auto_batch(cfg: Config, rt: Runtime, dist_info: DistInfo, train_files: int, console: Console
                      ) -> tuple[Config, dict[str, Any]]:
    """`cfg` with auto's batch (and lr, warm-up) when resolve_run could not say it before the files were
    listed: rank 0's measurement on every rank on a GPU, the CPU rule otherwise. The trials draw from
    a forked RNG (`measure_batch`), so the run is the same whether the answer was cached or not."""
    if rt.device.type == "cuda":
        measured = measure_batch(cfg, rt, train_files, dist_info.world_size, console) if dist_info.is_main else None
        choice = broadcast_object(measured, dist_info)
    else:
        choice = cpu_choice(train_files, dist_info.world_size)
    return apply_choice(cfg, choice), {"batch_size": choice.to_record()}
