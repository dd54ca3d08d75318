"""One contract, every registered loader (cityseg/data/contract.py `LOADERS`): shapes, dtypes,
channels-last, the ignore value, epoch length, shards, equality with the plain loader with
augmentation off, what `exact_resume` promises, and the lifetime (`with` / `close`)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cityseg.config import AugmentConfig
from cityseg.data.contract import LOADERS, PairLoader, make_loader
from cityseg.data.pairs import list_split, read_pair
from cityseg.palette import IGNORE_INDEX, cityscapes_palette
from tests.conftest import make_pair_dataset, spec

KINDS = sorted(LOADERS)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # written out: the reference
AUG = AugmentConfig(hflip=0.5, rotate_deg=15, scale=(0.8, 1.2))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = make_pair_dataset(tmp_path_factory.mktemp("contract") / "d", n_train=11, n_val=0, size=32)
    return list_split(root, "train")


def loader(kind: str, files: list[Path], **kw) -> PairLoader:
    args = dict(image_size=32, batch_size=4, augment=None, shuffle=False, drop_last=False, workers=1, seed=0)
    return make_loader(kind, files, cityscapes_palette(), spec(**{**args, **kw}))


def epoch(ld: PairLoader, e: int = 0, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ld.set_epoch(e, start)
    return list(ld)


@pytest.mark.parametrize("kind", KINDS)
def test_batches_follow_the_contract(files: list[Path], kind: str) -> None:
    with loader(kind, files, augment=AUG, shuffle=True, drop_last=True) as ld:
        assert isinstance(ld, PairLoader)
        batches = epoch(ld)
        assert len(batches) == len(ld) == 11 // 4
        for image, target in batches:
            assert image.shape == (4, 3, 32, 32) and image.dtype == torch.float32
            assert image.is_contiguous(memory_format=torch.channels_last)
            assert target.shape == (4, 32, 32) and target.dtype == torch.int64
            assert set(target.unique().tolist()) <= set(range(19)) | {IGNORE_INDEX}
    # Normalised channel by channel with the ImageNet statistics: undone by hand, the pixels are bytes
    # again (interpolated), and each channel's mean lies near that of the photos normalised by hand
    # (rotation's black fill pulls it down by ~0.25 here).
    images = torch.cat([image for image, _ in batches])
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    undone = (images * std + mean) * 255
    assert undone.min().item() > -1 and undone.max().item() < 256
    photos = torch.stack([torch.from_numpy(read_pair(f)[0].copy()) for f in files]).permute(0, 3, 1, 2) / 255
    torch.testing.assert_close(images.mean(dim=(0, 2, 3)), ((photos - mean) / std).mean(dim=(0, 2, 3)),
                               rtol=0, atol=0.35)


@pytest.mark.parametrize("kind", KINDS)
def test_validation_epoch_keeps_the_last_partial_batch(files: list[Path], kind: str) -> None:
    with loader(kind, files) as ld:
        assert [b[1].shape[0] for b in epoch(ld)] == [4, 4, 3] and len(ld) == 3


@pytest.mark.parametrize("kind", KINDS)
def test_without_augmentation_every_loader_equals_the_plain_one(files: list[Path], kind: str) -> None:
    with loader(kind, files) as ld, loader("torch", files) as plain:
        for (image, target), (ref_image, ref_target) in zip(epoch(ld), epoch(plain), strict=True):
            assert torch.equal(target, ref_target)
            # DALI decodes and resizes with its own (equal-quality) code: within a few uint8 levels.
            assert (image - ref_image).abs().max().item() < (0.1 if kind == "dali" else 1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_validation_shards_hold_every_sample_once(files: list[Path], kind: str) -> None:
    sizes = []
    for shard in range(2):
        with loader(kind, files, batch_size=2, shard_id=shard, num_shards=2) as ld:
            sizes.append(sum(t.shape[0] for _, t in epoch(ld)))
            assert len(ld) == math.ceil(len(range(shard, 11, 2)) / 2)
    assert sizes == [6, 5]


@pytest.mark.parametrize("kind", KINDS)
def test_training_shards_run_the_same_number_of_steps(files: list[Path], kind: str) -> None:
    lengths = []
    for shard in range(2):
        with loader(kind, files, batch_size=2, shuffle=True, drop_last=True, shard_id=shard, num_shards=2) as ld:
            lengths.append(len(epoch(ld)))
    assert lengths == [3, 3]  # ceil(11 / 2) = 6 samples per shard, 3 batches of 2


@pytest.mark.parametrize("kind", KINDS)
def test_exact_resume_is_what_it_says(files: list[Path], kind: str) -> None:
    """`exact_resume`: set_epoch(e, start_batch) yields the uninterrupted epoch's batches from there
    on (for DALI, which says False, only the number of batches is the same)."""
    with loader(kind, files, augment=AUG, shuffle=True, drop_last=True, seed=3) as ld:
        whole = epoch(ld, e=1)
    with loader(kind, files, augment=AUG, shuffle=True, drop_last=True, seed=3) as ld:
        rest = epoch(ld, e=1, start=1)
    assert len(rest) == len(whole) - 1
    same = all(torch.equal(a[1], b[1]) and torch.equal(a[0], b[0]) for a, b in zip(whole[1:], rest, strict=True))
    if ld.exact_resume:
        assert same
    assert type(ld).exact_resume == (kind != "dali")


@pytest.mark.parametrize("kind", KINDS)
def test_a_closed_loader_starts_afresh(files: list[Path], kind: str) -> None:
    ld = loader(kind, files, workers=2)
    with ld:
        first = epoch(ld)
    ld.close()  # idempotent
    with ld:
        again = epoch(ld)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
