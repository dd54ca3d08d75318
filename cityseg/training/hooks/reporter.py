"""At the end of a run: summary.json (the timing breakdown included; also what `train()` returns),
curves.png, samples.png and gpu_timeline.png; also when a signal ended the run ("completed": false):
an interrupted run keeps its curves."""

from __future__ import annotations

import sys
from typing import Any

from cityseg.report import device_name, plot_curves, plot_gpu_timeline, time_to_thresholds, write_json
from cityseg.training.hook import HookBase
from cityseg.training.hooks.samples import draw_samples, first_val_batch
from cityseg.training.hooks.telemetry import Telemetry
from cityseg.training.interrupts import Interrupted


class Reporter(HookBase):
    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry

    def after_train(self) -> None:
        t = self.trainer
        # Called while fit's exception unwinds: a signal's `Interrupted` still gets its summary and pictures
        # (of the epochs done); an error does not (error.log says why), nor a second Ctrl-C (now means now).
        interrupted = isinstance(sys.exc_info()[1], Interrupted)
        if not t.history or not (t.completed or interrupted):
            return
        summary = self.make_summary()
        t.events.report_summary(summary)  # what `fit` returns
        if t.dist.is_main:
            write_json(t.run.summary, summary, "run summary")
            try:
                self.draw(interrupted)
            except Exception as e:  # noqa: BLE001 - interrupted: the resume hint must still come
                if not interrupted:
                    raise
                t.console.print(f"pictures not drawn: {e}", soft_wrap=True)

    def draw(self, interrupted: bool) -> None:
        t = self.trainer
        plot_curves(t.history, t.run.curves)
        if not interrupted:  # it reads the val loader, whose workers the signal may have ended
            self.write_samples()
        samples = self.telemetry.gpu.samples
        if samples:
            plot_gpu_timeline(samples, t.run.root / "gpu_timeline.png")

    def make_summary(self) -> dict[str, Any]:
        t = self.trainer
        history, timing, cfg = t.history, t.times.timing(), t.cfg.train
        images = t.global_step * t.cfg.data.batch_size * t.dist.world_size
        wall = timing["elapsed_s"] - timing["startup_s"] - timing["warmup_s"]
        return {
            "completed": t.completed,
            "final": history[-1],
            "best": max(history, key=lambda r: r["miou"] if r["miou"] is not None else -1.0),
            # when each val pixel accuracy was first seen: from the process start (what a user waits),
            # from the first step (wall), and on the training clock (what the budget counts)
            "time_to_pixel_acc_s": time_to_thresholds(history),
            "time_to_pixel_acc_from_first_step_s": time_to_thresholds(history, "wall_s"),
            "time_to_pixel_acc_train_clock_s": time_to_thresholds(history, "train_s"),
            "images_per_s": images / timing["train_s"] if timing["train_s"] > 0 else None,  # inside training steps
            "wall_images_per_s": images / wall if wall > 0 else None,  # from the first step, pauses included
            "images_trained": images,
            **timing,
            "time_zero": t.times.time_zero,  # what elapsed_s counts from: "process start" (or "start of train()")
            "compile_cache": t.compile_cache,
            "gpu_training": self.telemetry.training_summary(),
            "epochs": history[-1]["epoch"],
            "validations": len(history),
            "steps": t.global_step,
            "train_seconds": t.clock.seconds,
            "target_acc": cfg.target_acc,
            "target_reached_train_s": next((r["train_s"] for r in history if cfg.target_acc is not None
                                            and (r.get("pixel_acc") or 0) >= cfg.target_acc), None),
            "val_scored_at_px": t.data.val.spec.label_size,
            "device": device_name(t.rt.device),
            "precision": t.rt.precision,
            "compile": t.rt.compile,
            "loader": t.data.loader_kind,
            "cache": t.cfg.data.cache,
            "world_size": t.dist.world_size,
            "ddp": t.dist.enabled,
            "data": str(t.data.root),
            "run_dir": str(t.run.root),
            "versions": t.versions,
            **t.events.summary_fields,
        }

    def write_samples(self) -> None:
        t = self.trainer
        draw_samples(t, first_val_batch(t), t.run.samples)
