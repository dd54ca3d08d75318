"""The Cityscapes palette and its two mappings (reference vs lookup table)."""

from __future__ import annotations

from pathlib import Path

import torch
from cityscapesscripts.helpers.labels import labels

from cityseg.data.pairs import list_split, read_pair
from cityseg.palette import (
    IGNORE_INDEX,
    cityscapes_palette,
    colorize,
    map_colors_lut,
    map_colors_reference,
)


def test_palette_matches_cityscapesscripts() -> None:
    p = cityscapes_palette()
    assert p.centers.shape == (34, 3) and p.num_classes == 19
    train = {lab.trainId: lab for lab in labels if 0 <= lab.trainId < 255}
    assert p.names == tuple(train[i].name for i in range(19))
    assert p.colors.tolist() == [list(train[i].color) for i in range(19)]
    assert set(p.classes.tolist()) == set(range(19)) | {IGNORE_INDEX}


def test_exact_palette_colours_map_to_their_train_ids() -> None:
    p = cityscapes_palette()
    ids = map_colors_reference(p.colors, p.centers, p.classes)
    assert ids.tolist() == list(range(19))
    # pole and polegroup share (153,153,153): the tie goes to the lower index, i.e. pole (5)
    assert map_colors_reference(torch.tensor([[153, 153, 153]], dtype=torch.uint8), p.centers, p.classes).item() == 5
    void = torch.tensor([[0, 0, 0], [111, 74, 0], [81, 0, 81], [250, 170, 160]], dtype=torch.uint8)
    assert map_colors_reference(void, p.centers, p.classes).tolist() == [IGNORE_INDEX] * 4


def test_max_dist_sends_far_colours_to_ignore() -> None:
    p = cityscapes_palette(max_dist=10)
    near_road = torch.tensor([[128 + 5, 64, 128 - 5]], dtype=torch.uint8)  # distance 7.07
    far_from_all = torch.tensor([[128 + 9, 64 + 9, 128]], dtype=torch.uint8)  # 12.7 from road
    assert map_colors_reference(near_road, p.centers, p.classes, 10).item() == 0
    assert map_colors_reference(far_from_all, p.centers, p.classes, 10).item() == IGNORE_INDEX
    assert map_colors_lut(far_from_all, p).item() == IGNORE_INDEX


def test_lut_equals_reference_on_random_colours() -> None:
    g = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (4, 128, 128, 3), dtype=torch.uint8, generator=g)
    for max_dist in (None, 30.0):
        p = cityscapes_palette(max_dist)
        assert torch.equal(map_colors_lut(rgb, p), map_colors_reference(rgb, p.centers, p.classes, max_dist))


def test_lut_equals_reference_on_real_masks(real_sample: Path) -> None:
    p = cityscapes_palette()
    masks = torch.stack([torch.from_numpy(read_pair(f)[1].copy()) for f in list_split(real_sample, "val")[:8]])
    assert torch.equal(map_colors_lut(masks, p), map_colors_reference(masks, p.centers, p.classes))


def test_real_masks_lie_near_palette_colours_and_road_dominates(real_sample: Path) -> None:
    files = list_split(real_sample, "train")[::8]
    masks = torch.stack([torch.from_numpy(read_pair(f)[1].copy()) for f in files])
    strict = cityscapes_palette(max_dist=30)
    # A probe palette with every centre in class 0 counts "near any colour" incl. void colours.
    near = map_colors_reference(masks, strict.centers, torch.zeros(34, dtype=torch.int64), 30) == 0
    assert near.float().mean() >= 0.85
    ids = map_colors_lut(masks, cityscapes_palette())
    counts = torch.bincount(ids[ids != IGNORE_INDEX].flatten(), minlength=19)
    assert counts.argmax().item() == 0  # road


def test_colorize_inverts_mapping() -> None:
    p = cityscapes_palette()
    ids = torch.arange(19).view(1, 19)
    assert torch.equal(map_colors_reference(colorize(ids, p), p.centers, p.classes), ids)


def test_far_share_counts_the_pixels_far_from_every_centre() -> None:
    """far_share (distinct colours through the reference) against a float64 brute force over pixels."""
    import numpy as np

    from cityseg.palette import far_share

    p = cityscapes_palette()
    g = torch.Generator().manual_seed(3)
    base = p.colors[torch.randint(0, len(p.colors), (64, 48), generator=g)].int()
    rgb = (base + torch.randint(-70, 70, (64, 48, 3), generator=g)).clamp(0, 255).to(torch.uint8)
    for max_dist in (30.0, 60.0):
        pixels = rgb.reshape(-1, 1, 3).numpy().astype(np.float64)
        dist2 = ((pixels - p.centers.numpy().astype(np.float64)[None]) ** 2).sum(-1).min(1)
        want = float((dist2 > max_dist**2).mean())
        assert 0.05 < want < 0.95  # the case separates near from far
        assert far_share(rgb, p, max_dist) == want
    assert far_share(p.centers.to(torch.uint8), p, 1.0) == 0.0  # every centre is near itself
    # Pixels count, not distinct colours: one far colour on 3 of 4 pixels, one palette colour on the other.
    block = torch.tensor([[[255, 255, 255]] * 3 + [p.colors[0].tolist()]], dtype=torch.uint8)
    assert far_share(block, p, 30.0) == 0.75


def test_the_fast_table_build_is_the_reference_on_every_colour() -> None:
    """build_lut's integer path equals the reference on all 2^24 colours, with ties (a duplicated
    centre, two centres equidistant from a plane of colours) and a distance limit."""
    from kernels.mask_to_class import _build_lut_reference, build_lut

    g = torch.Generator().manual_seed(1)
    centers = torch.randint(0, 256, (12, 3), generator=g).float()
    centers[5] = centers[2]
    centers[7], centers[8] = torch.tensor([0.0, 0, 0]), torch.tensor([2.0, 0, 0])
    classes = torch.randint(0, 20, (12,), generator=g)
    classes[3] = IGNORE_INDEX
    # 17^2 = 289 is a whole number: colours at exactly the limit exist, and stay near (> limit is far)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2^24 colours x 12 centres: one thread, not two fighting a busy machine's load
    try:
        assert torch.equal(build_lut(centers, classes, 17.0), _build_lut_reference(centers, classes, 17.0))
    finally:
        torch.set_num_threads(threads)
