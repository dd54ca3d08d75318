"""The device cache loader against the plain loader: same batches without augmentation, photo and
mask warped together, photo-only jitter, 255 fill, shards, resume, and the memory refusal.

    pytest tests/test_cache_loader.py
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cityseg.config import AugmentConfig
from cityseg.data import cache_loader
from cityseg.data.cache_loader import CacheError, CacheLoader, affine_theta, cache_bytes, draw_params, warp_pair
from cityseg.data.contract import IMAGENET_MEAN, IMAGENET_STD
from cityseg.data.pairs import list_split
from cityseg.data.sampler import EpochSampler
from cityseg.data.torch_loader import TorchPairLoader
from cityseg.palette import IGNORE_INDEX, cityscapes_palette
from tests.conftest import make_pair_dataset, spec
from tests.test_torch_loader import interior, photo_classes

GEOMETRIC = AugmentConfig(hflip=0.5, rotate_deg=20, scale=(0.8, 1.3))


def loader_kw(**kw) -> dict:
    args = dict(image_size=32, batch_size=4, augment=None, shuffle=False, drop_last=False, workers=0, seed=0)
    args.update(kw)
    return args


def make_cache(files: list[Path], decoder: str = "auto", **kw) -> CacheLoader:
    return CacheLoader(files, cityscapes_palette(), spec(**loader_kw(**kw)), decoder=decoder)


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    return list_split(make_pair_dataset(tmp_path / "d", n_train=10, n_val=0, size=32), "train")


@pytest.mark.parametrize(
    "kw", [{}, {"image_size": 16}, {"shuffle": True, "drop_last": True, "seed": 3}, {"dtype": torch.bfloat16}]
)
def test_unaugmented_batches_equal_plain_loader(files: list[Path], kw: dict) -> None:
    """Same sampler, same Pillow decode and resize, same normalisation: bit-identical batches,
    including the last partial batch (10 files, batches of 4) and a shuffled epoch."""
    cache = make_cache(files, **kw)
    plain = TorchPairLoader(files, cityscapes_palette(), spec(**loader_kw(**kw)))
    for loader in (cache, plain):
        loader.set_epoch(1)
    assert len(cache) == len(plain)
    batches = 0
    for (image, target), (ref_image, ref_target) in zip(cache, plain, strict=True):
        assert image.dtype == ref_image.dtype and image.is_contiguous(memory_format=torch.channels_last)
        assert target.dtype == torch.int64
        assert torch.equal(image, ref_image) and torch.equal(target, ref_target)
        batches += 1
    assert batches == len(cache)


def test_identity_warp_leaves_photo_and_mask_unchanged() -> None:
    g = torch.Generator().manual_seed(0)
    photo = torch.randint(0, 256, (3, 3, 24, 24), generator=g).float()
    target = torch.randint(0, 19, (3, 24, 24), generator=g).to(torch.uint8)
    target[:, :3] = IGNORE_INDEX
    theta = torch.eye(2, 3).expand(3, 2, 3)
    out_photo, out_target = warp_pair(photo, target, theta)
    torch.testing.assert_close(out_photo, photo, atol=1e-3, rtol=0)
    assert torch.equal(out_target, target.long())
    # The draws that mean "no change" (no flip, angle 0, scale 1, no shift) build that identity.
    u = torch.full((3, 9), 0.5)
    u[:, cache_loader.FLIP] = 1.0
    torch.testing.assert_close(affine_theta(u, AugmentConfig(hflip=0.5, rotate_deg=10, scale=(0.5, 1.5)), 24), theta)


def test_flip_theta_mirrors_exactly() -> None:
    target = torch.randint(0, 19, (2, 16, 16), dtype=torch.uint8)
    u = torch.full((2, 9), 0.5)
    u[:, cache_loader.FLIP] = 0.0  # flip
    theta = affine_theta(u, AugmentConfig(hflip=0.5, rotate_deg=10), 16)
    _, out = warp_pair(target[:, None].float().expand(-1, 3, -1, -1), target, theta)
    assert torch.equal(out, target.flip(-1).long())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_geometric_augmentation_moves_photo_and_mask_together(tmp_path: Path, seed: int) -> None:
    """Pairs whose photo *is* its mask colours: after flip + rotation + scale-crop the photo still
    maps to the mask's classes, except at fill (255) and bilinear-blended class boundaries."""
    files = list_split(make_pair_dataset(tmp_path, n_train=4, n_val=0, size=64, photo_is_mask=True), "train")
    image, target = next(iter(make_cache(files, augment=GEOMETRIC, image_size=64, seed=seed)))
    _, plain_target = next(iter(make_cache(files, image_size=64)))
    # The warp ran on every sample: each target differs from the plain one and from its mirror (a flip
    # alone, with rotation and zoom dropped, would not do).
    for t, plain in zip(target, plain_target, strict=True):
        assert not torch.equal(t, plain) and not torch.equal(t, plain.flip(-1))
    valid = interior(target)
    agree = (photo_classes(image) == target)[valid].float().mean().item()
    assert valid.float().mean() > 0.25
    assert agree >= 0.99, agree


def test_zoom_out_fills_targets_with_255_and_photo_black(files: list[Path]) -> None:
    aug = AugmentConfig(hflip=0.0, rotate_deg=30, scale=(0.6, 0.6))
    image, target = next(iter(make_cache(files, augment=aug)))
    corners = target[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == IGNORE_INDEX).all()
    black = -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(image[:, :, 0, 0], black.expand(4, 3))
    assert set(target.unique().tolist()) <= set(range(19)) | {IGNORE_INDEX}


def test_colour_jitter_changes_photo_only(files: list[Path]) -> None:
    aug = AugmentConfig(hflip=0.0, brightness=0.5, contrast=0.5, saturation=0.5, hue=0.1)
    image, target = next(iter(make_cache(files, augment=aug)))
    plain_image, plain_target = next(iter(make_cache(files)))
    assert torch.equal(target, plain_target)
    assert (image - plain_image).abs().mean() > 0.05
    per_sample = (image - plain_image).abs().mean(dim=(1, 2, 3))
    assert (per_sample > 0.01).all()  # every sample gets its own factors


def test_hue_rotation_keeps_grey_and_full_turn() -> None:
    grey = torch.full((2, 3, 4, 4), 100.0)
    u = torch.rand(2, 9)
    assert torch.allclose(cache_loader.color_jitter(grey, u, AugmentConfig(hue=0.5)), grey, atol=1e-3)
    m = cache_loader.hue_matrices(torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(m, torch.eye(3).expand(2, 3, 3), atol=1e-5, rtol=0)


def test_epochs_differ_repeat_and_resume_mid_epoch(files: list[Path]) -> None:
    loader = make_cache(files, augment=AugmentConfig(hflip=0.5, rotate_deg=10), shuffle=True, batch_size=2, seed=1)
    runs = []
    for epoch in (0, 1, 0):
        loader.set_epoch(epoch)
        runs.append(list(loader))
    cat = [torch.cat([t for _, t in run]) for run in runs]
    assert torch.equal(cat[0], cat[2]) and not torch.equal(cat[0], cat[1])
    loader.set_epoch(0, start_batch=2)
    tail = list(loader)
    assert len(tail) == len(runs[0]) - 2
    for (a, b), (c, d) in zip(runs[0][2:], tail, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("n", [10, 9])
def test_shards_match_plain_sampler(tmp_path: Path, n: int, shuffle: bool) -> None:
    files = list_split(make_pair_dataset(tmp_path / "d", n_train=n, n_val=0, size=16), "train")
    seen = []
    for shard in range(2):
        loader = make_cache(files, image_size=16, batch_size=2, shuffle=shuffle, shard_id=shard, num_shards=2)
        sampler = EpochSampler(n, 2, shuffle=shuffle, augment=False, shard_id=shard, num_shards=2)
        loader.set_epoch(3)
        sampler.set_epoch(3)
        batches = [index.tolist() for _, _, index in loader.batches()]
        shard_size = len(range(shard, n, 2))  # without drop_last the shards are not padded
        assert len(batches) == len(loader) == sampler.num_batches() == math.ceil(shard_size / 2)
        assert [i for b in batches for i in b] == [i for i, _ in sampler]
        assert len(loader.indices) == (n if shuffle else shard_size)  # cached: the shard, or all
        seen.append({i for b in batches for i in b})
    assert seen[0] | seen[1] == set(range(n))
    assert not seen[0] & seen[1]


def test_refuses_when_cache_does_not_fit(files: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_loader, "free_memory", lambda device: 10 * 2**20)
    monkeypatch.setattr(cache_loader, "decode_plain", lambda *a, **k: pytest.fail("decoded before the check"))
    with pytest.raises(CacheError, match=r"cache needs .* GiB for 10 images at 2048x2048 .* use --cache none"):
        make_cache(files, image_size=2048)


def test_cache_bytes() -> None:
    assert cache_bytes(2975, 256) == 2975 * 256 * 256 * 4  # the Kaggle train split: 0.73 GiB
    assert cache_loader.free_memory(torch.device("cpu")) > 0


def test_draws_are_uniform_per_epoch_generator() -> None:
    a = draw_params(5, torch.Generator().manual_seed(1), torch.device("cpu"))
    b = draw_params(5, torch.Generator().manual_seed(1), torch.device("cpu"))
    assert a.shape == (5, 9) and torch.equal(a, b) and ((a >= 0) & (a < 1)).all()


@pytest.mark.dali
def test_dali_decode_equals_plain_decode(files: list[Path]) -> None:
    """DALI's CPU decoder is the same libjpeg-turbo as Pillow's: identical cached pixels."""
    dali = make_cache(files, decoder="dali", workers=1)
    plain = make_cache(files, decoder="plain")
    assert torch.equal(dali.photos, plain.photos) and torch.equal(dali.targets, plain.targets)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("angle, shift, scale", [(17.0, (3.0, -2.0), 1.2), (-40.0, (0.0, 5.0), 0.7)])
def test_warp_matches_torchvision_affine(flip: bool, angle: float, shift: tuple, scale: float) -> None:
    """The plain loader's ops (v2 flip, then affine of a Mask: nearest, fill 255) with the same
    parameters give the same target: the same rotation direction, zoom, shift and fill, up to
    nearest-neighbour ties that float rounding could break differently."""
    from torchvision import tv_tensors
    from torchvision.transforms.v2 import functional as tvf

    target = torch.randint(0, 19, (1, 40, 40), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    mask = tv_tensors.Mask(target)
    if flip:
        mask = tvf.horizontal_flip(mask)
    ref = tvf.affine(mask, angle=angle, translate=list(shift), scale=scale, shear=[0.0, 0.0], fill=IGNORE_INDEX)
    theta = cache_loader.theta_from(
        torch.tensor([flip]), torch.tensor([angle]), torch.tensor([scale]), torch.tensor([shift]), 40
    )
    _, out = warp_pair(torch.zeros(1, 3, 40, 40), target, theta)
    agree = (out == ref.as_subclass(torch.Tensor).long()).float().mean().item()
    assert agree >= 0.999, agree  # measured: 1.0 (and ~0.06 with the angle's sign flipped)


def test_brightness_contrast_saturation_match_torchvision() -> None:
    """Per-sample factors, each applied as torchvision's functional op with that factor."""
    from torchvision.transforms.v2 import functional as tvf

    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 255
    aug = AugmentConfig(brightness=0.5, contrast=0.5, saturation=0.5)
    u = torch.rand(2, 9, generator=torch.Generator().manual_seed(1))
    out = cache_loader.color_jitter(x.clone(), u, aug)
    for i in range(2):
        f = 0.5 + u[i]  # factors U(0.5, 1.5)
        ref = tvf.adjust_brightness(x[i] / 255, f[cache_loader.BRIGHTNESS].item())
        ref = tvf.adjust_contrast(ref, f[cache_loader.CONTRAST].item())
        ref = tvf.adjust_saturation(ref, f[cache_loader.SATURATION].item())
        torch.testing.assert_close(out[i] / 255, ref, atol=1e-5, rtol=0)
