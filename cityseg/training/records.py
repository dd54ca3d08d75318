"""An epoch's record (a line of metrics.jsonl, before validation adds its scores): the training loss,
the pace and the data wait of the steps it covers, agreed over the ranks."""

from __future__ import annotations

from typing import Any

from cityseg.distributed import sum_over_ranks


def epoch_record(t: Any, finished: bool) -> dict[str, Any]:
    """`t.partial` holds the loss of the steps since the epoch's start (earlier sessions included)."""
    ws = t.dist.world_size
    stats = t.meter.summary()
    # Throughput adds up over ranks; the data-wait share is their mean.
    ips, wait = sum_over_ranks([stats["images_per_s"], stats["data_wait_share"]], t.dist, t.rt.device)
    return {
        "epoch": t.epoch + 1,
        "partial": not finished,  # stopped by --max-steps, the budget or a signal: last.pt resumes inside it
        "step": t.global_step,
        "train_s": t.clock.seconds,
        "loss": t.partial["loss_sum"] / max(1, t.partial["steps"]),
        "lr": t.parts.optimizer.param_groups[0]["lr"],
        "images_per_s": ips,
        "data_wait_share": wait / ws,
        # a device-side loader's own GPU time on the training stream (None on a CPU): rank 0's
        "loader_gpu_share": stats["loader_gpu_share"],
        "seconds": stats["seconds"],
        "timed_images": stats["timed_images"],
        "timed_seconds": stats["timed_seconds"],
    }
