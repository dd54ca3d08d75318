"""The runtime policy as a pure function of what the device can do: precision, compilation, notes."""

from __future__ import annotations

import pytest
import torch

from cityseg.errors import OptionError
from cityseg.runtime import Capabilities, Runtime, choose_compile, choose_precision, resolve_runtime

H100 = Capabilities("cuda", bf16=True, capability=(9, 0))
T4 = Capabilities("cuda", bf16=False, capability=(7, 5))
P100 = Capabilities("cuda", bf16=False, capability=(6, 0))
AMX_CPU = Capabilities("cpu", bf16=True)
OLD_CPU = Capabilities("cpu", bf16=False)


@pytest.mark.parametrize("caps,expected", [
    (H100, "bf16-mixed"), (T4, "16-mixed"), (P100, "16-mixed"), (AMX_CPU, "bf16-mixed"), (OLD_CPU, "32"),
])
def test_auto_precision(caps: Capabilities, expected: str) -> None:
    assert choose_precision("auto", caps)[0] == expected


def test_explicit_precisions() -> None:
    assert choose_precision("32", H100) == ("32", [])
    assert choose_precision("16-mixed", H100) == ("16-mixed", [])
    precision, notes = choose_precision("bf16-mixed", OLD_CPU)  # allowed, but said to be slow
    assert precision == "bf16-mixed" and "emulated" in notes[0]
    with pytest.raises(OptionError, match="no native bf16"):
        choose_precision("bf16-mixed", T4)
    with pytest.raises(OptionError, match="needs a CUDA GPU"):
        choose_precision("16-mixed", AMX_CPU)
    with pytest.raises(OptionError, match="--precision"):
        choose_precision("fp8", H100)


def test_fp16_says_so_and_needs_a_scaler() -> None:
    precision, notes = choose_precision("auto", T4)
    assert "gradient scaler" in notes[0]
    rt = Runtime(torch.device("cpu"), precision, compile=False)
    assert rt.needs_grad_scaler and rt.amp_dtype == torch.float16
    assert not Runtime(torch.device("cpu"), "bf16-mixed", False).needs_grad_scaler


@pytest.mark.parametrize("caps,requested,expected", [
    (H100, None, True), (T4, None, True), (AMX_CPU, None, False), (AMX_CPU, True, True), (H100, False, False),
    (P100, None, False), (P100, True, False),
])
def test_compile_policy(caps: Capabilities, requested: bool | None, expected: bool) -> None:
    compile_, notes = choose_compile(requested, caps)
    assert compile_ is expected
    assert bool(notes) == (caps is P100 and requested is not False)  # said once, where it changed the request


def test_batch_dtype_follows_the_device() -> None:
    assert Runtime(torch.device("cpu"), "bf16-mixed", False).batch_dtype == torch.float32
    assert Runtime(torch.device("cuda"), "bf16-mixed", False).batch_dtype == torch.bfloat16
    assert Runtime(torch.device("cuda"), "16-mixed", False).batch_dtype == torch.float16
    assert Runtime(torch.device("cuda"), "32", False).batch_dtype == torch.float32


def test_resolve_on_this_machine() -> None:
    rt = resolve_runtime("cpu", "32", compile=None)
    assert rt.device == torch.device("cpu") and rt.precision == "32" and rt.compile is False
    with pytest.raises(OptionError, match="--device"):
        resolve_runtime("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(OptionError, match="no CUDA GPU"):
            resolve_runtime("cuda")
