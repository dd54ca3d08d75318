"""The DALI loader in DALI's CPU-only mode (and, on a GPU machine, its mixed-decode path) against
the plain loader: same batches without augmentation, photo and mask warped together, shards and
epoch length, and a one-line error naming a corrupt file.

    pytest tests/test_dali_loader.py
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch

from cityseg.config import AugmentConfig
from cityseg.data import formats
from cityseg.data.contract import IMAGENET_MEAN, IMAGENET_STD
from cityseg.data.pairs import PairError, list_split, read_pair
from cityseg.data.sampler import EpochSampler
from cityseg.data.torch_loader import TorchPairLoader
from cityseg.palette import IGNORE_INDEX, Palette, cityscapes_palette
from kernels.mask_to_class import mask_to_class
from tests.conftest import make_pair_dataset, spec

# DALI is a required dependency: without it every test here fails with the import error, and the other
# test modules are still collected and run (an import error at module level would abort the whole run).
try:
    from cityseg.data import dali_loader
    from cityseg.data.dali_loader import DaliPairLoader
except ImportError as exc:
    DALI_MISSING: str | None = f"DALI is not importable ({exc}): install nvidia-dali, or unpack the DALI parts"
else:
    DALI_MISSING = None

pytestmark = pytest.mark.dali


@pytest.fixture(autouse=True)
def _dali_required() -> None:
    if DALI_MISSING:
        pytest.fail(DALI_MISSING, pytrace=False)

LEVEL = 1.0 / (255 * min(IMAGENET_STD))  # one uint8 level after normalisation (largest: green)
GEOMETRIC = AugmentConfig(hflip=0.5, rotate_deg=30.0, scale=(0.7, 1.3))


def loader_pair(files: list[Path], palette: Palette, size: int, batch_size: int):
    kw = dict(image_size=size, batch_size=batch_size, augment=None, shuffle=False, drop_last=False, workers=2)
    return DaliPairLoader(files, palette, spec(**kw)), TorchPairLoader(files, palette, spec(**kw))


def compare_with_plain(files: list[Path], size: int, batch_size: int) -> dict[str, float]:
    """Run both loaders over `files`: photo differences (normalised units), target agreement."""
    dali, plain = loader_pair(files, cityscapes_palette(), size, batch_size)
    assert len(dali) == len(plain)
    stats = {"max": 0.0, "interior_max": 0.0, "sum": 0.0, "n": 0, "agree": 0, "pixels": 0, "batches": 0}
    for (image, target), (ref_image, ref_target) in zip(dali, plain, strict=True):
        assert image.shape == ref_image.shape and image.dtype == torch.float32
        assert image.is_contiguous(memory_format=torch.channels_last)
        assert target.dtype == torch.int64 and target.shape == ref_target.shape
        diff = (image - ref_image).abs()
        stats["max"] = max(stats["max"], diff.max().item())
        stats["interior_max"] = max(stats["interior_max"], diff[..., 1:-1, 1:-1].max().item())
        stats["sum"] += diff.sum().item()
        stats["n"] += diff.numel()
        stats["agree"] += (target == ref_target).sum().item()
        stats["pixels"] += target.numel()
        stats["batches"] += 1
    assert stats["batches"] == len(dali)
    return {
        "max": stats["max"],
        "interior_max": stats["interior_max"],
        "mean": stats["sum"] / stats["n"],
        "agree": stats["agree"] / stats["pixels"],
    }


def test_same_batches_as_plain_loader_synthetic(tmp_path: Path) -> None:
    root = make_pair_dataset(tmp_path / "d", n_train=0, n_val=6, size=64)
    s = compare_with_plain(list_split(root, "val"), size=64, batch_size=4)  # batches of 4 and 2
    # Measured: the CPU decoders are the same libjpeg-turbo (identical pixels); the normalisation
    # arithmetic differs by float rounding only (2.4e-7).
    assert s["max"] <= 1e-6
    assert s["agree"] == 1.0


@pytest.mark.parametrize(
    "size, max_bound, interior_bound, mean_bound",
    [
        # Native size: the same libjpeg-turbo decode; normalisation float rounding only.
        # Measured max 2.4e-7, mean 3.3e-8.
        (256, 1e-6, 1e-6, 1e-7),
        # Resized: both antialiased triangle filters; they differ at the 1-pixel image border (edge
        # handling), inside by rounding. Measured max 6 levels (0.105), inside 1 level, mean 0.00236.
        (160, 7 * LEVEL, LEVEL + 1e-6, 0.0025),
    ],
)
def test_same_batches_as_plain_loader_real(
    real_sample: Path, size: int, max_bound: float, interior_bound: float, mean_bound: float
) -> None:
    files = list_split(real_sample, "train")[:32]
    s = compare_with_plain(files, size=size, batch_size=16)
    assert s["max"] <= max_bound
    assert s["interior_max"] <= interior_bound
    assert s["mean"] <= mean_bound
    # Measured 100 %: the mask resize picks torchvision's NEAREST_EXACT pixels (see resize_pair).
    assert s["agree"] == 1.0


def _interior(target: torch.Tensor) -> torch.Tensor:
    """Pixels whose 3x3 neighbourhood has one class: away from class borders and fill edges."""
    t = target[:, None].float()
    same = torch.nn.functional.max_pool2d(t, 3, 1, 1) == -torch.nn.functional.max_pool2d(-t, 3, 1, 1)
    same[..., 0, :] = same[..., -1, :] = same[..., :, 0] = same[..., :, -1] = False
    return same[:, 0]


def _photo_uint8(image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return (image.float() * std + mean).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def no_void_palette() -> Palette:
    """The 19 train colours, nothing void: black (the warp's fill) maps to a class."""
    p = cityscapes_palette()
    return Palette(p.colors.float(), torch.arange(19), p.names, p.colors)


@pytest.mark.parametrize("palette_kind", ["black is void", "no void colour"])
def test_photo_and_mask_warped_together(tmp_path: Path, monkeypatch, palette_kind: str) -> None:
    """Pairs whose photo is its mask: after random flip/rotation/zoom the photo still maps to the
    target's classes, and the warp's fill maps to 255 (with no void colour: only the fill does)."""
    if palette_kind == "black is void":
        palette = cityscapes_palette()
        photo_classes = functools.partial(mask_to_class, centers=palette.centers, classes=palette.classes)
    else:
        palette = no_void_palette()
        # The reference mapping: a 2^24-entry table for a new palette takes ~15 s to build on CPU.
        monkeypatch.setattr(formats, "map_colors", lambda mask, p, out_dtype: mask_to_class(
            mask, p.centers, p.classes, p.max_dist, backend="reference", out_dtype=out_dtype))
        photo_classes = functools.partial(
            mask_to_class, centers=palette.centers, classes=palette.classes, backend="reference"
        )
        assert not dali_loader.fill_colour_is_void(palette)  # takes the 4th-channel path
    files = list_split(make_pair_dataset(tmp_path / "d", n_train=8, n_val=0, size=64, photo_is_mask=True), "train")
    loader = DaliPairLoader(files, palette, spec(image_size=64, batch_size=4, augment=GEOMETRIC, shuffle=True,
                                                 drop_last=True, workers=2))
    agree = total = fill = changed = 0
    for _ in range(2):
        for image, target, index in loader.batches():
            photo = _photo_uint8(image)
            interior = _interior(target)
            content = interior & (target != IGNORE_INDEX)
            from_photo = photo_classes(photo)
            agree += (from_photo == target)[content].sum().item()
            total += content.sum().item()
            black, void = photo.int().sum(-1) <= 3, target == IGNORE_INDEX
            assert void[interior & black].all()  # the fill maps to 255
            if palette_kind == "no void colour":
                assert black[interior & void].all()  # ... and only the fill does
            fill += (target == IGNORE_INDEX).sum().item()
            plain = torch.stack([_unaugmented_target(files[i], palette) for i in index.tolist()])
            changed += (target != plain).any(dim=(1, 2)).sum().item()
    # Measured: every interior pixel agrees (JPEG noise is identical in both halves of these pairs).
    assert agree == total > 0
    assert fill > 0 and changed >= 6  # the warps did happen (8 samples, zoom 0.7..1.3 and +-30 deg)


def _unaugmented_target(path: Path, palette: Palette) -> torch.Tensor:
    mask = torch.from_numpy(read_pair(path)[1].copy())
    return mask_to_class(mask, palette.centers, palette.classes, backend="reference")


def shard_indices(loader: DaliPairLoader) -> list[list[int]]:
    """The file indices of each batch of one epoch; checks len() and the batch shapes."""
    batches = []
    for image, target, index in loader.batches():
        assert image.shape[0] == target.shape[0] == index.shape[0] <= loader.batch_size
        batches.append(index.tolist())
    assert len(batches) == len(loader)
    return batches


@pytest.mark.parametrize("n", [10, 9])  # 9: shards padded to 5 like the plain sampler's
def test_validation_shards_match_plain_sampler(tmp_path: Path, n: int) -> None:
    files = list_split(make_pair_dataset(tmp_path / "d", n_train=0, n_val=n, size=32), "val")
    palette = cityscapes_palette()
    seen = []
    for shard in range(2):
        loader = DaliPairLoader(files, palette, spec(image_size=32, batch_size=2, augment=None, shuffle=False,
                                                     drop_last=False, workers=1, shard_id=shard, num_shards=2))
        sampler = EpochSampler(n, 2, shuffle=False, augment=False, shard_id=shard, num_shards=2)
        shard_size = len(range(shard, n, 2))  # validation shards are not padded
        assert len(loader) == sampler.num_batches() == math.ceil(shard_size / 2)
        for _ in range(2):  # the shard and the partial last batch are the same every epoch
            batches = shard_indices(loader)
            assert [i for b in batches for i in b] == [i for i, _ in sampler]
            assert [len(b) for b in batches] == [2] * (shard_size // 2) + [1] * (shard_size % 2)
        seen.append({i for b in batches for i in b})
    assert seen[0] | seen[1] == set(range(n))
    assert not seen[0] & seen[1]  # every image counts exactly once over the ranks


@pytest.mark.parametrize("n, batch_size, batches", [(10, 2, 2), (12, 3, 2), (10, 5, 1)])
def test_training_shards_partition_each_epoch(tmp_path: Path, n: int, batch_size: int, batches: int) -> None:
    files = list_split(make_pair_dataset(tmp_path / "d", n_train=n, n_val=0, size=32), "train")
    loaders = [
        DaliPairLoader(files, cityscapes_palette(), spec(image_size=32, batch_size=batch_size, augment=None,
                                                         shuffle=True, drop_last=True, workers=1, seed=7,
                                                         shard_id=shard, num_shards=2))
        for shard in range(2)
    ]
    orders = []
    for _ in range(3):
        epoch = [[i for b in shard_indices(loader) for i in b] for loader in loaders]
        assert all(len(loader) == batches for loader in loaders)
        assert all(len(e) == batches * batch_size for e in epoch)  # partial batch dropped
        assert not set(epoch[0]) & set(epoch[1])  # one global permutation split between ranks
        orders.append(epoch[0] + epoch[1])
    assert orders[0] != orders[1] != orders[2]  # reshuffled every epoch


def test_single_shard_epoch_length(tmp_path: Path) -> None:
    files = list_split(make_pair_dataset(tmp_path / "d", n_train=7, n_val=0, size=32), "train")
    palette = cityscapes_palette()
    common = dict(image_size=32, batch_size=3, augment=None, workers=1)
    val = DaliPairLoader(files, palette, spec(shuffle=False, drop_last=False, **common))
    assert [len(b) for b in shard_indices(val)] == [3, 3, 1]
    train = DaliPairLoader(files, palette, spec(shuffle=True, drop_last=True, **common))
    epoch = shard_indices(train)
    assert [len(b) for b in epoch] == [3, 3] and len(set(sum(epoch, []))) == 6
    # A batch bigger than the whole split: one partial batch (val), none (train).
    big = dict(common, batch_size=16)
    assert [len(b) for b in shard_indices(DaliPairLoader(files, palette, spec(shuffle=False, drop_last=False,
                                                                              **big)))] == [7]
    assert shard_indices(DaliPairLoader(files, palette, spec(shuffle=True, drop_last=True, **big))) == []


def test_abandoned_epoch_and_resume_skip(tmp_path: Path) -> None:
    files = list_split(make_pair_dataset(tmp_path / "d", n_train=0, n_val=8, size=32), "val")
    loader = DaliPairLoader(files, cityscapes_palette(), spec(image_size=32, batch_size=2, augment=None,
                                                              shuffle=False, drop_last=False, workers=1))
    for _ in loader:
        break  # a consumer that stops early: the next epoch still starts at the beginning
    assert shard_indices(loader) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    loader.set_epoch(1, start_batch=3)
    assert [b.tolist() for _, _, b in loader.batches()] == [[6, 7]]
    assert len(shard_indices(loader)) == len(loader) == 4  # the skip applies to one epoch only


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _cut_at_scan(path: Path) -> None:
    """Valid headers, then the file ends just after the start-of-scan marker."""
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"\xff\xda") + 20])


# DALI's libjpeg-turbo only warns on garbage inside the entropy-coded data and decodes it (Pillow
# fails it): such files are caught by the pair validator that runs first by default.
@pytest.mark.parametrize("damage", [_truncate, _cut_at_scan], ids=["truncated", "cut at scan"])
def test_corrupt_jpeg_mid_epoch_gives_one_line_error(tmp_path: Path, damage) -> None:
    files = list_split(make_pair_dataset(tmp_path / "d", n_train=0, n_val=8, size=32), "val")
    damage(files[5])  # third batch: met mid-epoch, after good batches
    loader = DaliPairLoader(files, cityscapes_palette(), spec(image_size=32, batch_size=2, augment=None,
                                                              shuffle=False, drop_last=False, workers=1))
    seen = 0
    with pytest.raises(PairError) as info:
        for _ in loader:
            seen += 1
    assert seen == 2
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{files[5]}: ")
    assert "corrupt" in message or "truncated" in message
    assert info.value.__suppress_context__  # no DALI traceback chained under it


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_mixed_decode_matches_cpu_pipeline(tmp_path: Path) -> None:
    """nvJPEG (fancy upsampling on) vs libjpeg-turbo, on synthetic pairs generated here (the real
    sample does not travel to the GPU machine)."""
    from cityseg.data.synth import write_dataset

    files = list_split(write_dataset(tmp_path / "synth", 32, 1, seed=1, size=256), "train")
    kw = dict(image_size=256, batch_size=16, augment=None, shuffle=False, drop_last=False, workers=4)
    gpu = DaliPairLoader(files, cityscapes_palette(), spec(device="cuda", dtype=torch.bfloat16, **kw))
    cpu = DaliPairLoader(files, cityscapes_palette(), spec(**kw))
    for (image, target), (ref_image, ref_target) in zip(gpu, cpu, strict=True):
        assert image.device.type == "cuda" and image.dtype == torch.bfloat16
        assert image.is_contiguous(memory_format=torch.channels_last)
        assert target.device.type == "cuda" and target.dtype == torch.int64
        assert (target.cpu() == ref_target).float().mean() >= 0.995
        assert (image.float().cpu() - ref_image).abs().mean() <= 1.0 * LEVEL
