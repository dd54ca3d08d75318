"""Telemetry: throughput and data-wait share, the NVML sampler (n/a on CPU, real values from a
fake NVML), and the profile command."""

from __future__ import annotations

import json
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cityseg.cli import app
from cityseg.telemetry import EpochMeter, GpuSampler, nvml_target
from tests.test_bad_inputs import TINY


class FakeClock:
    """A clock that moves only when told: exact telemetry figures, whatever the machine's load."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_epoch_meter_excludes_warmup_and_measures_wait() -> None:
    clock = FakeClock()
    meter = EpochMeter(torch.device("cpu"), warmup_steps=2, clock=clock)
    for step in range(6):
        meter.waited(0.25)
        clock.now += 0.25 + (2.0 if step < 2 else 0.5)  # the wait, then compute: slow warm-up steps
        meter.step_done(4)
    stats = meter.summary()
    assert stats["images"] == 24 and stats["timed_images"] == 16
    assert stats["seconds"] == 2 * 2.25 + 4 * 0.75  # 7.5 s in all
    assert stats["timed_seconds"] == 4 * 0.75  # from the end of warm-up step 2
    assert stats["images_per_s"] == 16 / 3.0
    assert stats["data_wait_share"] == 6 * 0.25 / 7.5


def test_epoch_meter_without_enough_steps_reports_the_plain_rate() -> None:
    clock = FakeClock()
    meter = EpochMeter(torch.device("cpu"), warmup_steps=5, clock=clock)
    clock.now += 2.0
    meter.step_done(8)
    assert meter.summary()["images_per_s"] == 4.0


def test_gpu_sampler_reads_na_without_a_gpu() -> None:
    sampler = GpuSampler(torch.device("cpu")).start()
    sampler.stop()
    assert not sampler.available and sampler.samples == []
    assert sampler.summary() == {"gpu_util": None, "gpu_mem_gib": None, "gpu_power_w": None, "sm_activity": None}


def fake_nvml(gpm: bool = True, util_supported: bool = True, power_error: Exception | None = None,
              gpm_return: int = 0, uuids: tuple[str, ...] = ("GPU-aaaa-0", "GPU-bbbb-1", "GPU-cccc-2")
              ) -> types.ModuleType:
    """Just enough of pynvml for the sampler: utilisation 50 %, 2 GiB used, 300 W, SM 40 %; handles
    are the physical indices, so tests can see which GPU was opened."""
    m = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    class Metric:
        def __init__(self) -> None:
            self.metricId, self.value, self.nvmlReturn = 0, 0.0, 0

    class MetricsGet:
        def __init__(self) -> None:
            self.metrics = [Metric()]

    def metrics_get(request):
        request.metrics[0].value = 40.0
        request.metrics[0].nvmlReturn = gpm_return
        return request

    def utilization(handle):
        if not util_supported:
            raise NVMLError("Not Supported")
        return types.SimpleNamespace(gpu=50)

    def power(handle):
        if power_error is not None:
            raise power_error
        return 300_000

    def by_uuid(uuid):
        if uuid not in uuids:
            raise NVMLError("Not Found")
        return uuids.index(uuid)

    m.NVMLError = NVMLError
    m.NVML_SUCCESS = 0
    m.nvmlInit = lambda: None
    m.nvmlDeviceGetCount = lambda: len(uuids)
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetHandleByUUID = by_uuid
    m.nvmlDeviceGetUUID = lambda h: uuids[h]
    m.nvmlDeviceGetUtilizationRates = utilization
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=2 * 2**30)
    m.nvmlDeviceGetPowerUsage = power
    m.nvmlGpmQueryDeviceSupport = lambda h: types.SimpleNamespace(isSupportedDevice=int(gpm))
    m.nvmlGpmSampleAlloc = object
    m.nvmlGpmSampleGet = lambda h, s: s
    m.c_nvmlGpmMetricsGet_t = MetricsGet
    m.NVML_GPM_METRICS_GET_VERSION = 1
    m.NVML_GPM_METRIC_SM_UTIL = 2
    m.nvmlGpmMetricsGet = metrics_get
    return m


@pytest.fixture
def no_visible_devices_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


@pytest.mark.parametrize("gpm", [True, False])
def test_gpu_sampler_with_nvml(monkeypatch: pytest.MonkeyPatch, no_visible_devices_setting: None, gpm: bool) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(gpm))
    clock = FakeClock()
    sampler = GpuSampler(torch.device("cuda", 0), clock=clock)
    assert sampler.read() == (100.0, 50.0, 2.0, 300.0, 40.0 if gpm else None)
    sampler.samples = [sampler.read(), sampler.read()]
    assert sampler.summary() == {"gpu_util": 50, "gpu_mem_gib": 2, "gpu_power_w": 300,
                                 "sm_activity": 40.0 if gpm else None}


def test_unsupported_field_keeps_the_others(monkeypatch: pytest.MonkeyPatch, no_visible_devices_setting: None) -> None:
    """A MIG slice has no utilisation counter; GPM may fail one metric while the call succeeds."""
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(util_supported=False, gpm_return=3))
    sampler = GpuSampler(torch.device("cuda", 0), clock=FakeClock())
    assert sampler.read() == (100.0, None, 2.0, 300.0, None)
    assert sampler.problem is None


def test_unexpected_error_is_kept_not_fatal(monkeypatch: pytest.MonkeyPatch, no_visible_devices_setting: None) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(power_error=ValueError("odd reading")))
    sampler = GpuSampler(torch.device("cuda", 0), clock=FakeClock())
    assert sampler.read() == (100.0, 50.0, 2.0, None, 40.0)
    assert sampler.problem == "ValueError: odd reading"


def test_sampler_thread_samples_until_stopped(monkeypatch: pytest.MonkeyPatch,
                                              no_visible_devices_setting: None) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    sampler = GpuSampler(torch.device("cuda", 0), hz=200).start()
    deadline = time.monotonic() + 30  # a liveness bound, not a speed claim
    while len(sampler.samples) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    sampler.stop()
    assert len(sampler.samples) >= 2 and sampler._thread is None
    assert all(s[1:] == (50.0, 2.0, 300.0, 40.0) for s in sampler.samples)


@pytest.mark.parametrize("visible,index,expected", [
    (None, 1, 1),
    ("2,3", 0, 2),
    ("2,3", 1, 3),
    (" 3 , 1", 1, 1),
    ("GPU-bbbb-1,0", 0, "GPU-bbbb-1"),
    ("MIG-1234", 0, "MIG-1234"),
])
def test_nvml_target_follows_cuda_visible_devices(visible: str | None, index: int, expected: int | str) -> None:
    assert nvml_target(index, visible) == expected


def test_nvml_target_outside_the_visible_list() -> None:
    with pytest.raises(ValueError, match="not in CUDA_VISIBLE_DEVICES"):
        nvml_target(2, "0,1")


@pytest.mark.parametrize("visible,physical", [("2,0", 2), ("GPU-cccc-2", 2), ("GPU-bbbb", 1), ("1", 1)])
def test_sampler_opens_the_gpu_torch_uses(monkeypatch: pytest.MonkeyPatch, visible: str, physical: int) -> None:
    """torch's cuda:0 under CUDA_VISIBLE_DEVICES: by index, full UUID, or UUID prefix."""
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert GpuSampler(torch.device("cuda", 0))._handle == physical


def test_cpu_run_reports_throughput_and_na_gpu_fields(tmp_path: Path) -> None:
    from tests.conftest import make_pair_dataset

    data = make_pair_dataset(tmp_path / "data")
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1",
                                      *TINY])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["images_per_s"] > 0 and 0 <= record["data_wait_share"] < 1
    assert record["gpu_util"] is None and record["sm_activity"] is None
    assert "gpu n/a" in result.output


def test_profile_writes_trace_table_and_timeline(tmp_path: Path) -> None:
    from tests.conftest import make_pair_dataset

    data = make_pair_dataset(tmp_path / "data")
    out = tmp_path / "prof"
    result = CliRunner().invoke(app, ["profile", "--steps", "2", "--out", str(out), "--data", str(data), *TINY])
    assert result.exit_code == 0, result.output
    for name in ("trace.json", "top_ops.txt", "gpu_timeline.png"):
        assert (out / name).is_file(), name
    assert "aten::" in (out / "top_ops.txt").read_text()
    assert "data-wait share" in result.output
    json.loads((out / "trace.json").read_text())


class FakeEvent:
    """A CUDA timing event's stand-in: `record()` reads a fake clock (ms), as the GPU would on its stream."""

    def __init__(self, gpu_ms: list[float]) -> None:
        self.gpu_ms, self.at = gpu_ms, None

    def record(self) -> None:
        self.at = self.gpu_ms[0]

    def elapsed_time(self, end: FakeEvent) -> float:
        return end.at - self.at


def test_a_device_side_loaders_gpu_time_is_reported_beside_the_host_wait() -> None:
    """Three `next()` calls: 10 ms of host wait each (the fake host clock), and the loader's kernels on
    the training stream take 30 ms each (the fake stream clock): data_wait_share counts the host's 30 ms,
    loader_gpu_share the stream's 90 ms, over the epoch's 1 s. On a CPU there is no such figure."""
    clock, gpu_ms = FakeClock(), [0.0]
    meter = EpochMeter(torch.device("cpu"), clock=clock, event=lambda: FakeEvent(gpu_ms))
    for _ in range(3):
        with meter.loading():
            clock.now += 0.010
            gpu_ms[0] += 30.0
        meter.step_done(4)
    clock.now += 1.0 - 0.030
    stats = meter.summary()
    assert stats["data_wait_share"] == pytest.approx(0.030)
    assert stats["loader_gpu_share"] == pytest.approx(0.090)
    assert EpochMeter(torch.device("cpu")).summary()["loader_gpu_share"] is None
