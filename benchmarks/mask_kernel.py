"""Benchmark the mask -> class-id mapping: Triton kernel vs torch reference (GPU), lookup table vs
reference vs cdist (CPU), on batches of 256x256 masks.

    python -m benchmarks.mask_kernel                # GPU: batch 64 (CPU: batches 1 and 64)
    python -m benchmarks.mask_kernel --full         # adds batch 256
    python -m benchmarks.mask_kernel --threads 1    # CPU timings on one thread (steadier on a shared machine)
    python -m benchmarks.mask_kernel --json PATH    # default benchmarks/results/mask_kernel-{cpu,gpu}.json

Masks: "realistic" = Cityscapes colours in 16x16 blocks plus JPEG-like noise of +-8 per channel (a few
thousand distinct colours, as in decoded masks), and "uniform" = uniformly random RGB (the worst case
for a lookup table's cache). CPU: median ms per batch over --reps runs after a warm-up (the lookup
table is built during the warm-up), every run kept in the JSON. GPU: `triton.testing.do_bench` with
quantiles (0.5, 0.2, 0.8) on batches where the kernel, not the launch, is the cost; GB/s counts the RGB
bytes read plus the ids written, once each. Two shares per Triton row say what bounds it: `pct_peak`,
that traffic over the data sheet's HBM bandwidth, and `issue_pct`, the time the SMs need to issue the
compiled kernel's instructions (its SASS count, at NVML's maximum SM clock: a lower bound) over the
measured time. Compiles are kept few: the blocks training autotunes over (kernels/mask_to_class.py
AUTOTUNE_BLOCKS, each with its warps: 8 pixels per thread), pinned one by one, 1 uint8 variant, 2 SASS
counts; no autotuning.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Sequence

import numpy as np
import torch

from benchmarks.common import command_line, exit_with, new_parser, result_file
from kernels.mask_to_class import AUTOTUNE_BLOCKS, block_warps, mask_to_class, mask_to_class_reference

SIZE = 256
TRAINING_BLOCKS = ",".join(str(block) for block, _ in AUTOTUNE_BLOCKS)  # --blocks' default
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


# Hopper/Ampere SMs issue one warp instruction per cycle from each of their 4 schedulers.
ISSUE_PER_SM_CYCLE = 4
BOOST_MHZ = [("H200", 1980), ("H100", 1980), ("A100", 1410), ("L40S", 2520), ("L4", 2040), ("A10", 1695)]


def sass_instructions(sass: str) -> int:
    """Instructions in a disassembly (both nvdisasm layouts: `/*0040*/ OP ...;` and `ctrl<TAB>OP ...;`),
    NOPs (padding) left out. The kernel has no loop (`tl.static_range` unrolls), so every warp runs each
    instruction once at most: the static count is the per-warp dynamic count."""
    n = 0
    for line in sass.splitlines():
        line = re.sub(r"/\*.*?\*/", " ", line)
        if ";" not in line or line.lstrip().startswith((".", "//", "Function")):
            continue
        words = [w for w in line.split(";")[0].split() if ":" not in w and not w.startswith("@")]
        if words and re.fullmatch(r"[A-Z][A-Z0-9_.]*", words[0]) and words[0].split(".")[0] != "NOP":
            n += 1
    return n


def kernel_instructions(block: int, out_dtype: torch.dtype, k: int, target=None, num_warps: int = 4) -> dict:
    """SASS instruction count of the kernel as the benchmark launches it (packed loop, no limit),
    compiled for `target` (default: this GPU) with Triton's own ptxas and disassembler. One compile of
    its own, without the launch's integer specialisations (divisibility by 16): a count within a few
    instructions of the launched binary's, not that binary itself."""
    import triton
    from triton.compiler import ASTSource

    from kernels.mask_to_class import IGNORE_INDEX, _mask_to_class_kernel

    out_ty = {torch.int64: "*i64", torch.uint8: "*u8"}[out_dtype]
    sig = {"mask_ptr": "*u8", "table_ptr": "*fp32", "classes_ptr": "*i32", "out_ptr": out_ty, "num_pixels": "i32",
           "H": "i32", "W": "i32", "stride_n": "i32", "stride_h": "i32", "stride_w": "i32", "stride_c": "i32",
           "limit": "fp32", "K": "constexpr", "PACKED": "constexpr", "HAS_LIMIT": "constexpr",
           "IGNORE": "constexpr", "SIZE_BUCKET": "i32", "BLOCK": "constexpr"}
    const = {"K": k, "PACKED": True, "HAS_LIMIT": False, "IGNORE": IGNORE_INDEX, "BLOCK": block}
    target = target or triton.runtime.driver.active.get_current_target()
    compiled = triton.compile(ASTSource(triton.jit(_mask_to_class_kernel), sig, const), target=target,
                              options={"num_warps": num_warps})
    count = sass_instructions(compiled.asm["sass"])
    pixels_per_thread = block / (32 * num_warps)
    return {"sass_per_warp": count, "num_warps": num_warps, "instr_per_pixel": count / pixels_per_thread}


def sm_clock_mhz(name: str) -> tuple[float | None, str]:
    """The SM clock the issue bound assumes: NVML's maximum (an upper bound: the share is then a lower
    bound), else the data sheet's boost clock."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        return float(pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM)), "nvml max SM clock"
    except Exception:  # no NVML: the data sheet
        for key, mhz in BOOST_MHZ:
            if key in name:
                return float(mhz), f"data sheet boost clock ({key})"
    return None, "unknown"


def issue_bound_ms(pixels: int, block: int, instr: dict, sms: int, mhz: float) -> float:
    """The time the SMs need just to issue the kernel's instructions: programs x warps x instructions
    over (SMs x 4 schedulers x clock)."""
    programs = -(-pixels // block)
    return programs * instr["num_warps"] * instr["sass_per_warp"] / (sms * ISSUE_PER_SM_CYCLE * mhz * 1e6) * 1e3


def bench_gpu(args: argparse.Namespace, pal, rows: list, save) -> list:
    """Batches where the kernel is the cost (64 x 256^2: ~4 M pixels, ~0.1 ms). Few compiles: each of
    --blocks pinned (one compile each, no autotuning), then uint8 output and the pair view with the
    fastest block (one more), and that block's SASS for the issue bound (two). Each Triton row gives
    two honest shares: `pct_peak` (HBM: bytes read and written over the data sheet's peak bandwidth)
    and `issue_pct` (the issue bound from the compiled kernel's SASS count over the measured time):
    the larger says what limits the kernel."""
    import triton.testing

    gen = torch.Generator().manual_seed(0)
    name = torch.cuda.get_device_name()
    _, peak = peak_bandwidth(name)
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    mhz, clock_source = sm_clock_mhz(name)
    c, k = pal.centers.cpu(), pal.classes.cpu()  # CPU tables: prepared and cached once, one launch per call
    dc, dk = pal.centers.cuda(), pal.classes.cuda()
    colors = pal.centers.to(torch.uint8)
    instr_cache: dict = {}
    best: int | None = None

    def measure(batch: int, kind: str, impl: str, fn, out_bytes: int, block: int | None, expected) -> float:
        if expected is not None:
            assert torch.equal(fn(), expected.to(fn().dtype)), f"{impl} disagrees with the reference"
        ms, lo, hi = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        pixels = batch * SIZE * SIZE
        gbps = pixels * (3 + out_bytes) / (ms * 1e-3) / 1e9
        row = {"palette": "cityscapes", "batch": batch, "masks": kind, "impl": impl, "block": block,
               "num_warps": None if block is None else block_warps(block), "ms": ms,
               "ms_p20": lo, "ms_p80": hi, "gbps": gbps, "pct_peak": None if peak is None else 100 * gbps / peak,
               "issue_pct": None}
        if block is not None and mhz is not None and not impl.startswith("triton-block"):  # the chosen block
            key = (block, out_bytes)
            if key not in instr_cache:
                try:
                    instr_cache[key] = kernel_instructions(block, torch.uint8 if out_bytes == 1 else torch.int64,
                                                           len(c), num_warps=block_warps(block))
                except Exception as exc:  # no disassembler in this Triton: the share is left out, the timing kept
                    print(f"no SASS count: {type(exc).__name__}: {exc}")
                    instr_cache[key] = None
            instr = instr_cache[key]
            if instr is not None:
                row.update(instr, issue_bound_ms=issue_bound_ms(pixels, block, instr, sms, mhz),
                           clock_mhz=mhz, clock_source=clock_source, sms=sms)
                row["issue_pct"] = 100 * row["issue_bound_ms"] / ms
        rows.append(row)
        save()
        shares = "" if row["pct_peak"] is None else f"HBM {row['pct_peak']:5.1f}%"
        shares += "" if row["issue_pct"] is None else f"  issue {row['issue_pct']:5.1f}%"
        print(f"batch {batch:4d} {kind:9s} {impl:18s} {ms * 1e3:9.1f} us {gbps:8.1f} GB/s  {shares}", flush=True)
        return ms

    for batch in args.batches:
        for kind in ("realistic", "uniform"):
            cpu = realistic_masks(batch, colors, gen) if kind == "realistic" else uniform_masks(batch, gen)
            masks = cpu.cuda()
            pairs = torch.cat([torch.zeros_like(masks), masks], dim=2)
            expected = mask_to_class_reference(masks, dc, dk)
            if best is None:  # the first batch picks the block; later ones reuse it (no new compile)
                times = {b: measure(batch, kind, f"triton-block{b}",
                                    lambda m=masks, b=b: mask_to_class(m, c, k, block_size=b), 8, b, expected)
                         for b in args.blocks}
                best = min(times, key=times.get)
                print(f"fastest block: {best}")
                # As training launches it: autotuned over the same candidates (compiled above: no new compile).
                measure(batch, kind, "triton-autotuned", lambda m=masks: mask_to_class(m, c, k), 8, None, expected)
                rows[-1]["block"] = autotuned_block()
            b = best
            measure(batch, kind, "triton", lambda m=masks, b=b: mask_to_class(m, c, k, block_size=b), 8, b, expected)
            measure(batch, kind, "triton-uint8",
                    lambda m=masks, b=b: mask_to_class(m, c, k, out_dtype=torch.uint8, block_size=b), 1, b, expected)
            measure(batch, kind, "triton-pair-view",
                    lambda p=pairs, b=b: mask_to_class(p[:, :, SIZE:], c, k, block_size=b), 8, b, expected)
            measure(batch, kind, "torch-reference", lambda m=masks: mask_to_class_reference(m, dc, dk), 8, None, None)
    return rows


def autotuned_block() -> int | None:
    """The block training's autotuner picked for the last launch (None where it cannot say)."""
    from kernels import mask_to_class as kernel_module

    tuned = kernel_module._kernels.get("tuned")
    config = getattr(tuned, "best_config", None)
    return None if config is None else config.kwargs.get("BLOCK")


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


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    ap = new_parser("mask_kernel", __doc__, prog)
    ap.add_argument("--full", action="store_true", help="also batch 256")
    ap.add_argument("--batches", default=None,
                    help="comma list of batch sizes (default: GPU 64, 256 with --full; CPU 1,64, 1,64,256 with --full)")
    ap.add_argument("--blocks", default=TRAINING_BLOCKS, help="GPU: Triton block sizes to time, one compile each "
                    f"(default: {TRAINING_BLOCKS}, the candidates training autotunes over, each with its warps)")
    ap.add_argument("--reps", type=int, default=7, help="timed runs per CPU case (>= 5)")
    ap.add_argument("--cpu", action="store_true", help="CPU benchmark even when a GPU is present")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.cpu
    out = result_file(args, "mask_kernel", "gpu" if gpu else "cpu")
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.reps = max(5, args.reps)
    args.blocks = [int(b) for b in args.blocks.split(",")]

    from cityseg.palette import cityscapes_palette

    pal = cityscapes_palette()
    colors = pal.centers.to(torch.uint8)
    default = ([64, 256] if args.full else [64]) if gpu else ([1, 64, 256] if args.full else [1, 64])
    args.batches = [int(b) for b in args.batches.split(",")] if args.batches else default
    env = environment()
    print(json.dumps(env))
    command = command_line("mask_kernel", argv)
    rows: list = []

    def save(complete: bool = False) -> None:
        """Rewritten after every measurement: a run cut short (a timeout) keeps what it measured."""
        doc = {"env": env, "command": command, "complete": complete, "results": rows}
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, out)

    if gpu:
        bench_gpu(args, pal, rows, save)
    else:
        bench_cpu(args, pal.centers, pal.classes, colors, rows, save)
    save(complete=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    exit_with(main)
