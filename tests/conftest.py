"""Shared fixtures: tiny pair datasets written in the Kaggle format, the real sample (skipped when
absent), and a per-session cache folder for synthetic data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cityseg.data.contract import LoaderSpec
from cityseg.palette import cityscapes_palette

ROOT = Path(__file__).resolve().parents[1]


def real_sample_dir() -> Path | None:
    path = Path(os.environ.get("CITYSEG_REAL_SAMPLE", ROOT.parent / "shared" / "data" / "cityscapes_pairs_sample"))
    return path if (path / "train").is_dir() and (path / "val").is_dir() else None


@pytest.fixture(scope="session")
def real_sample() -> Path:
    path = real_sample_dir()
    if path is None:
        pytest.skip("real Cityscapes sample not present (../shared/data/cityscapes_pairs_sample)")
    return path


def block_mask(rng: np.random.Generator, size: int, blocks: int = 4) -> np.ndarray:
    """A size x size mask of `blocks` x `blocks` rectangles in random Cityscapes train colours."""
    colors = cityscapes_palette().colors.numpy()
    ids = rng.integers(0, len(colors), (blocks, blocks))
    cells = np.kron(ids, np.ones((size // blocks + 1, size // blocks + 1), dtype=np.int64))[:size, :size]
    return colors[cells]


def write_pair(path: Path, photo: np.ndarray, mask: np.ndarray, fmt: str = "JPEG", quality: int = 95) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate([photo, mask], axis=1)).save(path, fmt, quality=quality)
    return path


def make_pair_dataset(root: Path, n_train: int = 8, n_val: int = 4, size: int = 32, seed: int = 0,
                      photo_is_mask: bool = False) -> Path:
    """Learnable toy pairs: the photo is the mask's colours darkened, plus noise (or exactly the mask)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(1, n + 1):
            mask = block_mask(rng, size)
            if photo_is_mask:
                photo = mask
            else:
                photo = np.clip(mask * 0.7 + rng.normal(0, 12, mask.shape), 0, 255).astype(np.uint8)
            write_pair(root / split / f"{i}.jpg", photo, mask)
    return root


@pytest.fixture
def pair_dataset(tmp_path: Path) -> Path:
    return make_pair_dataset(tmp_path / "data")


def spec(**kw) -> LoaderSpec:
    """A LoaderSpec from keywords (a device may be given as a string)."""
    if "device" in kw:
        kw["device"] = torch.device(kw["device"])
    return LoaderSpec(**kw)
