"""U-Net tests, CPU only: one base class run for each upsample mode (smp `tests/models/base.py`).

/work/venv/bin/pytest tests/test_model.py
"""

from __future__ import annotations

import pytest
import torch

from cityseg.config import ModelConfig
from cityseg.model import UNet, build_model, count_parameters, describe

NUM_CLASSES = 5
SIZES = [(48, 80), (16, 16)]  # non-square, not powers of two, and the smallest valid for depth 4


class UNetTestBase:
    """Every UNet variant must pass these; subclasses pick the upsample mode."""

    upsample: str

    def make(self, depth: int) -> UNet:
        torch.manual_seed(0)
        return UNet(num_classes=NUM_CLASSES, width=8, depth=depth, upsample=self.upsample)

    @pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
    @pytest.mark.parametrize("depth", [2, 3, 4])
    def test_forward_backward(self, depth: int, size: tuple[int, int]) -> None:
        model = self.make(depth)
        x = torch.randn(2, 3, *size, requires_grad=True)
        y = model(x)
        assert y.shape == (2, NUM_CLASSES, *size)
        y.float().square().mean().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name

    def test_channels_last(self) -> None:
        model = self.make(3).to(memory_format=torch.channels_last)
        x = torch.randn(2, 3, 48, 80).contiguous(memory_format=torch.channels_last).requires_grad_()
        y = model(x)
        assert y.is_contiguous(memory_format=torch.channels_last)
        y.sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        assert all(p.grad is not None for p in model.parameters())
        torch.testing.assert_close(y, self.make(3)(x.detach().contiguous()), rtol=1e-4, atol=1e-4)

    def test_bf16_autocast(self) -> None:
        """bf16 autocast computes what float32 computes, to bf16's precision (8 bits of mantissa)."""
        model = self.make(2)
        x = torch.randn(2, 3, 16, 16)
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        assert y.dtype == torch.bfloat16
        scale = reference.abs().max().item()
        torch.testing.assert_close(y.float(), reference, rtol=0, atol=0.05 * scale)
        assert (y.float() - reference).abs().mean().item() < 0.01 * scale

    def test_compile_matches_eager(self) -> None:
        model = self.make(2).eval()  # eval: BN running stats, so both calls see identical weights
        x = torch.randn(1, 3, 16, 24)
        compiled = torch.compile(model, backend="eager")
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x))
            with pytest.raises(ValueError, match="18x24"):  # the size check survives tracing
                compiled(torch.randn(1, 3, 18, 24))

    @pytest.mark.parametrize("size", [(50, 64), (64, 100), (8, 8)])
    def test_indivisible_size_raises(self, size: tuple[int, int]) -> None:
        h, w = size
        with pytest.raises(ValueError, match=rf"{h}x{w}") as err:
            self.make(4)(torch.randn(1, 3, h, w))
        assert "16" in str(err.value)  # says the divisor 2**4


class TestUNetTranspose(UNetTestBase):
    upsample = "transpose"


class TestUNetBilinear(UNetTestBase):
    upsample = "bilinear"


def test_error_suggests_nearest_sizes() -> None:
    with pytest.raises(ValueError, match=r"height 50 -> 48 or 64"):
        UNet(width=4, depth=4)(torch.randn(1, 3, 50, 64))


@pytest.mark.parametrize(
    ("width", "upsample", "lo", "hi"),
    [(64, "transpose", 30.5e6, 31.5e6), (32, "transpose", 7.7e6, 7.8e6), (32, "bilinear", 7.2e6, 7.3e6)],
)
def test_parameter_count(width: int, upsample: str, lo: float, hi: float) -> None:
    with torch.device("meta"):  # no memory, no init cost: only shapes matter
        model = UNet(num_classes=19, width=width, depth=4, upsample=upsample)
    assert lo <= count_parameters(model) <= hi


def test_build_model_and_describe() -> None:
    with torch.device("meta"):
        model = build_model(ModelConfig(num_classes=19, width=32, depth=4, upsample="transpose"))
    assert (model.width, model.depth, model.upsample, model.num_classes) == (32, 4, "transpose", 19)
    assert describe(model) == "UNet(width=32, depth=4, upsample=transpose): 7.76 M parameters"


def test_init() -> None:
    model = UNet(num_classes=3, width=4, depth=2)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all((m.weight == 1).all() and (m.bias == 0).all() for m in bns)
    convs3x3 = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert convs3x3 and all(m.bias is None for m in convs3x3)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="upsample"):
        UNet(upsample="nearest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="depth"):
        UNet(depth=0)
