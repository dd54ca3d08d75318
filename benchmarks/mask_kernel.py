"""Benchmark the mask -> class-id mapping: Triton kernel vs torch reference (GPU), lookup table vs
reference vs cdist (CPU), on batches of 256x256 masks.

    python benchmarks/mask_kernel.py                # batches 1 and 64; CPU, or GPU when there is one
    python benchmarks/mask_kernel.py --full         # adds batch 256
    python benchmarks/mask_kernel.py --threads 1    # CPU timings on one thread (steadier on a shared machine)
    python benchmarks/mask_kernel.py --json PATH    # default benchmarks/results/mask_kernel-{cpu,gpu}.json

Masks: "realistic" = Cityscapes colours in 16x16 blocks plus JPEG-like noise of +-8 per channel (a few
thousand distinct colours, as in decoded masks), and "uniform" = uniformly random RGB (the worst case
for a lookup table's cache). CPU: median ms per batch over --reps runs after a warm-up (the lookup
table is built during the warm-up), every run kept in the JSON. GPU: `triton.testing.do_bench` with
quantiles (0.5, 0.2, 0.8); GB/s counts the RGB bytes read plus the ids written, once each.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels.mask_to_class import mask_to_class, mask_to_class_reference  # noqa: E402

SIZE = 256
# Peak DRAM bandwidth (GB/s) from the vendors' data sheets, matched against the device name.
PEAK_GBPS = [
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100 NVL", 3900.0),
    ("H100", 3350.0),  # SXM5
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),  # 40 GB
    ("L40S", 864.0),
    ("L4", 300.0),
    ("A10", 600.0),
]


def peak_bandwidth(name: str) -> tuple[str | None, float | None]:
    for key, gbps in PEAK_GBPS:
        if key in name:
            return key, gbps
    return None, None


def realistic_masks(n: int, colors: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(n, 256, 256, 3) uint8: palette colours in 16x16 blocks plus uniform noise in [-8, 8]."""
    blocks = torch.randint(0, colors.shape[0], (n, SIZE // 16, SIZE // 16), generator=gen)
    m = colors[blocks].repeat_interleave(16, 1).repeat_interleave(16, 2).to(torch.int16)
    noise = torch.randint(-8, 9, m.shape, generator=gen, dtype=torch.int16)
    return (m + noise).clamp(0, 255).to(torch.uint8)


def uniform_masks(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, (n, SIZE, SIZE, 3), generator=gen, dtype=torch.uint8)


def cdist_reference(mask: torch.Tensor, centers: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """What notebook solutions write: torch.cdist + argmin, chunked to bound memory like the reference."""
    flat = mask.reshape(-1, 3)
    c = centers.to(mask.device, torch.float32)
    cls = classes.to(mask.device)
    chunk = max(1, (1 << 24) // c.shape[0])
    out = torch.empty(flat.shape[0], dtype=torch.int64, device=mask.device)
    for s in range(0, flat.shape[0], chunk):
        out[s : s + chunk] = cls[torch.cdist(flat[s : s + chunk].to(torch.float32), c).argmin(dim=1)]
    return out.view(mask.shape[:-1])


def time_cpu(fn, reps: int) -> dict:
    fn()  # warm-up: builds and caches the lookup table, touches the allocator
    runs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(runs), "runs_ms": runs}


def bench_cpu(args: argparse.Namespace, centers: torch.Tensor, classes: torch.Tensor, colors: torch.Tensor,
              rows: list, save) -> list:
    from cityseg.palette import Palette, lookup_table

    # The package's table for these centres (cached on disk): built outside every timing.
    lut = lookup_table(Palette(centers, classes, ("x",), colors[:1], None))
    gen = torch.Generator().manual_seed(0)
    for batch in args.batches:
        for kind in ("realistic", "uniform"):
            masks = realistic_masks(batch, colors, gen) if kind == "realistic" else uniform_masks(batch, gen)
            pairs = torch.cat([torch.zeros_like(masks), masks], dim=2)  # decoded Kaggle pairs: mask on the right
            cases = {
                "lut": lambda m=masks: mask_to_class(m, centers, classes, backend="lut", lut=lut),
                "lut-uint8": lambda m=masks: mask_to_class(m, centers, classes, backend="lut", lut=lut,
                                                           out_dtype=torch.uint8),
                "lut-pair-view": lambda p=pairs: mask_to_class(p[:, :, SIZE:], centers, classes, backend="lut",
                                                               lut=lut),
                "reference": lambda m=masks: mask_to_class_reference(m, centers, classes),
                "cdist": lambda m=masks: cdist_reference(m, centers, classes),
            }
            expected = mask_to_class_reference(masks, centers, classes)
            assert torch.equal(cases["lut"](), expected), "lookup table disagrees with the reference"
            slow_reps = max(3, args.reps // 2) if batch > 64 else args.reps
            for name, fn in cases.items():
                reps = slow_reps if name in ("reference", "cdist") else args.reps
                r = time_cpu(fn, reps)
                out_bytes = 1 if name == "lut-uint8" else 8
                gbps = batch * SIZE * SIZE * (3 + out_bytes) / (r["median_ms"] * 1e-3) / 1e9
                rows.append({"batch": batch, "masks": kind, "impl": name, "gbps": gbps, **r})
                save()
                print(f"batch {batch:4d} {kind:9s} {name:14s} {r['median_ms']:10.2f} ms  {gbps:7.3f} GB/s", flush=True)
            by = {row["impl"]: row["median_ms"] for row in rows if row["batch"] == batch and row["masks"] == kind}
            speedup = {f"lut_vs_{base}": by[base] / by["lut"] for base in ("reference", "cdist")}
            rows.append({"batch": batch, "masks": kind, "impl": "speedup", **speedup})
            print("  lut speed-up: " + ", ".join(f"{v:.0f}x {k.removeprefix('lut_')}" for k, v in speedup.items()))
    return rows


def bench_gpu(args: argparse.Namespace, palettes: dict, rows: list, save) -> list:
    """The kernel alone: centres given on the CPU, as the loaders give them, so the kernel's table is
    prepared once (in the correctness check before timing) and every timed call is one launch."""
    import triton.testing

    gen = torch.Generator().manual_seed(0)
    name = torch.cuda.get_device_name()
    _, peak = peak_bandwidth(name)
    for pal_name, (centers, classes, colors) in palettes.items():
        c, k = centers.cpu(), classes.cpu()  # the Triton cases: a cached, prepared table
        dc, dk = centers.cuda(), classes.cuda()  # the torch reference computes with device tensors
        for batch in args.batches:
            for kind in ("realistic", "uniform"):
                cpu = realistic_masks(batch, colors, gen) if kind == "realistic" else uniform_masks(batch, gen)
                masks = cpu.cuda()
                pairs = torch.cat([torch.zeros_like(masks), masks], dim=2)
                expected = mask_to_class_reference(masks, dc, dk)
                cases = {
                    "triton": (lambda m=masks, c=c, k=k: mask_to_class(m, c, k), 8),
                    "triton-uint8": (lambda m=masks, c=c, k=k: mask_to_class(m, c, k, out_dtype=torch.uint8), 1),
                    "triton-pair-view": (lambda p=pairs, c=c, k=k: mask_to_class(p[:, :, SIZE:], c, k), 8),
                    "torch-reference": (lambda m=masks, c=dc, k=dk: mask_to_class_reference(m, c, k), 8),
                }
                for block in (256, 1024, 4096):
                    fixed = lambda m=masks, c=c, k=k, b=block: mask_to_class(m, c, k, block_size=b)  # noqa: E731
                    cases[f"triton-block{block}"] = (fixed, 8)
                for impl, (fn, out_bytes) in cases.items():
                    if impl.startswith("triton"):
                        assert torch.equal(fn(), expected.to(fn().dtype)), f"{impl} disagrees with the reference"
                    ms, lo, hi = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
                    gbps = batch * SIZE * SIZE * (3 + out_bytes) / (ms * 1e-3) / 1e9
                    pct = None if peak is None else 100 * gbps / peak
                    rows.append(
                        {
                            "palette": pal_name,
                            "batch": batch,
                            "masks": kind,
                            "impl": impl,
                            "ms": ms,
                            "ms_p20": lo,
                            "ms_p80": hi,
                            "gbps": gbps,
                            "pct_peak": pct,
                        }
                    )
                    save()
                    pct_s = "n/a" if pct is None else f"{pct:5.1f}%"
                    print(
                        f"{pal_name:10s} batch {batch:4d} {kind:9s} {impl:18s} {ms * 1e3:9.1f} us "
                        f"{gbps:8.1f} GB/s {pct_s} of peak",
                        flush=True,
                    )
    return rows


def environment() -> dict:
    import triton

    env = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "numpy": np.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "load_avg_1min_at_start": os.getloadavg()[0],  # other processes on the machine skew CPU timings
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        key, peak = peak_bandwidth(name)
        env.update(device=name, peak_gbps=peak, peak_table_entry=key)
    else:
        env["device"] = "cpu"
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="also batch 256")
    ap.add_argument("--batches", default=None, help="comma list of batch sizes (default 1,64; 1,64,256 with --full)")
    ap.add_argument("--reps", type=int, default=7, help="timed runs per CPU case (>= 5)")
    ap.add_argument("--cpu", action="store_true", help="CPU benchmark even when a GPU is present")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batches = [int(b) for b in args.batches.split(",")] if args.batches else [1, 64, 256] if args.full else [1, 64]
    args.reps = max(5, args.reps)

    from cityseg.palette import cityscapes_palette

    pal = cityscapes_palette()
    colors = pal.centers.to(torch.uint8)
    gpu = torch.cuda.is_available() and not args.cpu
    env = environment()
    print(json.dumps(env))
    out = args.json or Path(__file__).parent / "results" / f"mask_kernel-{'gpu' if gpu else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list = []

    def save(complete: bool = False) -> None:
        """Rewritten after every measurement: a run cut short (a timeout) keeps what it measured."""
        doc = {"env": env, "command": " ".join(sys.argv), "complete": complete, "results": rows}
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, out)

    if gpu:
        gen = torch.Generator().manual_seed(1)
        rand64 = torch.randint(0, 256, (64, 3), generator=gen).to(torch.float32)
        palettes = {
            "cityscapes": (pal.centers, pal.classes, colors),
            "random-k64": (rand64, torch.arange(64), rand64.to(torch.uint8)),
        }
        bench_gpu(args, palettes, rows, save)
    else:
        bench_cpu(args, pal.centers, pal.classes, colors, rows, save)
    save(complete=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
