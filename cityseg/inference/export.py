"""`cityseg-fast export`: a checkpoint's U-Net as ONNX or TorchScript for serving outside this package.

    cityseg-fast export --ckpt runs/X/checkpoints/best.pt --format onnx --out unet.onnx
    cityseg-fast export --ckpt runs/X/checkpoints/best.pt --format torchscript --out unet.pt

The exported graph is the eval-mode model in float32, NCHW: input `image` (N, 3, S, S) normalised as
in training ((x / 255 - mean) / std, ImageNet mean/std, RGB), output `logits` (N, C, S, S); N is
free, S is the training size from the checkpoint (or --image-size, a multiple of the model's output stride:
2**depth, or 32 for most timm encoders; an encoder model's graph re-normalises to its encoder's
mean/std itself, so every model takes the same input). The
preprocessing, class names and colours travel inside the file as JSON: ONNX `metadata_props`
["cityseg"], TorchScript extra file "cityseg.json".

ONNX uses the torch.export-based exporter (torch >= 2.9 default), which needs the `onnx` and
`onnxscript` packages; checking parity needs `onnxruntime`. TorchScript is deprecated upstream
(torch 2.14 warns) but is still what libtorch C++ loads, so it is kept and its warnings muted here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from cityseg.checkpoint import load_from_checkpoint
from cityseg.config import Config, ModelConfig
from cityseg.data.contract import IMAGENET_MEAN, IMAGENET_STD
from cityseg.errors import UserError
from cityseg.model import model_parameters, size_problem
from cityseg.outputs import new_output_file
from cityseg.palette import Palette
from cityseg.runtime import free_memory

Format = Literal["onnx", "torchscript"]
FORMATS: tuple[str, ...] = ("onnx", "torchscript")
ONNX_OPSET = 18  # the dynamo exporter's native opset: asking for an older one adds a lossy conversion pass
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # export, then the parity check: the `export` extra


class ExportError(UserError):
    """An export that cannot be done; the message is one line for the user."""


def export_metadata(palette: Palette, image_size: int, ckpt: Path) -> dict[str, Any]:
    return {
        "checkpoint": str(ckpt),
        "input": f"float32 (N, 3, {image_size}, {image_size}) RGB, (x / 255 - mean) / std",
        "output": "float32 logits (N, C, H, W); argmax over C gives trainIds",
        "image_size": image_size,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "class_names": list(palette.names),
        "class_colors": palette.colors.tolist(),
    }


def load_export_model(ckpt: str | os.PathLike) -> tuple[nn.Module, Config, Palette]:
    """The checkpoint's model on the CPU in float32, eval mode, plain NCHW weights."""
    model, cfg, palette, _ = load_from_checkpoint(ckpt, "cpu")
    return model.to(memory_format=torch.contiguous_format).float().eval(), cfg, palette


def export_model(ckpt: str | os.PathLike, fmt: str, out: str | os.PathLike, image_size: int | None = None,
                 overwrite: bool = False) -> Path:
    """Write the checkpoint's model to `out` as `fmt` ("onnx" | "torchscript"); returns `out`. `out`
    is a new file (or `overwrite`), never the checkpoint itself."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: expected onnx or torchscript")
    if fmt == "onnx":
        require_onnx()
    ckpt = Path(ckpt)
    out = new_output_file(Path(out), "export", overwrite=overwrite, inputs=[(ckpt, "the checkpoint being read")])
    model, cfg, palette = load_export_model(ckpt)
    size = image_size or cfg.data.image_size
    problem = size_problem(cfg.model, size)
    if problem:
        raise ExportError(f"--image-size {size}: {problem}")
    check_export_fits(cfg, size)
    meta = export_metadata(palette, size, ckpt)
    m = cfg.model
    meta["model"] = {"encoder": m.encoder, "encoder_weights": m.encoder_weights, "encoder_sha256": m.encoder_sha256,
                     "encoder_licence": m.encoder_licence}
    example = torch.zeros(2, 3, size, size)  # batch 2: a batch of 1 would let torch.export specialise N
    try:
        if fmt == "torchscript":
            export_torchscript(model, example, out, meta)
        else:
            export_onnx(model, example, out, meta)
    except (torch.OutOfMemoryError, MemoryError):  # the estimate is a lower bound
        out.unlink(missing_ok=True)
        raise ExportError(f"--image-size {size}: out of memory while exporting; try a smaller size") from None
    return out


# Full-resolution tensors alive at once in an eval forward pass, per unit of width, besides the
# input (3 channels) and the logits (C): the decoder's last level holds the skip, the upsampled
# tensor, their concatenation and the block's output. A lower bound, so it refuses only what cannot fit.
LIVE_WIDTHS = 5


def export_bytes(cfg: ModelConfig, size: int, batch: int = 2) -> int:
    """A lower bound on the memory exporting (tracing a batch of `batch`) takes, in bytes (float32)."""
    return 4 * model_parameters(cfg) + 4 * batch * size * size * (3 + LIVE_WIDTHS * cfg.width + cfg.num_classes)


def check_export_fits(cfg: Config, size: int) -> None:
    """Refuse, before allocating, an --image-size whose forward pass cannot fit in free memory."""
    need, free = export_bytes(cfg.model, size), free_memory(torch.device("cpu"))
    if need > free:
        raise ExportError(f"--image-size {size}: exporting needs at least {need / 2**30:,.1f} GiB but "
                          f"{free / 2**30:,.1f} GiB of memory is free: choose a smaller --image-size")


def require_onnx() -> None:
    missing = [m for m in ONNX_PACKAGES if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"ONNX export needs the `export` extra ({', '.join(ONNX_PACKAGES)}; missing: "
                          f"{', '.join(missing)}): pip install 'cityseg-fast[export]' (from a checkout: "
                          "pip install -e '.[export]')")


def export_torchscript(model: nn.Module, example: torch.Tensor, out: Path, meta: dict[str, Any]) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        # Deprecation notices for torch.jit, and the tracer noting that the model's input-size check
        # becomes a constant: S is fixed by design, and convolutions take any batch size.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(out), _extra_files={"cityseg.json": json.dumps(meta)})


def export_onnx(model: nn.Module, example: torch.Tensor, out: Path, meta: dict[str, Any]) -> None:
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        model, (example,), dynamo=True, input_names=["image"], output_names=["logits"],
        dynamic_shapes=({0: batch},), opset_version=ONNX_OPSET, verbose=False,
    )
    program.model.metadata_props["cityseg"] = json.dumps(meta)
    program.save(str(out), external_data=False)  # one self-contained file (fine below 2 GB)


def run_exported(path: str | os.PathLike, fmt: str, images: torch.Tensor) -> torch.Tensor:
    """Logits of the exported model for normalised float32 (N, 3, S, S) images, on the CPU."""
    x = images.float().cpu().contiguous()
    if fmt == "torchscript":
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu")(x)
    if fmt == "onnx":
        if importlib.util.find_spec("onnxruntime") is None:
            require_onnx()  # names the whole `export` extra, not one package at a time
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (logits,) = session.run(["logits"], {"image": np.ascontiguousarray(x.numpy())})
        return torch.from_numpy(logits)
    raise ExportError(f"--format {fmt}: expected onnx or torchscript")


@torch.no_grad()
def check_parity(model: nn.Module, exported_path: str | os.PathLike, fmt: str, images: torch.Tensor) -> float:
    """Share of pixels whose argmax class is the same in PyTorch (fp32, eval) and the exported model."""
    model = model.float().eval().cpu()
    x = images.float().cpu()
    ref = model(x).argmax(1)
    got = run_exported(exported_path, fmt, x).argmax(1)
    return (ref == got).double().mean().item()


def read_metadata(path: str | os.PathLike, fmt: str) -> dict[str, Any]:
    """The JSON metadata written by `export_model`."""
    if fmt == "torchscript":
        extra = {"cityseg.json": ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        return json.loads(extra["cityseg.json"])
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return json.loads(props["cityseg"])
