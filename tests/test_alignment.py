"""Every loader keeps photo and mask aligned under the default augmentation (flip only) and under each
optional one, on pairs whose photo *is* its mask's colours, so that a misalignment is measurable.

A flip-only config takes its own, cheaper code path in the DALI and cache loaders (a mirror instead
of a warp), which the rotation/zoom tests never reach: a photo flipped without its mask once passed
the whole suite. So each (loader, augmentation) pair is checked here, with three measures:

- the photo's colours map to the target's classes on interior pixels (geometric augmentations);
- within one image, a class has one photo colour (colour jitter is a per-image function of the colour,
  so this holds under jitter and hue too, and a shifted or mirrored mask breaks it);
- the augmentation did happen: flips are exact mirrors of the plain target, warps change targets,
  jitter changes photos and leaves targets bit-identical.

    pytest tests/test_alignment.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cityseg.config import AugmentConfig
from cityseg.data.contract import PairLoader, denormalize
from cityseg.data.pairs import list_split
from cityseg.palette import IGNORE_INDEX, cityscapes_palette, map_colors_reference
from tests.conftest import block_mask, spec, write_pair
from tests.test_torch_loader import interior

SIZE, N, BATCH, EPOCHS = 48, 8, 4, 2

AUGMENTS = {
    "default": AugmentConfig(),  # what every run does unless told otherwise: flip with p = 0.5
    "rotate": AugmentConfig(hflip=0.0, rotate_deg=20),
    "zoom": AugmentConfig(hflip=0.0, scale=(0.8, 1.3)),
    "jitter": AugmentConfig(hflip=0.0, brightness=0.4, contrast=0.4, saturation=0.4),
    "hue": AugmentConfig(hflip=0.0, hue=0.1),
    "all": AugmentConfig(hflip=0.5, rotate_deg=15, scale=(0.8, 1.2), brightness=0.3, contrast=0.3,
                         saturation=0.3, hue=0.05),
}
LOADERS = ["torch", "dali", "cache", "dali-gpu", "cache-gpu"]


def needs(kind: str) -> None:
    if kind.endswith("-gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def build(kind: str, files: list[Path], augment: AugmentConfig | None) -> PairLoader:
    device = "cuda" if kind.endswith("-gpu") else "cpu"
    s = spec(image_size=SIZE, batch_size=BATCH, augment=augment, shuffle=False, drop_last=False, workers=0,
             seed=5, device=device)
    palette = cityscapes_palette()
    if kind.startswith("dali"):
        from cityseg.data.dali_loader import DaliPairLoader

        return DaliPairLoader(files, palette, spec(**{**s.__dict__, "workers": 2}))
    if kind.startswith("cache"):
        from cityseg.data.cache_loader import CacheLoader

        return CacheLoader(files, palette, s, decoder="dali" if device == "cuda" else "plain")
    from cityseg.data.torch_loader import TorchPairLoader

    return TorchPairLoader(files, palette, s)


def samples(loader: PairLoader, epochs: int = EPOCHS) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(file index, photo (S, S, 3) uint8, target (S, S)) of every sample of `epochs` epochs, on the CPU."""
    out = []
    with loader:
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            if hasattr(loader, "batches"):
                batches = loader.batches()
            else:  # the plain loader, unshuffled: file order
                batches = ((image, target, torch.arange(k * BATCH, k * BATCH + len(image)))
                           for k, (image, target) in enumerate(loader))
            for image, target, index in batches:
                photo, target = denormalize(image.float()), target.cpu()
                out += [(i, photo[j], target[j]) for j, i in enumerate(index.tolist())]
    return out


def class_agreement(photo: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """(share of interior pixels whose photo colour maps to the target's class, interior share)."""
    valid = interior(target[None])[0]
    p = cityscapes_palette()
    agree = map_colors_reference(photo, p.centers, p.classes) == target
    return agree[valid].float().mean().item(), valid.float().mean().item()


def colour_consistency(photo: torch.Tensor, target: torch.Tensor, tol: int = 24) -> float:
    """Share of interior pixels whose photo colour lies within `tol` of their class's median colour in
    this image: 1 when the photo is a per-image colour function of the mask, far less when the mask
    is mirrored or shifted against it (its classes then cover blocks of other colours)."""
    valid = interior(target[None])[0]
    near = total = 0
    for c in target[valid].unique().tolist():
        colours = photo[valid & (target == c)].int()  # (n, 3)
        median = colours.median(dim=0).values
        near += ((colours - median).abs().amax(-1) <= tol).sum().item()
        total += len(colours)
    return near / max(total, 1)


def warps(aug: AugmentConfig) -> bool:
    """Rotation or zoom: a resampling warp (a flip alone is an exact mirror)."""
    return aug.rotate_deg > 0 or aug.scale != (1.0, 1.0)


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Lossless (PNG) pairs whose photo is its mask: 4 x 4 blocks of random class colours."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("align")
    for i in range(1, N + 1):
        mask = block_mask(rng, SIZE)
        write_pair(root / "train" / f"{i}.png", mask, mask, fmt="PNG")
    return list_split(root, "train")


@pytest.fixture(scope="module")
def plain_targets(pair_files: list[Path]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """File index -> (photo, target) of the unaugmented plain loader."""
    return {i: (photo, target) for i, photo, target in samples(build("torch", pair_files, None), epochs=1)}


def test_the_pairs_make_misalignment_measurable(plain_targets: dict) -> None:
    """The measures themselves: a mask mirrored or shifted against its photo scores far lower."""
    for photo, target in plain_targets.values():
        assert class_agreement(photo, target)[0] == 1.0 and colour_consistency(photo, target) == 1.0
    mirrored = [class_agreement(p, t.flip(-1))[0] for p, t in plain_targets.values()]
    shifted = [colour_consistency(p, t.roll(SIZE // 4, -1)) for p, t in plain_targets.values()]
    assert sum(mirrored) / len(mirrored) < 0.7 and sum(shifted) / len(shifted) < 0.85


@pytest.mark.parametrize("aug_name", list(AUGMENTS))
@pytest.mark.parametrize("kind", LOADERS)
def test_photo_and_mask_stay_aligned(kind: str, aug_name: str, pair_files: list[Path], plain_targets: dict) -> None:
    needs(kind)
    aug = AUGMENTS[aug_name]
    seen = samples(build(kind, pair_files, aug))
    assert len(seen) == EPOCHS * N
    # Bilinear resampling blends class edges a little wider than `interior` excludes (measured >= 0.97
    # per sample); a mirrored or shifted mask scores ~0.5 (test above).
    least = 0.95 if warps(aug) else 1.0
    flipped = kept = warped = recoloured = 0
    for i, photo, target in seen:
        plain_photo, plain_target = plain_targets[i]
        assert colour_consistency(photo, target) >= least, (i, colour_consistency(photo, target))
        if not aug.color:
            agree, valid = class_agreement(photo, target)
            assert agree >= least and valid > 0.2, (i, agree, valid)
        # Masks are resampled nearest: every id is one of the mask's own (or the fill), never a blend's.
        assert set(target.unique().tolist()) <= set(plain_target.unique().tolist()) | {IGNORE_INDEX}, i
        if not aug.geometric:
            assert torch.equal(target, plain_target)  # jitter is photo-only
        if not warps(aug) and aug.hflip > 0:
            # Flip only: each target is exactly the plain one or its mirror, never anything else.
            assert torch.equal(target, plain_target) or torch.equal(target, plain_target.flip(-1)), i
            flipped += torch.equal(target, plain_target.flip(-1))
            kept += torch.equal(target, plain_target)
        warped += not torch.equal(target, plain_target)
        recoloured += (photo.int() - plain_photo.int()).abs().float().mean().item() > 4
    if aug_name == "default":
        assert flipped >= 3 and kept >= 3, (flipped, kept)  # p = 0.5 over 16 draws
    if warps(aug):
        assert warped >= EPOCHS * N // 2, warped
    if aug.color:
        assert recoloured >= EPOCHS * N // 2, recoloured
