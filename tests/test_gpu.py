"""Every GPU path, on data generated here: DALI mixed decode with augmentation against the CPU pipeline,
the device cache on CUDA, the compiled engine with CUDA graphs (bf16, channels-last, fused AdamW, no
recompiles after warm-up), fp16 with a gradient scaler, a one-rank NCCL DDP run, the real NVML sampler,
and the mask kernel on JPEG-noisy synthetic masks at odd shapes. Skipped without a CUDA GPU.

Cost (the GPU suite's plan, benchmarks/gpu_plan.py TEST_COSTS, runs them in shards at once): small
shapes everywhere; the compiled engine trains `engine_run_config` on `ENGINE_DATA`, exactly what the
suite's warm-up trains into the shared inductor cache; the kernel's block is pinned there
(CITYSEG_KERNEL_BLOCK) to keep Triton compiles few.

    pytest -m gpu tests/test_gpu.py
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.gpu_plan import DDP_TEST_FLAGS, ENGINE_DATA, engine_config, engine_run_config
from cityseg.checkpoint import load_checkpoint
from cityseg.config import AugmentConfig
from cityseg.data.contract import IMAGENET_STD
from cityseg.data.pairs import list_split
from cityseg.data.synth import render_pair, write_dataset
from cityseg.palette import cityscapes_palette, map_colors_reference
from tests.conftest import ROOT, spec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
LEVEL = 1.0 / (255 * min(IMAGENET_STD))  # one uint8 level after normalisation
AUG = AugmentConfig(hflip=0.5, rotate_deg=10.0, scale=(0.8, 1.25), brightness=0.2, contrast=0.2, saturation=0.2,
                    hue=0.02)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The engine test's data: the warm-up (`python -m benchmarks.gpu_plan --warm-engine`) writes the same."""
    return write_dataset(tmp_path_factory.mktemp("gpu") / "synth", **ENGINE_DATA)


def test_dali_mixed_decode_with_augmentation_matches_the_cpu_pipeline(data: Path) -> None:
    """Same seed, same random draws (DALI's random ops run on the CPU in both graphs): flip, rotation,
    zoom, shift and colour. Tolerances: nvJPEG and libjpeg-turbo round chroma differently (photos a
    level or two apart), and nearest sampling of the warped mask may take the neighbour on exact
    half-pixel ties (a few pixels on class boundaries), so targets agree on >= 98 % of pixels."""
    from cityseg.data.dali_loader import DaliPairLoader

    files = list_split(data, "train")[:32]
    kw = dict(image_size=128, batch_size=8, augment=AUG, shuffle=False, drop_last=True, workers=2, seed=5)
    with (DaliPairLoader(files, cityscapes_palette(), spec(device="cuda", **kw)) as gpu,
          DaliPairLoader(files, cityscapes_palette(), spec(**kw)) as cpu):
        for (image, target), (ref_image, ref_target) in zip(gpu, cpu, strict=True):
            assert image.device.type == "cuda" and image.is_contiguous(memory_format=torch.channels_last)
            assert (target.cpu() == ref_target).float().mean() >= 0.98
            assert (image.float().cpu() - ref_image).abs().mean() <= 3 * LEVEL


@pytest.mark.parametrize("decoder", ["plain", "dali"])
def test_device_cache_on_cuda_matches_the_cpu_cache(data: Path, decoder: str) -> None:
    from cityseg.data.cache_loader import CacheLoader

    files = list_split(data, "train")[:24]
    kw = dict(image_size=128, batch_size=8, augment=None, shuffle=False, drop_last=False, workers=2)
    gpu = CacheLoader(files, cityscapes_palette(), spec(device="cuda", **kw), decoder=decoder)
    cpu = CacheLoader(files, cityscapes_palette(), spec(**kw), decoder="plain")
    assert gpu.photos.device.type == "cuda"
    for (image, target), (ref_image, ref_target) in zip(gpu, cpu, strict=True):
        agree = (target.cpu() == ref_target).float().mean().item()
        diff = (image.cpu() - ref_image).abs().mean().item()
        if decoder == "plain":  # the same CPU decode, copied: identical
            assert agree == 1.0 and diff < 1e-6
        else:  # nvJPEG vs libjpeg-turbo
            assert agree >= 0.99 and diff <= 2 * LEVEL
    aug = CacheLoader(files, cityscapes_palette(), spec(device="cuda", **{**kw, "augment": AUG, "shuffle": True,
                                                                          "drop_last": True}), decoder=decoder)
    image, target = next(iter(aug))
    assert image.device.type == "cuda" and torch.isfinite(image).all() and target.dtype == torch.int64


def test_engine_compiled_cuda_graphs_without_recompiles(data: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile in reduce-overhead mode (CUDA graphs) with bf16 autocast and channels-last inputs:
    three epochs run on one graph, every step replays it (no recompile, no CUDA-graph skip)."""
    import torch._dynamo.config
    from torch._dynamo.utils import counters

    from cityseg.training import train

    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)  # any recompile fails the run
    counters.clear()
    summary = train(engine_run_config(data, tmp_path / "run"))  # the config the suite's warm-up compiled
    assert summary["compile"] is True and summary["precision"] == "bf16-mixed"
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])  # CUDA graphs were used
    losses = [json.loads(ln)["loss"] for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    assert summary["final"]["gpu_util"] is not None  # the NVML sampler ran during training


def test_fp16_with_a_gradient_scaler(data: Path, tmp_path: Path) -> None:
    from cityseg.training import train

    summary = train(engine_config(data, tmp_path / "run", precision="16-mixed", compile=False))
    assert summary["precision"] == "16-mixed" and np.isfinite(summary["final"]["loss"])
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["scaler"]["scale"] > 0


def test_one_rank_nccl_ddp_run_compiled(data: Path, tmp_path: Path) -> None:
    """DDP over NCCL with --compile: DDP around model and loss, torch's default mode (no CUDA graphs)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "cityseg",
           "train", "--data", str(data), "--out", str(tmp_path / "run"), *DDP_TEST_FLAGS, "--epochs", "1"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)  # the suite warms it
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["ddp"] is True and summary["world_size"] == 1 and summary["compile"] is True
    assert np.isfinite(summary["final"]["loss"])


def test_real_nvml_sampler_reads_utilisation_and_memory() -> None:
    from cityseg.telemetry import GpuSampler

    sampler = GpuSampler(torch.device("cuda", 0), hz=20).start()
    x = torch.randn(4096, 4096, device="cuda")
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.5:  # keep the GPU busy while it samples
        x = (x @ x).tanh()
    torch.cuda.synchronize()
    sampler.stop()
    summary = sampler.summary()
    assert sampler.available and len(sampler.samples) > 0, sampler.problem
    assert summary["gpu_util"] is not None and summary["gpu_mem_gib"] is not None and summary["gpu_mem_gib"] > 0


@pytest.mark.parametrize("shape", [(3, 127, 131), (1, 256, 512), (5, 33, 77)])
def test_kernel_on_jpeg_noisy_masks_at_odd_shapes(shape: tuple[int, int, int]) -> None:
    from kernels.mask_to_class import mask_to_class

    pal = cityscapes_palette()
    n, h, w = shape
    rng = np.random.default_rng(sum(shape))
    masks = []
    for _ in range(n):
        _, mask = render_pair(rng, 256)
        buf = io.BytesIO()
        Image.fromarray(mask).resize((w, h), Image.NEAREST).save(buf, "JPEG", quality=75)  # JPEG-noisy colours
        masks.append(np.asarray(Image.open(buf).convert("RGB")))
    cpu = torch.from_numpy(np.stack(masks))
    pairs = torch.cat([torch.zeros_like(cpu), cpu], dim=2).cuda()  # the mask half of decoded pairs: a strided view
    expected = map_colors_reference(cpu, pal.centers, pal.classes)
    got = mask_to_class(pairs[:, :, w:], pal.centers, pal.classes)
    assert torch.equal(got.cpu(), expected)
    rand = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(mask_to_class(rand.cuda(), pal.centers, pal.classes, 60.0).cpu(),
                       map_colors_reference(rand, pal.centers, pal.classes, 60.0))
