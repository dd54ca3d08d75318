"""TensorBoard event files in the run folder (rank 0): `tensorboard --logdir runs/`."""

from __future__ import annotations

from typing import Any

from cityseg.metrics import SegMetrics
from cityseg.outputs import writing
from cityseg.report import sample_grid
from cityseg.training.hook import HookBase
from cityseg.training.hooks.samples import first_val_batch, predict_samples


class TensorBoard(HookBase):
    """Loss and lr on log steps (values the loop already read, no extra device sync), and per
    validation val loss, pixel accuracy, mIoU, per-class IoU, images/s, data-wait share, GPU fields
    and the samples image."""

    SCALARS = ("val_loss", "pixel_acc", "miou", "images_per_s", "data_wait_share", "loader_gpu_share", "gpu_util",
               "gpu_mem_gib", "gpu_power_w", "sm_activity")

    def events(self) -> Any:
        """Where the writer's errors surface (its thread writes; a full disk shows at the next call):
        one line naming the event files."""
        return writing(self.trainer.run.root / "events.out.tfevents.*", "TensorBoard event file")

    def before_train(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        t = self.trainer
        # purge_step: a resumed run rewrites what a killed session logged after its last checkpoint
        with self.events():
            self.writer = SummaryWriter(str(t.run.root), purge_step=t.global_step + 1 if t.global_step else None)

    def after_step(self) -> None:
        t = self.trainer
        if t.log_step:
            with self.events():
                self.writer.add_scalar("train/loss", t.loss_value, t.global_step)
                self.writer.add_scalar("train/lr", t.parts.optimizer.param_groups[0]["lr"], t.global_step)

    def after_epoch(self, record: dict[str, Any], metrics: SegMetrics) -> None:
        with self.events():
            self.write_epoch(record)

    def write_epoch(self, record: dict[str, Any]) -> None:
        t, step = self.trainer, record["step"]
        self.add_samples(step)
        self.writer.add_scalar("train/epoch_loss", record["loss"], step)
        for key in self.SCALARS:
            if record.get(key) is not None:
                self.writer.add_scalar(f"val/{key}" if key in ("val_loss", "pixel_acc", "miou") else f"perf/{key}",
                                       record[key], step)
        for name, iou in zip(t.data.palette.names, record["per_class_iou"], strict=True):
            if iou is not None:
                self.writer.add_scalar(f"val_iou/{name}", iou, step)
        self.writer.flush()

    def add_samples(self, step: int) -> None:
        """Photo | truth | prediction of a few val images at each validation, as one image tensor."""
        t = self.trainer
        if getattr(self, "batch", None) is None:  # the same images every epoch: one extra val read per run
            self.batch = first_val_batch(t)
        self.writer.add_image("samples", sample_grid(*predict_samples(t, self.batch), t.data.palette), step)

    def after_train(self) -> None:
        if getattr(self, "writer", None) is not None:  # None: creating it failed
            with self.events():
                self.writer.close()
