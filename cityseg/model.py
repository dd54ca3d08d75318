"""U-Net for street-scene segmentation, built bottom-up from small typed modules.

ConvBlock (conv3x3-BN-ReLU x2) -> Down (max-pool + ConvBlock) and Up (2x upsample halving the
channels, concat the skip, ConvBlock) -> UNet. Width 64 / depth 4 / transpose is the classic U-Net
of Ronneberger et al. (31.0 M parameters); the default width 32 has a quarter of that (7.76 M).

Every op here (conv, BN, max-pool, transposed conv, bilinear upsample, cat on dim 1) keeps
channels-last strides, so a channels-last input runs end to end without hidden NCHW copies.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from cityseg.config import SETTINGS, ModelConfig
from cityseg.data.contract import IMAGENET_MEAN, IMAGENET_STD
from cityseg.encoders import OURS, build_encoder, input_norm

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


def check_input_size(height: int, width: int, depth: int, model: str | None = None) -> None:
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
        f"{model or f'UNet(depth={depth})'} needs height and width divisible by 2**{depth} = {m}; got {height}x{width} "
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


class InputNorm(nn.Module):
    """Re-normalise the loaders' input (ImageNet mean/std, every loader's) to what a pretrained encoder
    expects (its timm `pretrained_cfg` mean/std): one per-channel affine map, x * scale + shift. Its
    buffers travel in the state dict, so a checkpoint records the normalisation its weights were
    trained with, and eval, predict and export (the graph holds it) apply it."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        m_in, s_in = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        m, s = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        self.register_buffer("scale", (s_in / s).view(1, 3, 1, 1))
        self.register_buffer("shift", ((m_in - m) / s).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)

    def mean_std(self) -> tuple[list[float], list[float]]:
        """The encoder's (mean, std) on 0..1 RGB, back from the buffers."""
        m_in, s_in = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        std = s_in / self.scale.flatten().cpu()
        return (m_in - self.shift.flatten().cpu() * std).tolist(), std.tolist()


class _Fp32UnderCpuAutocast:
    """Mixed into a depthwise conv's class: under CPU autocast it runs in fp32. oneDNN's bf16
    depthwise backward is several times slower than its fp32 one (batch 8 at 128 px, one thread,
    AMX CPU: 15.5 vs 4.7 ms for Lite0's 1152-channel 5x5, 48 vs 10 ms for its 144-channel one); a
    whole Lite0 step takes 427 ms this way against 542 ms left in bf16 (benchmarks/train_step.py
    --depthwise fp32,bf16). GPUs, fp32 runs and exports (no autocast) take the class's own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())  # type: ignore[misc]
        return super().forward(x)  # type: ignore[misc]


@functools.cache
def _fp32_under_cpu_autocast(cls: type) -> type:
    return type(cls.__name__, (_Fp32UnderCpuAutocast, cls), {"__module__": cls.__module__})


def depthwise_in_fp32_on_cpu(module: nn.Module, enabled: bool = True) -> int:
    """Give every depthwise conv in `module` the fp32-under-CPU-autocast forward (`enabled=False`:
    their own class's again, for benchmarks/train_step.py's side by side); the modules keep their
    names, parameters and state-dict keys (only the class changes). Returns how many."""
    convs = [m for m in module.modules()
             if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels]
    for conv in convs:
        own = type(conv).__bases__[1] if isinstance(conv, _Fp32UnderCpuAutocast) else type(conv)
        conv.__class__ = _fp32_under_cpu_autocast(own) if enabled else own
    return len(convs)


class DecoderBlock(nn.Module):
    """2x nearest upsampling, concat the encoder's feature at that stride (if it has one), ConvBlock:
    (B, C_in, H, W) + skip (B, C_skip, 2H, 2W) -> (B, C_out, 2H, 2W) (smp's UnetDecoder block)."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, norm: Norm = "batch") -> None:
        super().__init__()
        self.conv = ConvBlock(in_channels + skip_channels, out_channels, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
        if skip is not None:
            x = torch.cat([skip, x], dim=1)
        return self.conv(x)


class EncoderUNet(nn.Module):
    """A U-Net decoder on a timm backbone (`features_only`): the encoder's features at strides
    r_1 < ... < r_n (e.g. 2, 4, 8, 16, 32), a DecoderBlock per halving of the stride from r_n down to
    1, each taking the encoder feature of its stride, a 1x1 head. The decoder's channels at stride s
    are width * s, our U-Net's rule (at width 16: 256, 128, 64, 32, 16, smp's default decoder).

    Input (B, 3, H, W), normalised as every loader does (ImageNet mean/std), H and W multiples of
    the output stride r_n; output logits (B, num_classes, H, W)."""

    def __init__(self, encoder: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], num_classes: int = 19,
                 width: int = 16, norm: Norm = "batch", name: str = "") -> None:
        super().__init__()
        self.name, self.width, self.num_classes = name, width, num_classes
        self.input_norm = InputNorm(mean, std)
        self.encoder = encoder
        depthwise_in_fp32_on_cpu(encoder)
        channels, strides = encoder.feature_info.channels(), encoder.feature_info.reduction()
        self.feature_strides: list[int] = list(strides)  # the sizes' rule makes these exact
        self.output_stride = max(strides)
        skip_at = dict(zip(strides, channels, strict=True))
        self.skip_strides: list[int] = []
        blocks, c_in, s = [], skip_at[self.output_stride], self.output_stride
        while s > 1:
            s //= 2
            self.skip_strides.append(s)
            blocks.append(DecoderBlock(c_in, skip_at.get(s, 0), width * s, norm))
            c_in = width * s
        self.decoder = nn.ModuleList(blocks)
        self.head = nn.Conv2d(width, num_classes, 1)
        for m in [*self.decoder.modules(), self.head]:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def freeze_encoder_bn(self) -> None:
        """Keep the encoder's BatchNorms in eval mode from now on, whatever `train()` says: they
        normalise with the pretrained running statistics, which a batch of 8 crops would only make
        noisier, and never update them (their affine weights still learn)."""
        self.encoder_bn_frozen = True
        self.train(self.training)

    def train(self, mode: bool = True) -> EncoderUNet:
        super().train(mode)
        if getattr(self, "encoder_bn_frozen", False):
            for m in self.encoder.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x.shape[-2], x.shape[-1], self.output_stride.bit_length() - 1, self.name)
        features = self.encoder(self.input_norm(x))  # (B, C_i, H / r_i, W / r_i), shallow to deep
        # Keyed by the encoder's declared strides, not by sizes: under torch.jit.trace a size is a
        # tensor, and a dict keyed by tensors finds no skip at all (a TorchScript export lost them).
        by_stride = dict(zip(self.feature_strides, features, strict=True))
        y = features[-1]
        for stride, block in zip(self.skip_strides, self.decoder, strict=True):
            y = block(y, by_stride.get(stride))  # (B, width * stride, H / stride, W / stride)
        return self.head(y)  # (B, num_classes, H, W) logits


def build_model(cfg: ModelConfig, encoder_weights: Path | None = None) -> nn.Module:
    """The model a ModelConfig describes (3-channel RGB input): our U-Net, or a U-Net decoder on the
    timm encoder `cfg.encoder`, random or starting from `encoder_weights` (a file already checked by
    `encoders.resolve_weights`; a checkpoint's weights replace either)."""
    if cfg.encoder == OURS:
        return UNet(num_classes=cfg.num_classes, width=cfg.width, depth=cfg.depth, upsample=cfg.upsample,
                    norm=cfg.norm)
    mean, std = input_norm(cfg.encoder)
    return EncoderUNet(build_encoder(cfg.encoder, encoder_weights), mean, std, cfg.num_classes, cfg.width,
                       cfg.norm, cfg.encoder)


@functools.cache
def _encoder_facts(cfg: ModelConfig) -> tuple[int, int]:
    """(parameters, output stride) of the encoder model `cfg` describes, built on the meta device."""
    with torch.device("meta"):
        model = build_model(cfg)
    return count_parameters(model), model.output_stride


def output_stride(cfg: ModelConfig) -> int:
    """The factor image sizes must be a multiple of: 2**depth for our U-Net, the encoder's deepest
    feature stride (32 for most timm backbones) for an encoder model."""
    return 2**cfg.depth if cfg.encoder == OURS else _encoder_facts(cfg)[1]


def size_problem(cfg: ModelConfig, size: int) -> str | None:
    """Why a square `size` does not fit the model, with the nearest sizes that do; None when it fits."""
    m = output_stride(cfg)
    if size % m == 0:
        return None
    lower, upper = size // m * m, (size // m + 1) * m
    what = f"a U-Net of --depth {cfg.depth}" if cfg.encoder == OURS else f"--encoder {cfg.encoder}"
    return f"{what} needs a multiple of {m} (nearest: {f'{lower} or {upper}' if lower else upper})"


def model_parameters(cfg: ModelConfig) -> int:
    """The number of parameters of the model `cfg` describes, without allocating it."""
    if cfg.encoder == OURS:
        return parameter_count(cfg.width, cfg.depth, cfg.upsample, cfg.num_classes)
    return _encoder_facts(cfg)[0]


def model_training_bytes(cfg: ModelConfig, image_size: int, batch_size: int, mixed: bool) -> int:
    """`training_bytes` for any model: an encoder model's decoder follows our U-Net's width rule, so the
    U-Net's activation bound (its encoder's activations left out) stays a lower bound."""
    activations = ACTIVATIONS_PER_WIDTH_PIXEL * cfg.width * image_size**2 * batch_size * (2 if mixed else 4)
    return 16 * model_parameters(cfg) + activations


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
    if isinstance(inner, EncoderUNet):
        return f"U-Net decoder (width={inner.width}) on {inner.name}: {n:.2f} M parameters"
    return f"{type(inner).__name__}: {n:.2f} M parameters"
