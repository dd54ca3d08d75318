"""Throughput telemetry: images/s after warm-up, the share of step time spent waiting for data, and
GPU utilisation / memory / power sampled by a pynvml thread (n/a without an NVIDIA GPU)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from statistics import mean

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class EpochMeter:
    """Wall time split into waiting for the next batch and everything else, per epoch.

    The first `warmup_steps` steps (compile, cuDNN autotuning, worker start-up) are kept out of
    images/s; the clock for it starts after a device sync at the end of the warm-up.
    """

    device: torch.device
    warmup_steps: int = 5
    steps: int = 0
    images: int = 0
    data_wait: float = 0.0
    start: float = field(default_factory=time.perf_counter)
    timed_start: float | None = None
    timed_images: int = 0

    def waited(self, seconds: float) -> None:
        self.data_wait += seconds

    def step_done(self, batch_size: int) -> None:
        self.steps += 1
        self.images += batch_size
        if self.steps == self.warmup_steps:
            synchronize(self.device)
            self.timed_start = time.perf_counter()
        elif self.timed_start is not None:
            self.timed_images += batch_size

    def summary(self) -> dict[str, float | None]:
        synchronize(self.device)
        now = time.perf_counter()
        seconds = now - self.start
        timed = now - self.timed_start if self.timed_start is not None else 0.0
        if self.timed_images and timed > 0:
            images_per_s = self.timed_images / timed
        else:  # too few steps to exclude the warm-up: report the plain rate
            images_per_s = self.images / seconds if seconds > 0 else 0.0
        return {
            "images_per_s": images_per_s,
            "data_wait_share": self.data_wait / seconds if seconds > 0 else 0.0,
            "seconds": seconds,
            "images": self.images,
            "timed_images": self.timed_images,
            "timed_seconds": timed,
        }


class GpuSampler:
    """Samples GPU utilisation, memory and power at `hz` in a daemon thread via NVML, and SM
    activity from NVML GPM metrics where the GPU has them (Hopper and newer).

    Without NVML (no NVIDIA driver, or a CPU run) every field reads None ("n/a"); never raises.
    """

    def __init__(self, device: torch.device, hz: float = 10.0) -> None:
        self.device = device
        self.interval = 1.0 / hz
        # (t, util %, mem GiB, power W, SM activity % or None)
        self.samples: list[tuple[float, float, float, float, float | None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handle = self._open_handle()
        self._gpm = self._open_gpm()

    def _open_handle(self):
        if self.device.type != "cuda":
            return None
        try:
            import pynvml

            pynvml.nvmlInit()
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            return pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:  # noqa: BLE001 - NVML missing or unsupported: telemetry reads n/a
            return None

    def _open_gpm(self) -> list | None:
        """Two GPM sample buffers (a metric is the difference of two samples), or None."""
        if self._handle is None:
            return None
        import pynvml

        try:
            if not pynvml.nvmlGpmQueryDeviceSupport(self._handle).isSupportedDevice:
                return None
            first = pynvml.nvmlGpmSampleAlloc()
            pynvml.nvmlGpmSampleGet(self._handle, first)
            return [first, pynvml.nvmlGpmSampleAlloc()]
        except (pynvml.NVMLError, AttributeError):  # pre-Hopper GPU or an old driver / binding
            return None

    def _sm_activity(self) -> float | None:
        import pynvml

        if self._gpm is None:
            return None
        previous, current = self._gpm
        pynvml.nvmlGpmSampleGet(self._handle, current)
        request = pynvml.c_nvmlGpmMetricsGet_t()
        request.version = pynvml.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = 1
        request.sample1, request.sample2 = previous, current
        request.metrics[0].metricId = pynvml.NVML_GPM_METRIC_SM_UTIL
        pynvml.nvmlGpmMetricsGet(request)
        self._gpm = [current, previous]
        return float(request.metrics[0].value)

    @property
    def available(self) -> bool:
        return self._handle is not None

    def start(self) -> GpuSampler:
        if self.available and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        import pynvml

        t0 = time.perf_counter()
        while not self._stop.wait(self.interval):
            try:
                util = pynvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
                mem = pynvml.nvmlDeviceGetMemoryInfo(self._handle).used / 2**30
                power = pynvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0
                sm = self._sm_activity()
            except pynvml.NVMLError:
                continue
            self.samples.append((time.perf_counter() - t0, float(util), mem, power, sm))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None

    def mark(self) -> int:
        """Index to pass to `summary(since=...)` for the samples taken from now on."""
        return len(self.samples)

    def summary(self, since: int = 0) -> dict[str, float | None]:
        window = self.samples[since:]
        if not window:
            return {"gpu_util": None, "gpu_mem_gib": None, "gpu_power_w": None, "sm_activity": None}
        sm = [s[4] for s in window if s[4] is not None]
        return {
            "gpu_util": mean(s[1] for s in window),
            "gpu_mem_gib": max(s[2] for s in window),
            "gpu_power_w": mean(s[3] for s in window),
            "sm_activity": mean(sm) if sm else None,
        }

    def latest_util(self) -> float | None:
        return self.samples[-1][1] if self.samples else None


def fmt(value: float | None, spec: str = ".1f", unit: str = "") -> str:
    """Format a telemetry value, `n/a` for None."""
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def plot_gpu_timeline(samples: list[tuple], path) -> None:
    """GPU utilisation (and SM activity where measured) over time; says n/a without samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3))
    if samples:
        t = [s[0] for s in samples]
        ax.plot(t, [s[1] for s in samples], label="GPU utilisation %")
        if any(s[4] is not None for s in samples):
            ax.plot(t, [s[4] for s in samples], label="SM activity %")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no GPU samples (n/a: no NVIDIA GPU / NVML)", ha="center", va="center")
    ax.set_xlabel("seconds")
    ax.set_ylim(0, 105)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
