"""Where and how the model runs: device, precision, compilation, and the memory there is.

Training, evaluation and prediction resolve a `Runtime` from a few plain choices (no TrainConfig
needed); the choice of precision is a pure function of what the device can do, so it is tested on
any machine:

    rt = resolve_runtime(device="auto", precision="auto", compile=None)
    with autocast(rt): logits = model(x)

Precision (Lightning's names): `auto` = bf16 autocast where the device computes bf16 natively
(Ampere and newer GPUs; CPUs with AVX512-BF16/AMX), else fp16 autocast with a GradScaler on older
GPUs, else fp32; `bf16-mixed`, `16-mixed` and `32` force one. GPUs below compute capability 7.0 have
no Triton: compilation is turned off there (and the mask mapping uses the lookup table), said once.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

import torch

from cityseg.config import SETTINGS
from cityseg.errors import OptionError
from cityseg.outputs import cache_dir
from cityseg.settings import COMPILE_MODES

PRECISIONS = SETTINGS["train.precision"].choices
TRITON_MIN_CAPABILITY = (7, 0)


@dataclass(frozen=True)
class Capabilities:
    """What a device can do: the only input of the precision and compile policy besides the request."""

    device_type: str  # "cuda" or "cpu"
    bf16: bool  # native bf16 arithmetic
    capability: tuple[int, int] | None = None  # CUDA compute capability


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # resolved: "bf16-mixed", "16-mixed" or "32"
    compile: bool
    compile_mode: str | None = None
    notes: tuple[str, ...] = ()  # what the policy changed from the request, to say once at start

    @property
    def amp(self) -> bool:
        return self.precision != "32"

    @property
    def amp_dtype(self) -> torch.dtype:
        return torch.float16 if self.precision == "16-mixed" else torch.bfloat16

    @property
    def needs_grad_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
        return self.precision == "16-mixed"

    @property
    def batch_dtype(self) -> torch.dtype:
        """The dtype loaders hand over images in: the autocast dtype on a GPU, fp32 on a CPU."""
        return self.amp_dtype if self.amp and self.device.type == "cuda" else torch.float32


def choose_precision(requested: str, caps: Capabilities) -> tuple[str, list[str]]:
    """(resolved precision, notes) for a request on a device; OptionError for what cannot run."""
    if requested not in PRECISIONS:
        raise OptionError(f"--precision {requested}: expected one of {', '.join(PRECISIONS)}")
    gpu = caps.device_type == "cuda"
    if requested == "auto":
        if caps.bf16:
            return "bf16-mixed", []
        if gpu:
            return "16-mixed", ["this GPU has no native bf16: fp16 autocast with a gradient scaler"]
        return "32", []
    if requested == "16-mixed" and not gpu:
        raise OptionError("--precision 16-mixed: fp16 autocast needs a CUDA GPU; use bf16-mixed or 32 on a CPU")
    if requested == "bf16-mixed" and not caps.bf16:
        if gpu:
            raise OptionError("--precision bf16-mixed: this GPU has no native bf16; use 16-mixed (or auto)")
        return "bf16-mixed", ["this CPU has no native bf16: bf16 is emulated and slower than fp32"]
    return requested, []


def choose_compile(requested: bool | None, caps: Capabilities) -> tuple[bool, list[str]]:
    """torch.compile by default on a GPU that Triton supports; never below compute capability 7.0."""
    gpu = caps.device_type == "cuda"
    too_old = gpu and caps.capability is not None and caps.capability < TRITON_MIN_CAPABILITY
    if too_old:
        notes = [f"compute capability {caps.capability[0]}.{caps.capability[1]} < 7.0: no Triton, so no "
                 "torch.compile and the lookup-table mask mapping"] if requested is not False else []
        return False, notes
    return (gpu if requested is None else requested), []


def capabilities(device: torch.device) -> Capabilities:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return Capabilities("cuda", torch.cuda.is_bf16_supported(), torch.cuda.get_device_capability(index))
    # oneDNN runs bf16 natively with AVX512-BF16 or AMX; without them it is emulated and slower.
    return Capabilities("cpu", bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def resolve_device(name: str = "auto") -> torch.device:
    if name not in ("auto", "cpu", "cuda") and not (name.startswith("cuda:") and name[5:].isdecimal()):
        raise OptionError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError(f"--device {name}: no CUDA GPU is visible to PyTorch")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise OptionError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def resolve_runtime(device: str | torch.device = "auto", precision: str = "auto", compile: bool | None = None,
                    compile_mode: str | None = None) -> Runtime:
    where = device if isinstance(device, torch.device) else resolve_device(device)
    if compile_mode is not None and compile_mode not in COMPILE_MODES:
        raise OptionError(f"--compile-mode {compile_mode}: expected one of {', '.join(COMPILE_MODES)}")
    caps = capabilities(where)
    resolved, notes = choose_precision(precision, caps)
    compile_, compile_notes = choose_compile(compile, caps)
    return Runtime(where, resolved, compile_, compile_mode, tuple(notes + compile_notes))


def inference_runtime(device: str | torch.device, trained_precision: str) -> Runtime:
    """Eval and predict: the training's precision where this device runs it (so `eval` reproduces
    training's validation), else this device's `auto`; never compiled."""
    try:
        return resolve_runtime(device, trained_precision, compile=False)
    except OptionError:
        return resolve_runtime(device, "auto", compile=False)


def autocast(runtime: Runtime) -> torch.autocast:
    return torch.autocast(runtime.device.type, dtype=runtime.amp_dtype, enabled=runtime.amp)


def free_memory(device: torch.device) -> int:
    """Bytes free on `device`: the CUDA driver's count, or the kernel's MemAvailable for the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # no /proc (macOS): free pages


# Where compiled code is kept between runs, under the cityseg cache folder: inductor's FX-graph and
# autotuning caches, and Triton's kernel cache (the mask kernel; inductor keeps its own Triton kernels
# under its folder). A warm cache turns a 45-56 s first step on an H200 into ~6 s.
COMPILE_CACHE_VARS = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}


def use_compile_cache(env: MutableMapping[str, str] | None = None, root: Path | None = None) -> dict[str, object]:
    """Point the inductor and Triton caches at `root` (default $CITYSEG_CACHE/compile) unless the user
    set their own; call before anything compiles (and before loader workers start, so they inherit it).
    Returns {"dir": inductor's cache folder, "warm": whether it already held something}."""
    env = os.environ if env is None else env
    root = root or cache_dir() / "compile"
    for var, name in COMPILE_CACHE_VARS.items():
        env.setdefault(var, str(root / name))  # a folder the user chose stays theirs
    folder = Path(env["TORCHINDUCTOR_CACHE_DIR"])
    warm = folder.is_dir() and any(folder.iterdir())
    return {"dir": str(folder), "warm": warm}
