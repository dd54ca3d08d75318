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
from cityseg.telemetry import EpochMeter, GpuSampler
from tests.test_bad_inputs import TINY


def test_epoch_meter_excludes_warmup_and_measures_wait() -> None:
    meter = EpochMeter(torch.device("cpu"), warmup_steps=2)
    for step in range(6):
        meter.waited(0.01)
        time.sleep(0.05 if step < 2 else 0.01)  # slow warm-up steps must not count
        meter.step_done(4)
    stats = meter.summary()
    assert stats["images"] == 24 and stats["timed_images"] == 16
    assert stats["images_per_s"] > 24 / stats["seconds"]  # warm-up excluded raises the rate
    assert 0.3 < stats["data_wait_share"] < 0.8


def test_gpu_sampler_reads_na_without_a_gpu() -> None:
    sampler = GpuSampler(torch.device("cpu")).start()
    time.sleep(0.05)
    sampler.stop()
    assert not sampler.available
    assert sampler.summary() == {"gpu_util": None, "gpu_mem_gib": None, "gpu_power_w": None, "sm_activity": None}


def fake_nvml(gpm: bool) -> types.ModuleType:
    """Just enough of pynvml for the sampler: utilisation 50 %, 2 GiB used, 300 W, SM 40 %."""
    m = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    class Metric:
        def __init__(self) -> None:
            self.metricId, self.value = 0, 0.0

    class MetricsGet:
        def __init__(self) -> None:
            self.metrics = [Metric()]

    def metrics_get(request):
        request.metrics[0].value = 40.0
        return request

    m.NVMLError = NVMLError
    m.nvmlInit = lambda: None
    m.nvmlDeviceGetHandleByIndex = lambda i: "handle"
    m.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=50)
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=2 * 2**30)
    m.nvmlDeviceGetPowerUsage = lambda h: 300_000
    m.nvmlGpmQueryDeviceSupport = lambda h: types.SimpleNamespace(isSupportedDevice=int(gpm))
    m.nvmlGpmSampleAlloc = object
    m.nvmlGpmSampleGet = lambda h, s: s
    m.c_nvmlGpmMetricsGet_t = MetricsGet
    m.NVML_GPM_METRICS_GET_VERSION = 1
    m.NVML_GPM_METRIC_SM_UTIL = 2
    m.nvmlGpmMetricsGet = metrics_get
    return m


@pytest.mark.parametrize("gpm", [True, False])
def test_gpu_sampler_with_nvml(monkeypatch: pytest.MonkeyPatch, gpm: bool) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(gpm))
    sampler = GpuSampler(torch.device("cuda", 0), hz=100).start()
    time.sleep(0.2)
    sampler.stop()
    summary = sampler.summary()
    assert summary["gpu_util"] == 50 and summary["gpu_mem_gib"] == 2 and summary["gpu_power_w"] == 300
    assert summary["sm_activity"] == (40.0 if gpm else None)


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
