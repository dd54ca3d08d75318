"""Throughput telemetry: images/s after warm-up, the share of step time spent waiting for data, and
GPU utilisation / memory / power sampled by a pynvml thread (n/a without an NVIDIA GPU); and when
this process started, the zero of the run's honest timing (`process_start`)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from statistics import mean
from typing import Any

import torch

IMPORTED_AT = time.perf_counter()  # the fallback zero where /proc is missing: cityseg's own import


def process_age_s() -> float | None:
    """Seconds since this process started, from the kernel (/proc/self/stat field 22, in clock ticks
    since boot, against /proc/uptime); None without /proc (macOS)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)", which may hold spaces
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def process_start() -> tuple[float, str]:
    """(the process's start on the `time.perf_counter` clock, what that zero is): the kernel's
    process start (interpreter start-up and imports included, 10 ms resolution), else the moment
    `cityseg.telemetry` was imported."""
    age = process_age_s()
    if age is None:
        return IMPORTED_AT, "import of cityseg"
    return time.perf_counter() - age, "process start"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class EpochMeter:
    """Wall time split into waiting for the next batch and everything else, per epoch.

    Training compiles and autotunes before its clock starts (cityseg/training/warmup.py), so by
    default every step counts; `warmup_steps` > 0 keeps the first steps out of images/s (their clock
    starts after a device sync at the end of them), for a loop without that warm-up.

    The host's wait in `next()` misses what a device-side loader (DALI, the device cache) queues on
    the training stream: mask mapping, casts, augmentation of cached batches run there after `next()`
    has returned, and delay the step that follows. On a GPU, `loading()` brackets each `next()` with
    CUDA events on the current stream: their elapsed time is the loader's own GPU time there, read
    once at the epoch's end (no sync per step) as `loader_gpu_share` beside the host's wait.
    """

    device: torch.device
    warmup_steps: int = 0
    clock: Callable[[], float] = time.perf_counter  # tests pass a fake one
    event: Callable[[], Any] | None = None  # a timing event on the device's stream; default: CUDA's on a GPU
    steps: int = 0
    images: int = 0
    data_wait: float = 0.0
    start: float = field(init=False)
    timed_start: float | None = None
    timed_images: int = 0

    def __post_init__(self) -> None:
        self.start = self.clock()
        if self.event is None and self.device.type == "cuda":
            self.event = lambda: torch.cuda.Event(enable_timing=True)
        self.loader_spans: list[tuple[Any, Any]] = []

    def waited(self, seconds: float) -> None:
        self.data_wait += seconds

    @contextmanager
    def loading(self) -> Iterator[None]:
        """Around a `next()` of the loader: its host wait, and on a GPU its work on the training stream."""
        start = self.clock()
        if self.event is not None:
            begin, end = self.event(), self.event()
            begin.record()
        try:
            yield
        finally:
            if self.event is not None:
                end.record()
                self.loader_spans.append((begin, end))
            self.waited(self.clock() - start)

    def loader_gpu_seconds(self) -> float | None:
        """The loader's GPU time on the training stream this epoch (after a sync); None on a CPU."""
        if self.event is None:
            return None
        return sum(begin.elapsed_time(end) for begin, end in self.loader_spans) / 1000

    def step_done(self, batch_size: int) -> None:
        self.steps += 1
        self.images += batch_size
        if self.steps == self.warmup_steps:
            synchronize(self.device)
            self.timed_start = self.clock()
        elif self.timed_start is not None:
            self.timed_images += batch_size

    def summary(self) -> dict[str, float | None]:
        synchronize(self.device)
        now = self.clock()
        seconds = now - self.start
        timed = now - self.timed_start if self.timed_start is not None else 0.0
        if self.timed_images and timed > 0:
            images_per_s = self.timed_images / timed
        else:  # too few steps to exclude the warm-up: report the plain rate
            images_per_s = self.images / seconds if seconds > 0 else 0.0
        loader_gpu = self.loader_gpu_seconds()
        return {
            "images_per_s": images_per_s,
            "data_wait_share": self.data_wait / seconds if seconds > 0 else 0.0,
            "loader_gpu_share": None if loader_gpu is None else (loader_gpu / seconds if seconds > 0 else 0.0),
            "seconds": seconds,
            "images": self.images,
            "timed_images": self.timed_images,
            "timed_seconds": timed,
        }


def nvml_target(torch_index: int, visible_devices: str | None) -> int | str:
    """Which GPU NVML must open for torch's `cuda:<torch_index>`: a physical index, or a UUID (or the
    prefix of one, which CUDA accepts) such as "GPU-5ee4..." or "MIG-9a0f...".

    NVML ignores CUDA_VISIBLE_DEVICES and numbers every GPU of the machine; CUDA numbers only the
    visible ones, in the order listed. With CUDA_VISIBLE_DEVICES=2,3 (Slurm, shared hosts) torch's
    cuda:0 is NVML's device 2."""
    if visible_devices is None:
        return torch_index
    entries = [e.strip() for e in visible_devices.split(",")]
    if torch_index >= len(entries) or not entries[torch_index]:
        raise ValueError(f"cuda:{torch_index} is not in CUDA_VISIBLE_DEVICES={visible_devices!r}")
    entry = entries[torch_index]
    return int(entry) if entry.isascii() and entry.isdigit() else entry


def open_nvml_handle(nvml, target: int | str):
    """The NVML handle of `target` (see `nvml_target`)."""
    if isinstance(target, int):
        return nvml.nvmlDeviceGetHandleByIndex(target)
    try:
        return nvml.nvmlDeviceGetHandleByUUID(target)
    except nvml.NVMLError:  # a UUID prefix: find the one device it names
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            if str(nvml.nvmlDeviceGetUUID(handle)).startswith(target):
                return handle
        raise


class GpuSampler:
    """Samples GPU utilisation, memory and power at `hz` in a daemon thread via NVML, and SM
    activity from NVML GPM metrics where the GPU has them (Hopper and newer).

    Each field is read on its own: a field the GPU does not support (utilisation on a MIG slice,
    power on some vGPUs) reads None while the others keep their values. Without NVML (no NVIDIA
    driver, or a CPU run) every field reads None ("n/a"). Never raises; an unexpected error is kept
    in `problem` (and the sampling goes on) rather than ending the thread silently.
    """

    FIELDS = ("gpu_util", "gpu_mem_gib", "gpu_power_w", "sm_activity")

    def __init__(self, device: torch.device, hz: float = 10.0, clock: Callable[[], float] = time.perf_counter) -> None:
        self.device = device
        self.interval = 1.0 / hz
        self.clock = clock
        # (t, util %, mem GiB, power W, SM activity %), each field None where unsupported
        self.samples: list[tuple[float, float | None, float | None, float | None, float | None]] = []
        self.problem: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = None
        self._handle = self._open_handle()
        self._gpm = self._open_gpm()

    def _open_handle(self):
        if self.device.type != "cuda":
            return None
        try:
            import pynvml

            pynvml.nvmlInit()
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            handle = open_nvml_handle(pynvml, nvml_target(index, os.environ.get("CUDA_VISIBLE_DEVICES")))
        except Exception as e:  # noqa: BLE001 - NVML missing or unsupported: telemetry reads n/a
            self.problem = f"NVML unavailable ({type(e).__name__}: {e})"
            return None
        self._nvml = pynvml
        return handle

    def _open_gpm(self) -> list | None:
        """Two GPM sample buffers (a metric is the difference of two samples), or None."""
        if self._handle is None:
            return None
        nvml = self._nvml
        try:
            if not nvml.nvmlGpmQueryDeviceSupport(self._handle).isSupportedDevice:
                return None
            first = nvml.nvmlGpmSampleAlloc()
            nvml.nvmlGpmSampleGet(self._handle, first)
            return [first, nvml.nvmlGpmSampleAlloc()]
        except (nvml.NVMLError, AttributeError):  # pre-Hopper GPU or an old driver / binding
            return None

    def _sm_activity(self) -> float | None:
        if self._gpm is None:
            return None
        nvml = self._nvml
        previous, current = self._gpm
        nvml.nvmlGpmSampleGet(self._handle, current)
        request = nvml.c_nvmlGpmMetricsGet_t()
        request.version = nvml.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = 1
        request.sample1, request.sample2 = previous, current
        request.metrics[0].metricId = nvml.NVML_GPM_METRIC_SM_UTIL
        nvml.nvmlGpmMetricsGet(request)
        self._gpm = [current, previous]
        if request.metrics[0].nvmlReturn != nvml.NVML_SUCCESS:  # the call succeeds, one metric may not
            return None
        return float(request.metrics[0].value)

    def _field(self, read: Callable[[], float | None]) -> float | None:
        try:
            value = read()
        except self._nvml.NVMLError:  # not supported on this GPU (MIG, vGPU), or not at this moment
            return None
        except Exception as e:  # noqa: BLE001 - a bug must not end the sampler; keep it for the report
            self.problem = self.problem or f"{type(e).__name__}: {e}"
            return None
        return None if value is None else float(value)

    def read(self) -> tuple[float, float | None, float | None, float | None, float | None]:
        """One sample: (seconds, util %, memory GiB, power W, SM activity %)."""
        nvml, h = self._nvml, self._handle
        return (
            self.clock(),
            self._field(lambda: nvml.nvmlDeviceGetUtilizationRates(h).gpu),
            self._field(lambda: nvml.nvmlDeviceGetMemoryInfo(h).used / 2**30),
            self._field(lambda: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0),
            self._field(self._sm_activity),
        )

    @property
    def available(self) -> bool:
        return self._handle is not None

    def start(self) -> GpuSampler:
        if self.available and self._thread is None:
            self._t0 = self.clock()
            self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            t, *values = self.read()
            self.samples.append((t - self._t0, *values))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None

    def mark(self) -> int:
        """Index to pass to `summary(since=...)` for the samples taken from now on."""
        return len(self.samples)

    def summary(self, since: int = 0, windows: list[tuple[int, int]] | None = None) -> dict[str, float | None]:
        """Mean utilisation, power and SM activity, peak memory, over the samples since `since` (or
        those inside `windows`, (start, end) marks: training steps only); a field no sample had is None."""
        window = self.samples[since:] if windows is None else [s for a, b in windows for s in self.samples[a:b]]
        columns = [[s[i] for s in window if s[i] is not None] for i in range(1, 5)]
        util, mem, power, sm = columns
        return {
            "gpu_util": mean(util) if util else None,
            "gpu_mem_gib": max(mem) if mem else None,
            "gpu_power_w": mean(power) if power else None,
            "sm_activity": mean(sm) if sm else None,
        }

    def latest_util(self) -> float | None:
        return self.samples[-1][1] if self.samples else None


def fmt(value: float | None, spec: str = ".1f", unit: str = "") -> str:
    """Format a telemetry value, `n/a` for None."""
    return "n/a" if value is None else f"{value:{spec}}{unit}"
