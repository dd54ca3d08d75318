"""cityseg/palette_kmeans.py: learned palettes recover the colours of colour-coded masks.

pytest tests/test_palette_kmeans.py
"""

from __future__ import annotations

import pytest
import torch

from cityseg.errors import OptionError
from cityseg.palette import load_palette, save_palette
from cityseg.palette_kmeans import kmeans_centers, kmeans_palette, parse_palette_spec
from kernels.mask_to_class import mask_to_class, mask_to_class_reference

# Five colours away from 0/255 (clipping would bias the noisy means), most frequent first.
COLORS = torch.tensor([[128, 64, 128], [70, 70, 70], [107, 142, 35], [220, 20, 60], [20, 40, 230]])
BLOCKS = [230, 144, 100, 62, 40]  # 8x8 blocks of each colour in 4 masks of 96x96


def noisy_masks(seed: int = 0, n: int = 4, size: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, size, size, 3) masks of the five colours in shuffled 8x8 blocks plus noise in [-3, 3]."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.repeat_interleave(torch.arange(5), torch.tensor(BLOCKS))
    blocks = blocks[torch.randperm(blocks.numel(), generator=g)]
    labels = blocks.view(n, size // 8, size // 8).repeat_interleave(8, 1).repeat_interleave(8, 2)
    noise = torch.randint(-3, 4, (n, size, size, 3), generator=g)
    return (COLORS[labels] + noise).to(torch.uint8), labels


def test_kmeans_recovers_the_colours_in_frequency_order():
    masks, _ = noisy_masks()
    centers = kmeans_centers(masks, 5)
    assert centers.dtype == torch.float32
    assert torch.equal(centers, COLORS.float())


def test_kmeans_is_deterministic_per_seed():
    masks, _ = noisy_masks(seed=1)
    a = kmeans_centers(masks, 8, seed=3, sample=5000)
    b = kmeans_centers(masks, 8, seed=3, sample=5000)
    assert torch.equal(a, b)
    assert torch.equal(a, a.round())  # integer RGB: exact in every mask_to_class backend


def test_kmeans_with_fewer_colours_than_k():
    masks = COLORS[:3].to(torch.uint8)[torch.tensor([0, 0, 0, 1, 1, 2])].view(1, 2, 3, 3)
    assert torch.equal(kmeans_centers(masks, 8), COLORS[:3].float())


def test_kmeans_palette_maps_masks_back_to_their_labels():
    masks, labels = noisy_masks(seed=2)
    pal = kmeans_palette(masks, 5, max_dist=10.0)
    assert pal.num_classes == 5 and pal.names[0] == "cluster 0"
    assert torch.equal(pal.classes, torch.arange(5)) and torch.equal(pal.colors, COLORS.to(torch.uint8))
    for backend in ("triton", "reference"):
        ids = mask_to_class(masks[:, :, 8:], pal.centers, pal.classes, pal.max_dist, backend=backend)
        assert torch.equal(ids, labels[:, :, 8:]), backend


def test_save_and_load_roundtrip(tmp_path):
    masks, _ = noisy_masks()
    pal = kmeans_palette(masks, 5, max_dist=12.5)
    save_palette(pal, tmp_path / "run" / "palette.json")
    back = load_palette(tmp_path / "run" / "palette.json")
    for field in ("centers", "classes", "colors"):
        a, b = getattr(pal, field), getattr(back, field)
        assert a.dtype == b.dtype and torch.equal(a, b), field
    assert back.names == pal.names and back.max_dist == 12.5 and back.key() == pal.key()


def test_parse_palette_spec(tmp_path):
    masks, _ = noisy_masks()
    calls = []

    def sample():
        calls.append(1)
        return masks

    cityscapes = parse_palette_spec("cityscapes", sample, max_dist=30.0)
    assert cityscapes.num_classes == 19 and cityscapes.max_dist == 30.0 and not calls
    learned = parse_palette_spec("kmeans:5", sample)
    assert calls and torch.equal(learned.centers, COLORS.float())
    save_palette(learned, tmp_path / "palette.json")
    loaded = parse_palette_spec(str(tmp_path / "palette.json"), sample, max_dist=9.0)
    assert torch.equal(loaded.centers, learned.centers) and loaded.max_dist == 9.0
    for bad in ("kmeans", "kmeans:", "kmeans:x", "kmeans:1", "kmeans:65", "kmeans:-3", "voc", "missing.json"):
        with pytest.raises(OptionError):
            parse_palette_spec(bad, sample)


def test_bad_inputs():
    with pytest.raises(ValueError, match="uint8"):
        kmeans_centers(torch.zeros(2, 2, 3), 3)
    with pytest.raises(ValueError, match="k must be"):
        kmeans_centers(torch.zeros(2, 2, 3, dtype=torch.uint8), 65)


def test_reference_on_learned_palette_equals_kernel_on_random_colours():
    masks, _ = noisy_masks(seed=4)
    pal = kmeans_palette(masks, 7, sample=20_000)
    rand = torch.randint(0, 256, (2, 33, 35, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = mask_to_class_reference(rand, pal.centers, pal.classes, 60.0)
    assert torch.equal(mask_to_class(rand, pal.centers, pal.classes, 60.0, backend="triton"), expected)
