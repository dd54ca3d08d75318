"""kernels/mask_to_class.py: every backend equals the torch reference exactly.

    pytest tests/test_mask_kernel.py                      # Triton kernel through its interpreter on CPU
    TRITON_INTERPRET=1 pytest tests/test_mask_kernel.py   # the same, with `backend="auto"` picking it

On CPU tensors `backend="triton"` always runs Triton's interpreter, so these tests need neither a GPU
nor TRITON_INTERPRET set before triton's import; `test_auto_backend_under_triton_interpret` checks the
environment-variable path in a fresh process. GPU-marked tests repeat the comparisons on CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from kernels.mask_to_class import build_lut, mask_to_class_reference
from kernels.mask_to_class import mask_to_class as kernel_mask_to_class

ROOT = Path(__file__).resolve().parents[1]
_LUTS: dict[tuple, torch.Tensor] = {}


def mask_to_class(mask, centers, classes, max_dist=None, **kw):
    """The kernel's entry point; `backend="lut"` gets its table (built once per palette here, as
    `cityseg.palette.lookup_table` does for the package)."""
    if kw.get("backend") == "lut" and "lut" not in kw:
        key = (centers.cpu().numpy().tobytes(), classes.cpu().numpy().tobytes(), max_dist)
        if key not in _LUTS:
            _LUTS[key] = build_lut(centers, classes, max_dist)
        kw["lut"] = _LUTS[key]
    return kernel_mask_to_class(mask, centers, classes, max_dist, **kw)
CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu


def random_table(k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k integer-valued centres and their class ids (some void)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randint(0, 256, (k, 3), generator=g).to(torch.float32)
    classes = torch.randint(0, 20, (k,), generator=g)
    classes[classes == 19] = 255
    return centers, classes


def random_masks(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (*shape, 3), generator=g, dtype=torch.uint8)


def check(mask: torch.Tensor, centers, classes, max_dist=None, backends=("triton",), **kw) -> None:
    ref_kw = {key: v for key, v in kw.items() if key != "block_size"}
    expected = mask_to_class_reference(mask, centers, classes, max_dist, **ref_kw)
    for backend in backends:
        got = mask_to_class(mask, centers, classes, max_dist, backend=backend, **kw)
        assert got.dtype == expected.dtype and got.device == mask.device, backend
        assert torch.equal(got, expected), f"{backend} differs on {int((got != expected).sum())} pixels"


@pytest.mark.parametrize("k", [1, 20, 34, 64])
@pytest.mark.parametrize("max_dist", [None, 40.0])
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 7, 13), (2, 255, 257)])
def test_triton_matches_reference(k, max_dist, shape):
    centers, classes = random_table(k, seed=k)
    check(random_masks(shape, seed=sum(shape)), centers, classes, max_dist)


@pytest.mark.parametrize("block", [16, 128, 1024])
def test_blocks_smaller_than_the_image(block):
    centers, classes = random_table(34, seed=3)
    check(random_masks((3, 7, 13), seed=1), centers, classes, 60.0, block_size=block)


def test_extreme_colours_and_duplicate_centres():
    """The packed loop's range limits: centres and pixels at the RGB cube's corners, many ties."""
    corners = torch.tensor([[r, g, b] for r in (0, 255) for g in (0, 255) for b in (0, 255)], dtype=torch.float32)
    centers = torch.cat([corners.repeat(7, 1), torch.tensor([[128.0, 128, 128]] * 8)])  # K = 64
    classes = torch.arange(64) % 21
    mask = torch.cat(
        [corners.to(torch.uint8), torch.tensor([[0, 255, 128], [127, 128, 128], [255, 255, 254]], dtype=torch.uint8)]
    )
    for max_dist in (None, 0.0, 1.0, 500.0):
        check(mask.view(1, 1, -1, 3), centers, classes, max_dist)
        check(random_masks((1, 40, 50), seed=6), centers, classes, max_dist)


@pytest.mark.parametrize("kind", ["fractional", "out of range"])
def test_non_integer_centres_take_the_direct_loop(kind):
    from kernels.mask_to_class import _kernel_table

    centers, classes = random_table(34, seed=11)
    centers = centers + 0.37 if kind == "fractional" else centers * 1.5 - 60
    assert not _kernel_table(centers, classes, torch.device("cpu"))[2]
    for max_dist in (None, 45.5):
        check(random_masks((2, 31, 37), seed=12), centers, classes, max_dist)  # the interpreter: exact


def test_integer_centres_take_the_packed_loop():
    from kernels.mask_to_class import _kernel_table

    centers, classes = random_table(64, seed=1)
    table, _, packed = _kernel_table(centers, classes, torch.device("cpu"))
    assert packed and torch.equal(table, table.round()) and table.abs().max() < 2**24


def test_reference_equals_numpy_brute_force():
    """The torch reference (also `cityseg.palette.map_colors_reference`) against numpy in float64:
    exact squared distances for integer centres, np.argmin's first index on ties."""
    import numpy as np

    from cityseg.palette import cityscapes_palette

    pal = cityscapes_palette()
    mask = random_masks((2, 33, 31), seed=5)
    rgb = mask.reshape(-1, 3).numpy().astype(np.float64)
    d2 = ((rgb[:, None, :] - pal.centers.numpy().astype(np.float64)[None]) ** 2).sum(-1)
    nearest = d2.argmin(1)
    for max_dist in (None, 50.0):
        ids = pal.classes.numpy()[nearest]
        if max_dist is not None:
            ids = np.where(d2.min(1) > max_dist**2, 255, ids)
        expected = torch.from_numpy(ids.reshape(mask.shape[:3]))
        assert torch.equal(mask_to_class_reference(mask, pal.centers, pal.classes, max_dist), expected)


def test_cityscapes_palette_all_backends():
    """The 34 Cityscapes colours, their exact colours and noisy ones; the LUT path included."""
    from cityseg.palette import cityscapes_palette

    pal = cityscapes_palette()
    g = torch.Generator().manual_seed(0)
    exact = pal.centers.to(torch.uint8).view(1, 1, -1, 3)
    noisy = (
        (
            pal.centers[torch.randint(0, 34, (2, 40, 50), generator=g)]
            + torch.randint(-12, 13, (2, 40, 50, 3), generator=g)
        )
        .clamp(0, 255)
        .to(torch.uint8)
    )
    for mask in (exact, noisy, random_masks((2, 40, 50), seed=2)):
        check(mask, pal.centers, pal.classes, backends=("triton", "lut"))
    own = mask_to_class(pal.colors.view(1, 1, -1, 3), pal.centers, pal.classes, backend="lut")
    assert own.flatten().tolist() == list(range(pal.num_classes))  # each train colour maps to its class


def test_lut_with_max_dist():
    centers = torch.tensor([[0.0, 0.0, 0.0], [200.0, 100.0, 50.0]])
    classes = torch.tensor([3, 7])
    check(random_masks((2, 64, 80), seed=4), centers, classes, 90.0, backends=("triton", "lut"))


def test_strided_views_and_layouts():
    from cityseg.palette import cityscapes_palette

    pal = cityscapes_palette()
    random_centers, random_classes = random_table(34, seed=7)
    tables = [  # the lookup table only for the Cityscapes palette: building one takes seconds
        (pal.centers, pal.classes, None, ("triton", "lut", "reference")),
        (random_centers, random_classes, 50.0, ("triton", "reference")),
    ]
    pairs = random_masks((2, 9, 22), seed=8)  # decoded pairs: photo | mask, W = 11
    views = {
        "right half": pairs[:, :, 11:],
        "left half": pairs[:, :, :11],
        "every other row and col": pairs[:, ::2, 1::3],
        "single mask (H, W, 3)": pairs[1, :, 11:],
    }
    for centers, classes, max_dist, backends in tables:
        for name, view in views.items():
            assert not view.is_contiguous(), name
            expected = mask_to_class_reference(view.contiguous(), centers, classes, max_dist)
            for backend in backends:
                got = mask_to_class(view, centers, classes, max_dist, backend=backend)
                assert torch.equal(got, expected), (name, backend)
        nchw = pairs[:, :, 11:].permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
        expected = mask_to_class_reference(pairs[:, :, 11:], centers, classes, max_dist)
        for backend in backends:
            got = mask_to_class(nchw, centers, classes, max_dist, layout="nchw", backend=backend)
            assert torch.equal(got, expected), backend
            got = mask_to_class(nchw[0], centers, classes, max_dist, layout="nchw", backend=backend)
            assert torch.equal(got, expected[0]), backend


def test_lut_colour_codes_on_every_storage_layout():
    """The LUT path reads 4 unaligned bytes per pixel: views that start at or end on their storage's edge."""
    from kernels.mask_to_class import _rgb_codes, _rgb_codes_torch

    pairs = random_masks((3, 5, 14), seed=9)
    views = [
        pairs,  # ends on the storage's last byte, starts at 0
        pairs[:, :, 7:],  # ends on the last byte, starts inside
        pairs[:, :, :7],  # room after the last pixel
        pairs[:1, :1, :1].clone(),  # one pixel: nothing to read around it
        pairs[:, :, :1].clone(),  # one pixel a row, the storage ending at the last
        pairs[:, ::2, 1::3],
        pairs.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1),  # channels-first storage
    ]
    half = torch.from_numpy(pairs.numpy()[:, :, 7:])  # the mask half as read_sample gives it: storage = the view
    views.append(half)
    for view in views:
        codes = _rgb_codes(view)
        assert codes.dtype == torch.int32 and torch.equal(codes, _rgb_codes_torch(view))
    assert _rgb_codes(torch.tensor([[[[1, 2, 3]]]], dtype=torch.uint8)).item() == (1 << 16) | (2 << 8) | 3


def test_the_mask_half_of_a_decoded_pair_takes_the_fast_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plain loader hands the mask half over as torch.from_numpy of a numpy view, whose storage ends
    at its last pixel: no pixel takes the slow three-plane path (all did, ~9 % of the plain loader's
    images/s on the Kaggle pairs)."""
    import kernels.mask_to_class as mtc

    pairs = random_masks((2, 6, 16), seed=3)
    half = torch.from_numpy(pairs.numpy()[:, :, 8:])
    slow: list[int] = []
    plain = mtc._rgb_codes_torch
    monkeypatch.setattr(mtc, "_rgb_codes_torch", lambda x: slow.append(x.numel() // 3) or plain(x))
    assert torch.equal(mtc._rgb_codes(half), plain(half))
    assert slow == []  # each row's last pixel is read apart, by numpy too


def test_ties_go_to_the_lowest_centre():
    # (10, 10, 10) is 2 away from the first two centres; the third shares the first one's colour;
    # (8, 10, 20) is 10 away from both (8, 10, 10) and (8, 10, 30).
    centers = torch.tensor([[8.0, 10, 10], [12, 10, 10], [8, 10, 10], [8, 10, 30]])
    classes = torch.tensor([4, 5, 6, 7])
    mask = torch.tensor([[[10, 10, 10], [8, 10, 10], [12, 10, 10], [8, 10, 20]]], dtype=torch.uint8)
    for backend in ("triton", "lut", "reference"):
        got = mask_to_class(mask, centers, classes, backend=backend)
        assert got.tolist() == [[4, 4, 5, 4]], backend
        swapped = mask_to_class(mask, centers[[3, 1, 0, 2]], classes[[3, 1, 0, 2]], backend=backend)
        assert swapped.tolist() == [[5, 4, 5, 7]], backend


def test_ties_go_to_the_lowest_centre_with_fractional_centres_too():
    """The same rule on the kernel's direct loop (centres that are not whole numbers): (10, 10, 10) is
    exactly 1.5^2 from (8.5, 10, 10) and (11.5, 10, 10), and a repeated centre goes to its first class."""
    from kernels.mask_to_class import _kernel_table

    centers = torch.tensor([[8.5, 10, 10], [11.5, 10, 10], [8.5, 10, 10]])
    classes = torch.tensor([4, 5, 6])
    assert not _kernel_table(centers, classes, torch.device("cpu"))[2]  # the direct loop
    mask = torch.tensor([[[10, 10, 10], [8, 10, 10], [12, 10, 10]]], dtype=torch.uint8)
    for backend in ("triton", "reference"):
        assert mask_to_class(mask, centers, classes, backend=backend).tolist() == [[4, 4, 5]], backend
        swapped = mask_to_class(mask, centers[[1, 0, 2]], classes[[1, 0, 2]], backend=backend)
        assert swapped.tolist() == [[5, 4, 5]], backend


def test_cityscapes_shared_colour_goes_to_the_train_class():
    from cityseg.palette import cityscapes_palette

    pal = cityscapes_palette()
    pole = pal.names.index("pole")
    mask = torch.tensor([[[153, 153, 153]]], dtype=torch.uint8)  # pole and polegroup share it
    for backend in ("triton", "lut", "reference"):
        assert mask_to_class(mask, pal.centers, pal.classes, backend=backend).item() == pole


def test_max_dist_boundary_is_inclusive():
    centers = torch.tensor([[0.0, 0.0, 0.0]])
    classes = torch.tensor([2])
    mask = torch.tensor([[[3, 4, 0], [3, 4, 1]]], dtype=torch.uint8)  # distances 5 and sqrt(26)
    for backend in ("triton", "reference"):
        assert mask_to_class(mask, centers, classes, 5.0, backend=backend).tolist() == [[2, 255]]
        assert mask_to_class(mask, centers, classes, 4.999, backend=backend).tolist() == [[255, 255]]


def test_uint8_output():
    centers, classes = random_table(20, seed=9)
    mask = random_masks((2, 17, 19), seed=9)
    expected = mask_to_class_reference(mask, centers, classes, 30.0)
    for backend in ("triton", "reference"):
        got = mask_to_class(mask, centers, classes, 30.0, backend=backend, out_dtype=torch.uint8)
        assert got.dtype == torch.uint8 and torch.equal(got.long(), expected)


def test_auto_backend_follows_triton_interpret(monkeypatch):
    """On CPU, `auto` is the interpreted kernel under TRITON_INTERPRET=1, else the table when given,
    else the reference; class ids above 255 do not fit a table."""
    centers, _ = random_table(3, seed=1)
    classes = torch.tensor([300, 301, 302])
    mask = random_masks((1, 5, 6), seed=1)
    expected = mask_to_class_reference(mask, centers, classes)
    with pytest.raises(ValueError, match="byte"):
        build_lut(centers, classes)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert torch.equal(kernel_mask_to_class(mask, centers, classes), expected)
    small = torch.tensor([3, 1, 2])
    lut = build_lut(centers, small)
    calls = []
    monkeypatch.setattr("kernels.mask_to_class._gather_lut", lambda *a: calls.append(a) or torch.zeros(1, 5, 6))
    kernel_mask_to_class(mask, centers, small, lut=lut)
    assert len(calls) == 1  # the table path
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert torch.equal(kernel_mask_to_class(mask, centers, classes), expected)


def test_auto_backend_under_triton_interpret():
    """TRITON_INTERPRET=1 set before anything imports triton: `auto` on CPU runs the kernel."""
    code = textwrap.dedent(
        """
        import torch
        from kernels.mask_to_class import mask_to_class, mask_to_class_reference
        g = torch.Generator().manual_seed(0)
        centers = torch.randint(0, 256, (34, 3), generator=g).float()
        classes = torch.arange(300, 334)  # beyond a byte: the lookup table would refuse them
        mask = torch.randint(0, 256, (2, 31, 29, 3), generator=g, dtype=torch.uint8)
        got = mask_to_class(mask, centers, classes, 70.0)
        print("OK" if torch.equal(got, mask_to_class_reference(mask, centers, classes, 70.0)) else "MISMATCH")
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("OK"), res.stdout


def test_bad_inputs():
    centers, classes = random_table(4, seed=0)
    mask = random_masks((1, 4, 4), seed=0)
    with pytest.raises(ValueError, match="uint8"):
        mask_to_class(mask.float(), centers, classes)
    with pytest.raises(ValueError, match="channels"):
        mask_to_class(mask[..., :2], centers, classes)
    with pytest.raises(ValueError, match="layout"):
        mask_to_class(mask, centers, classes, layout="hwc")
    with pytest.raises(ValueError, match="K <= 64"):
        mask_to_class(mask, torch.zeros(65, 3), torch.zeros(65, dtype=torch.int64))
    with pytest.raises(ValueError, match="classes"):
        mask_to_class(mask, centers, classes[:3])
    with pytest.raises(ValueError, match="0..255"):
        mask_to_class(mask, centers, classes + 300, backend="triton", out_dtype=torch.uint8)
    with pytest.raises(ValueError, match="backend"):
        mask_to_class(mask, centers, classes, backend="numba")


def decoded_masks(sample_dir: Path, n: int) -> torch.Tensor:
    """The mask halves of n real pairs, as a strided view of the decoded (n, H, 2W, 3) batch."""
    from PIL import Image

    files = sorted((sample_dir / "val").glob("*.jpg"))[:n]
    pairs = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]))
    return pairs[:, :, pairs.shape[2] // 2 :]  # decoded JPEG masks carry real compression noise


def test_real_sample_masks(real_sample):
    from cityseg.palette import cityscapes_palette

    pal = cityscapes_palette()
    masks = decoded_masks(real_sample, 3)
    check(masks, pal.centers, pal.classes, backends=("triton", "lut"))
    check(masks, pal.centers, pal.classes, 30.0)


@gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("k", [1, 20, 34, 64])
@pytest.mark.parametrize("max_dist", [None, 40.0])
def test_gpu_matches_reference(k, max_dist):
    centers, classes = random_table(k, seed=k)
    for shape in [(1, 1, 1), (1, 7, 13), (3, 255, 257), (8, 256, 256)]:
        mask = random_masks(shape, seed=sum(shape)).cuda()
        check(mask, centers, classes, max_dist)  # CPU tables: copied to the device once, cached
        check(mask, centers.cuda(), classes.cuda(), max_dist, block_size=128)
        check(mask, centers.cuda(), classes.cuda(), max_dist, out_dtype=torch.uint8)


@gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_non_integer_centres_differ_only_on_near_ties():
    centers, _ = random_table(34, seed=11)
    centers = centers + torch.rand(34, 3, generator=torch.Generator().manual_seed(0))
    classes = torch.arange(34)  # ids are centre indices: a mismatch names both centres
    mask = random_masks((4, 256, 256), seed=3).cuda()
    got = mask_to_class(mask, centers, classes)
    expected = mask_to_class_reference(mask, centers, classes)
    diff = got != expected
    if diff.any():
        x = mask[diff].double()
        c = centers.cuda().double()
        d_got = ((x - c[got[diff]]) ** 2).sum(1)
        d_ref = ((x - c[expected[diff]]) ** 2).sum(1)
        assert torch.allclose(d_got, d_ref, rtol=1e-5), "kernel and reference disagree beyond rounding"
    assert diff.float().mean() < 1e-4


@gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_strided_views_and_ties():
    centers, classes = random_table(34, seed=7)
    pairs = random_masks((4, 64, 128), seed=8).cuda()
    check(pairs[:, :, 64:], centers, classes, 50.0)
    check(pairs[:, :, 64:].permute(0, 3, 1, 2), centers, classes, layout="nchw")
    check(pairs[0, ::2, 1::3], centers, classes)
    tie_centers = torch.tensor([[8.0, 10, 10], [12, 10, 10]], device="cuda")
    mask = torch.tensor([[[10, 10, 10]]], dtype=torch.uint8, device="cuda")
    assert mask_to_class(mask, tie_centers, torch.tensor([4, 5], device="cuda")).item() == 4


@gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_real_sample_masks(real_sample):
    from cityseg.palette import cityscapes_palette

    pal = cityscapes_palette()
    masks = decoded_masks(real_sample, 8).cuda()
    check(masks, pal.centers, pal.classes)
    check(masks, pal.centers, pal.classes, 30.0, out_dtype=torch.uint8)
