"""U-Net for street-scene segmentation, built bottom-up from small typed modules.

ConvBlock (conv3x3-BN-ReLU x2) -> Down (max-pool + ConvBlock) and Up (2x upsample halving the
channels, concat the skip, ConvBlock) -> UNet. Width 64 / depth 4 / transpose is the classic U-Net
of Ronneberger et al. (31.0 M parameters); the default width 32 has a quarter of that (7.76 M).

Every op here (conv, BN, max-pool, transposed conv, bilinear upsample, cat on dim 1) keeps
channels-last strides, so a channels-last input runs end to end without hidden NCHW copies.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from cityseg.config import SETTINGS, ModelConfig

Upsample = Literal["transpose", "bilinear"]
UPSAMPLE_MODES = SETTINGS["model.upsample"].choices


Norm = Literal["batch", "group"]
GROUPS = 8  # GroupNorm groups; every stage's channel count (width * 2**i) divides by it when width does


def norm_layer(kind: Norm, channels: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(math.gcd(GROUPS, channels), channels)
    return nn.BatchNorm2d(channels)


class ConvBlock(nn.Sequential):
    """(conv3x3 - norm - ReLU) x 2. Convs carry no bias: the normalisation right after cancels it."""

    def __init__(self, in_channels: int, out_channels: int, norm: Norm = "batch") -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            norm_layer(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            norm_layer(norm, out_channels),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """Halve the resolution, then a ConvBlock: (B, C_in, H, W) -> (B, C_out, H/2, W/2)."""

    def __init__(self, in_channels: int, out_channels: int, norm: Norm = "batch") -> None:
        super().__init__(nn.MaxPool2d(2), ConvBlock(in_channels, out_channels, norm))


class Up(nn.Module):
    """Double the resolution while halving the channels, concat the skip, then a ConvBlock.

    (B, C, H, W) + skip (B, C/2, 2H, 2W) -> (B, C/2, 2H, 2W).
    `transpose` learns the upsampling (2x2 stride-2 transposed conv, the original U-Net);
    `bilinear` interpolates and lets a 1x1 conv halve the channels (fewer parameters, no
    checkerboard artefacts).
    """

    def __init__(self, in_channels: int, out_channels: int, mode: Upsample = "transpose", norm: Norm = "batch") -> None:
        super().__init__()
        if mode == "transpose":
            self.up: nn.Module = nn.ConvTranspose2d(in_channels, in_channels // 2, 2, stride=2)
        elif mode == "bilinear":
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(in_channels, in_channels // 2, 1),
            )
        else:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {mode!r}")
        self.conv = ConvBlock(in_channels // 2 + out_channels, out_channels, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)  # (B, C/2, 2H, 2W)
        x = torch.cat([skip, x], dim=1)  # (B, C/2 + C_skip, 2H, 2W)
        return self.conv(x)  # (B, C_out, 2H, 2W)


def check_input_size(height: int, width: int, depth: int) -> None:
    """Raise a ValueError unless height and width are divisible by 2**depth.

    Without the check an indivisible size fails deep inside torch.cat with a shape mismatch that
    names neither the input size nor the fix.
    """
    m = 2**depth
    if height % m == 0 and width % m == 0:
        return
    hints = []
    for name, size in (("height", height), ("width", width)):
        if size % m:
            lower, upper = size // m * m, (size // m + 1) * m
            hints.append(f"{name} {size} -> {lower} or {upper}" if lower else f"{name} {size} -> {upper}")
    raise ValueError(
        f"UNet(depth={depth}) needs height and width divisible by 2**{depth} = {m}; got {height}x{width} "
        f"(H x W). Nearest valid sizes: {', '.join(hints)}"
    )


class UNet(nn.Module):
    """U-Net: `depth` Down stages with channels width * 2**i, mirrored by Up stages, 1x1 head.

    Input (B, in_channels, H, W) with H and W divisible by 2**depth; output logits
    (B, num_classes, H, W) in the input's memory format.
    """

    def __init__(
        self,
        num_classes: int = 19,
        in_channels: int = 3,
        width: int = 32,
        depth: int = 4,
        upsample: Upsample = "transpose",
        norm: Norm = "batch",
    ) -> None:
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"UNet needs depth >= 1 and width >= 1, got depth={depth}, width={width}")
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
        self.num_classes, self.in_channels = num_classes, in_channels
        self.width, self.depth, self.upsample = width, depth, upsample
        ch = [width * 2**i for i in range(depth + 1)]
        self.stem = ConvBlock(in_channels, ch[0], norm)
        self.downs = nn.ModuleList(Down(ch[i], ch[i + 1], norm) for i in range(depth))
        self.ups = nn.ModuleList(Up(ch[i + 1], ch[i], upsample, norm) for i in reversed(range(depth)))
        self.head = nn.Conv2d(ch[0], num_classes, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                # He init keeps activation variance steady through the ReLU stack (torchvision ResNet).
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A plain Python check on the shape: free in eager, a shape guard under torch.compile.
        check_input_size(x.shape[-2], x.shape[-1], self.depth)
        x = self.stem(x)  # (B, w, H, W)
        skips = []
        for down in self.downs:
            skips.append(x)
            x = down(x)  # (B, 2C, H/2, W/2) per stage -> (B, w * 2**depth, H / 2**depth, W / 2**depth)
        for up in self.ups:
            x = up(x, skips.pop())  # (B, C/2, 2H, 2W) per stage -> (B, w, H, W)
        return self.head(x)  # (B, num_classes, H, W) logits


def build_model(cfg: ModelConfig) -> UNet:
    """The U-Net described by a ModelConfig (3-channel RGB input)."""
    return UNet(num_classes=cfg.num_classes, width=cfg.width, depth=cfg.depth, upsample=cfg.upsample, norm=cfg.norm)


def parameter_count(width: int, depth: int, upsample: str = "transpose", num_classes: int = 19,
                    in_channels: int = 3) -> int:
    """The number of parameters `UNet(...)` would have, computed without building it (a --depth 12
    U-Net would need terabytes just to exist)."""

    def block(cin: int, cout: int) -> int:  # two bias-free 3x3 convs, two BatchNorms
        return 9 * cout * (cin + cout) + 4 * cout

    ch = [width * 2**i for i in range(depth + 1)]
    total = block(in_channels, ch[0]) + sum(block(ch[i], ch[i + 1]) for i in range(depth))
    for i in range(depth):
        cin, half = ch[i + 1], ch[i + 1] // 2
        total += (4 if upsample == "transpose" else 1) * cin * half + half  # the upsampling conv, with bias
        total += block(half + ch[i], ch[i])
    return total + ch[0] * num_classes + num_classes  # 1x1 head


# Activations a training step keeps for backward, per image and pixel of the input, per unit of width:
# each level (resolution S / 2**i, width * 2**i channels) holds ~4 tensors in the encoder block and
# ~7 in the decoder (upsampled, concatenated, block); summed over levels that is ~22 * width * S**2
# values. 16 keeps the estimate a lower bound, so it refuses only what cannot fit.
ACTIVATIONS_PER_WIDTH_PIXEL = 16


def training_bytes(width: int, depth: int, image_size: int, batch_size: int, mixed: bool,
                   upsample: str = "transpose", num_classes: int = 19) -> int:
    """A lower bound on the memory a training step needs: fp32 weights, gradients and two AdamW
    moments (16 bytes a parameter) plus the saved activations of one batch."""
    params = parameter_count(width, depth, upsample, num_classes)
    activations = ACTIVATIONS_PER_WIDTH_PIXEL * width * image_size**2 * batch_size * (2 if mixed else 4)
    return 16 * params + activations


def _unwrap(model: nn.Module) -> nn.Module:
    # torch.compile wraps in OptimizedModule (._orig_mod), DDP in .module: describe the real model.
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (trainable or not; buffers such as BN statistics excluded)."""
    return sum(p.numel() for p in _unwrap(model).parameters())


def describe(model: nn.Module) -> str:
    """One line for logs, e.g. 'UNet(width=32, depth=4, upsample=transpose): 7.76 M parameters'."""
    inner = _unwrap(model)
    n = count_parameters(inner) / 1e6
    if isinstance(inner, UNet):
        arch = f"UNet(width={inner.width}, depth={inner.depth}, upsample={inner.upsample})"
        return f"{arch}: {n:.2f} M parameters"
    return f"{type(inner).__name__}: {n:.2f} M parameters"
