"""RGB mask -> class id by nearest class colour: Triton kernel, launcher, torch reference, CPU path.

    ids = mask_to_class(mask, palette.centers, palette.classes, palette.max_dist)

One entry point for every device:
- CUDA tensors: the Triton kernel (grid over pixels, each pixel's RGB read once, its id written once).
- CPU tensors: the 2^24-entry lookup table of `cityseg.palette` (one gather per pixel), unless
  `TRITON_INTERPRET=1` is set, which runs the same Triton kernel in Triton's interpreter (tests).
- `backend=` forces one: "triton" (on CPU: the interpreter), "lut" (CPU only), "reference".

Exactness: every path computes the squared distance per centre as `dr*dr + dg*dg + db*db` in float32,
compares it with `float32(max_dist**2)` and keeps the first minimum (lowest centre index on ties).
With integer-valued centres every intermediate is an integer below 2^24, exact in float32 whatever
the rounding or FMA contraction, so all backends agree bit for bit. With non-integer centres the
GPU compiler may contract `dr*dr + dg*dg` into an FMA and differ from torch in the last bit on a
near-tie; that is why k-means centres are rounded to integer RGB (`cityseg/palette_kmeans.py`).

Check it: `TRITON_INTERPRET=1 pytest tests/test_mask_kernel.py`; time it: `python benchmarks/mask_kernel.py`.
"""

from __future__ import annotations

import contextlib
import os
from typing import Literal

import numpy as np
import torch
import triton
import triton.language as tl

IGNORE_INDEX = 255
MAX_CENTERS = 64
Layout = Literal["nhwc", "nchw"]
Backend = Literal["auto", "triton", "lut", "reference"]

# Pixel indices are int32 inside the kernel (64-bit integer division is slow on GPUs): larger
# batches are split into launches of at most this many pixels.
_MAX_PIXELS_PER_LAUNCH = (1 << 31) - (1 << 16)
_INTERPRETER_BLOCK = 16384


def _mask_to_class_kernel(
    mask_ptr,  # uint8 RGB, any strides
    centers_ptr,  # (K, 3) float32, contiguous
    classes_ptr,  # (K,) int32
    out_ptr,  # (num_pixels,) int64 or uint8, contiguous
    num_pixels,
    H,
    W,
    stride_n,
    stride_h,
    stride_w,
    stride_c,
    limit,  # float32(max_dist**2); used only when HAS_LIMIT
    K: tl.constexpr,
    HAS_LIMIT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < num_pixels
    w = offs % W
    nh = offs // W
    h = nh % H
    n = nh // H
    # Byte offsets in int64: strided views of big batches (the right half of decoded pairs) pass 2^31.
    base = n.to(tl.int64) * stride_n + h.to(tl.int64) * stride_h + w.to(tl.int64) * stride_w
    r = tl.load(mask_ptr + base, mask=valid, other=0).to(tl.float32)
    g = tl.load(mask_ptr + base + stride_c, mask=valid, other=0).to(tl.float32)
    b = tl.load(mask_ptr + base + 2 * stride_c, mask=valid, other=0).to(tl.float32)

    best = tl.full([BLOCK], float("inf"), tl.float32)
    best_cls = tl.full([BLOCK], 0, tl.int32)
    # K is small and constexpr: unrolled, the centres are uniform scalar loads served from cache.
    for k in tl.static_range(K):
        dr = r - tl.load(centers_ptr + 3 * k)
        dg = g - tl.load(centers_ptr + 3 * k + 1)
        db = b - tl.load(centers_ptr + 3 * k + 2)
        d = dr * dr + dg * dg + db * db  # same association as the torch reference
        closer = d < best  # strict: the lowest centre index wins ties
        best = tl.where(closer, d, best)
        best_cls = tl.where(closer, tl.load(classes_ptr + k), best_cls)
    if HAS_LIMIT:
        best_cls = tl.where(best > limit, IGNORE_INDEX, best_cls)
    tl.store(out_ptr + offs, best_cls.to(out_ptr.dtype.element_ty), mask=valid)


# Memory-bound with K unrolled compare-selects per pixel: a few block/warp shapes are enough to find
# the bandwidth plateau; short benchmark windows keep the first call under a second.
_AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK": block}, num_warps=warps) for block in (256, 512, 1024, 2048) for warps in (4, 8)
]
_kernels: dict[str, object] = {}


def _kernel(device: torch.device, tuned: bool):
    """The launchable kernel for a device, decorated on first use.

    CPU tensors always go through Triton's interpreter, whatever `TRITON_INTERPRET` was when triton
    was imported: the kernel calls only `tl` builtins (not the `@jit` helpers of triton's standard
    library such as `tl.zeros`), which the interpreter runs either way.
    """
    if device.type != "cuda" or _interpreting():
        if "interp" not in _kernels:
            from triton.runtime.interpreter import InterpretedFunction

            _kernels["interp"] = InterpretedFunction(_mask_to_class_kernel)
        return _kernels["interp"]
    if "jit" not in _kernels:
        jit = triton.jit(_mask_to_class_kernel)
        _kernels["jit"] = jit
        _kernels["tuned"] = triton.autotune(
            configs=_AUTOTUNE_CONFIGS,
            key=["K", "HAS_LIMIT"],
            do_bench=lambda fn, quantiles: triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles),
        )(jit)
    return _kernels["tuned"] if tuned else _kernels["jit"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _as_nhwc(mask: torch.Tensor, layout: Layout) -> torch.Tensor:
    """A (N, H, W, 3) view of `mask` (no copy), whatever its layout and strides."""
    if mask.dtype != torch.uint8:
        raise ValueError(f"mask must be uint8 RGB, got {mask.dtype}")
    if mask.dim() not in (3, 4):
        raise ValueError(f"mask must be (N, H, W, 3) or (H, W, 3) (layout='nhwc'), got {tuple(mask.shape)}")
    x = mask if mask.dim() == 4 else mask.unsqueeze(0)
    if layout == "nchw":
        x = x.permute(0, 2, 3, 1)
    elif layout != "nhwc":
        raise ValueError(f"layout must be 'nhwc' or 'nchw', got {layout!r}")
    if x.shape[-1] != 3:
        raise ValueError(f"mask has {x.shape[-1]} channels, expected 3 (layout={layout!r}, shape {tuple(mask.shape)})")
    return x


def _check_table(centers: torch.Tensor, classes: torch.Tensor) -> None:
    if centers.dim() != 2 or centers.shape[1] != 3 or not 1 <= centers.shape[0] <= MAX_CENTERS:
        raise ValueError(f"centers must be (K, 3) with 1 <= K <= {MAX_CENTERS}, got {tuple(centers.shape)}")
    if classes.shape != (centers.shape[0],) or classes.is_floating_point():
        raise ValueError(f"classes must be integer (K,) = ({centers.shape[0]},), got {classes.dtype} {tuple(classes.shape)}")


def _limit(max_dist: float | None) -> float:
    """The threshold as the reference compares it: float32(max_dist**2), exact as a Python float."""
    return 0.0 if max_dist is None else float(np.float32(float(max_dist) ** 2))


def mask_to_class_reference(
    mask: torch.Tensor,
    centers: torch.Tensor,
    classes: torch.Tensor,
    max_dist: float | None = None,
    *,
    layout: Layout = "nhwc",
    out_dtype: torch.dtype = torch.int64,
) -> torch.Tensor:
    """Plain torch, on the mask's device: squared distance to every centre, first argmin.

    Squared distances rather than `torch.cdist`: cdist's square root maps distinct squared
    distances to the same float32 (e.g. 2^24 and 2^24+1), creating ties the kernel does not have.
    Equals `cityseg.palette.map_colors_reference` (tested) without importing cityscapesscripts, and
    runs on CUDA, where it is the torch baseline of the benchmark.
    """
    _check_table(centers, classes)
    x = _as_nhwc(mask, layout)
    c = centers.to(device=x.device, dtype=torch.float32)
    cls = classes.to(device=x.device, dtype=torch.int64)
    flat = x.reshape(-1, 3)  # copies only when the view is not flattenable
    out = torch.empty(flat.shape[0], dtype=torch.int64, device=x.device)
    chunk = max(1, (1 << 24) // c.shape[0])  # bounds each (pixels, K) float32 matrix to 64 MiB
    for start in range(0, flat.shape[0], chunk):
        p = flat[start : start + chunk].to(torch.float32)
        dr = p[:, 0:1] - c[:, 0]
        dg = p[:, 1:2] - c[:, 1]
        db = p[:, 2:3] - c[:, 2]
        best, idx = (dr * dr + dg * dg + db * db).min(dim=1)  # first minimal index on ties
        ids = cls[idx]
        if max_dist is not None:
            ids = torch.where(best > _limit(max_dist), IGNORE_INDEX, ids)
        out[start : start + chunk] = ids
    out = out.reshape(x.shape[:3]).to(out_dtype)
    return out if mask.dim() == 4 else out[0]


_device_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _device_table(centers: torch.Tensor, classes: torch.Tensor, device: torch.device):
    """Centres (float32) and classes (int32) on `device`; CPU tables are copied once and cached, so
    a loader passing `palette.centers` does not pay (and sync on) a host-to-device copy per batch."""
    if centers.device == device and classes.device == device:
        return centers.to(torch.float32).contiguous(), classes.to(torch.int32).contiguous()
    c = centers.detach().to("cpu", torch.float32).contiguous()
    k = classes.detach().to("cpu", torch.int32).contiguous()
    key = (c.numpy().tobytes(), k.numpy().tobytes(), str(device))
    if key not in _device_tables:
        _device_tables[key] = (c.to(device), k.to(device))
    return _device_tables[key]


def mask_to_class_triton(
    mask: torch.Tensor,
    centers: torch.Tensor,
    classes: torch.Tensor,
    max_dist: float | None = None,
    *,
    layout: Layout = "nhwc",
    out_dtype: torch.dtype = torch.int64,
    block_size: int | None = None,
) -> torch.Tensor:
    """The Triton kernel: on CUDA compiled (autotuned unless `block_size`), on CPU interpreted."""
    _check_table(centers, classes)
    x = _as_nhwc(mask, layout)
    N, H, W, _ = x.shape
    c, k = _device_table(centers, classes, x.device)
    if out_dtype == torch.uint8 and (k.min() < 0 or k.max() > 255):
        raise ValueError("out_dtype=uint8 needs class ids in 0..255")
    out = torch.empty((N, H, W), dtype=out_dtype, device=x.device)
    if out.numel() == 0:
        return out if mask.dim() == 4 else out[0]
    interp = x.device.type != "cuda" or _interpreting()
    # The interpreter pays per operation, not per element: big blocks keep it fast.
    block = block_size or (_INTERPRETER_BLOCK if interp else None)
    kernel = _kernel(x.device, tuned=block is None)
    meta = {"K": c.shape[0], "HAS_LIMIT": max_dist is not None}
    if block is not None:
        meta["BLOCK"] = block
    rows = max(1, _MAX_PIXELS_PER_LAUNCH // (H * W))
    if H * W > _MAX_PIXELS_PER_LAUNCH:
        raise ValueError(f"a single {H}x{W} mask has more than 2^31 pixels")
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        for n0 in range(0, N, rows):
            xs, os_ = x[n0 : n0 + rows], out[n0 : n0 + rows]
            num_pixels = xs.shape[0] * H * W
            grid = lambda m, p=num_pixels: (triton.cdiv(p, m["BLOCK"]),)  # noqa: E731
            kernel[grid](xs, c, k, os_, num_pixels, H, W, *xs.stride(), _limit(max_dist), **meta)
    return out if mask.dim() == 4 else out[0]


def mask_to_class_lut(
    mask: torch.Tensor,
    centers: torch.Tensor,
    classes: torch.Tensor,
    max_dist: float | None = None,
    *,
    layout: Layout = "nhwc",
    out_dtype: torch.dtype = torch.int64,
) -> torch.Tensor:
    """The CPU path: one gather per pixel in the palette's 2^24-entry table (built once, cached)."""
    _check_table(centers, classes)
    x = _as_nhwc(mask, layout)
    if x.device.type != "cpu":
        raise ValueError(f"the lookup-table path runs on CPU tensors, got {x.device}")
    lut = _lookup_table(centers, classes, max_dist)
    out = _gather_lut(x, lut, out_dtype)
    return out if mask.dim() == 4 else out[0]


_bgr_luts: dict[tuple, torch.Tensor] = {}


def _lookup_table(centers: torch.Tensor, classes: torch.Tensor, max_dist: float | None) -> torch.Tensor:
    """The palette's 2^24-entry uint8 table, indexed by r | g << 8 | b << 16 (see `_rgb_codes`)."""
    c = centers.detach().to("cpu", torch.float32).contiguous()
    k = classes.detach().to("cpu", torch.int64).contiguous()
    key = (c.numpy().tobytes(), k.numpy().tobytes(), max_dist)
    if key not in _bgr_luts:
        from cityseg.palette import Palette, lookup_table  # imports cityscapesscripts: only this path needs it

        # Names and colours enter neither the table nor its cache key: placeholders do.
        num = int(k[k != IGNORE_INDEX].max()) + 1 if bool((k != IGNORE_INDEX).any()) else 0
        names = tuple(f"class {i}" for i in range(num))
        lut = lookup_table(Palette(c, k, names, torch.zeros(num, 3, dtype=torch.uint8), max_dist))
        _bgr_luts[key] = lut.view(256, 256, 256).permute(2, 1, 0).contiguous().view(-1)
    return _bgr_luts[key]


def _rgb_codes(x: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 on CPU -> (N, H, W) int32 colour codes r | g << 8 | b << 16.

    When channels are adjacent bytes, each pixel's code is one unaligned little-endian 4-byte read
    (numpy, zero-copy over the tensor's storage) and a mask: ~5x faster than widening three channel
    planes to int32 and shifting them. The read takes one byte past the pixel; when that byte lies
    outside the storage, read from one byte before (and shift) or do the last pixel apart.
    """
    n, h, w, _ = x.shape
    sn, sh, sw, sc = x.stride()
    if sc == 1 and x.numel() > 0:
        storage = torch.empty(0, dtype=torch.uint8).set_(x.untyped_storage()).numpy()
        base = x.storage_offset()
        last = base + (n - 1) * sn + (h - 1) * sh + (w - 1) * sw
        if last + 4 <= storage.size:
            u = np.ndarray((n, h, w), dtype="<u4", buffer=storage, offset=base, strides=(sn, sh, sw))
            return torch.from_numpy(np.bitwise_and(u, 0xFFFFFF).view(np.int32))
        if base >= 1:
            u = np.ndarray((n, h, w), dtype="<u4", buffer=storage, offset=base - 1, strides=(sn, sh, sw))
            return torch.from_numpy(np.right_shift(u, 8).view(np.int32))
        if x.is_contiguous() and n * h * w > 1:  # a standalone batch: its last pixel ends the storage
            codes = np.empty(n * h * w, dtype=np.uint32)
            u = np.ndarray((n * h * w - 1,), dtype="<u4", buffer=storage, offset=base, strides=(3,))
            np.bitwise_and(u, 0xFFFFFF, out=codes[:-1])
            codes[-1:] = _rgb_codes_torch(x.reshape(-1, 1, 1, 3)[-1:]).numpy().reshape(-1)
            return torch.from_numpy(codes.view(np.int32).reshape(n, h, w))
    return _rgb_codes_torch(x)


def _rgb_codes_torch(x: torch.Tensor) -> torch.Tensor:
    """`_rgb_codes` for any strides (e.g. channels-first), three widened planes."""
    return x[..., 0].to(torch.int32) | (x[..., 1].to(torch.int32) << 8) | (x[..., 2].to(torch.int32) << 16)


def _gather_lut(x: torch.Tensor, lut: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    codes = _rgb_codes(x)
    ids = torch.index_select(lut, 0, codes.reshape(-1)).view(codes.shape)  # int32 indices: no widening
    if out_dtype == torch.uint8:
        return ids
    # numpy asks the kernel for huge pages on large arrays: its int64 conversion of a 64x256x256
    # batch takes ~4 ms against ~15 ms for torch's `.to`, mostly page faults on the fresh 32 MB.
    return torch.from_numpy(ids.numpy().astype(np.int64))


def mask_to_class(
    mask: torch.Tensor,
    centers: torch.Tensor,
    classes: torch.Tensor,
    max_dist: float | None = None,
    *,
    layout: Layout = "nhwc",
    out_dtype: torch.dtype = torch.int64,
    backend: Backend = "auto",
    block_size: int | None = None,
) -> torch.Tensor:
    """uint8 RGB masks -> class ids by nearest centre; ids (N, H, W) (or (H, W)) on the mask's device.

    mask: (N, H, W, 3) or (H, W, 3) uint8 (layout="nhwc"), or (N, 3, H, W) / (3, H, W) with
        layout="nchw"; any strides (e.g. `pairs[:, :, W:]`, the mask half of decoded pairs), no copy.
    centers: (K, 3) float32 RGB centres, 1 <= K <= 64; integer-valued for bit-exact agreement.
    classes: (K,) integer class id of each centre (255 = ignore).
    max_dist: pixels farther than this (Euclidean RGB) from every centre map to 255.
    out_dtype: torch.int64 (loss targets) or torch.uint8.
    backend: "auto" = Triton on CUDA, lookup table on CPU (Triton interpreter if TRITON_INTERPRET=1).
    block_size: pixels per Triton program; None = autotuned on CUDA.
    """
    if out_dtype not in (torch.int64, torch.uint8):
        raise ValueError(f"out_dtype must be torch.int64 or torch.uint8, got {out_dtype}")
    if backend == "auto":
        backend = "triton" if mask.device.type == "cuda" or _interpreting() else "lut"
    kw = {"layout": layout, "out_dtype": out_dtype}
    if backend == "triton":
        return mask_to_class_triton(mask, centers, classes, max_dist, block_size=block_size, **kw)
    if backend == "lut":
        return mask_to_class_lut(mask, centers, classes, max_dist, **kw)
    if backend == "reference":
        return mask_to_class_reference(mask, centers, classes, max_dist, **kw)
    raise ValueError(f"backend must be 'auto', 'triton', 'lut' or 'reference', got {backend!r}")
