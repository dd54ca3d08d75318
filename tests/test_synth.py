"""Synthetic pair generator: format, determinism, mask colours after JPEG, photo variety, caching.

/work/venv/bin/pytest tests/test_synth.py
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

from cityseg.data import synth
from cityseg.palette import IGNORE_INDEX, cityscapes_palette, map_colors_reference

REQUIRED = ("road", "sidewalk", "building", "vegetation", "sky", "car", "person", "pole", "traffic sign")


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.jpg"))}


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def scenes() -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(photo, exact mask, mask decoded from the JPEG) for a handful of scenes."""
    out = []
    for i in range(1, 9):
        photo, mask = synth.render_pair(synth.pair_rng(0, "train", i))
        pair = decode(synth.encode_pair(photo, mask))
        out.append((photo, mask, pair[:, 256:]))
    return out


def test_render_pair_shapes_and_exact_label_colours(scenes):
    legal = {tuple(c) for c in synth.LABEL_COLORS.values()}
    for photo, mask, _ in scenes:
        assert photo.shape == mask.shape == (256, 256, 3)
        assert photo.dtype == mask.dtype == np.uint8
        assert {tuple(c) for c in np.unique(mask.reshape(-1, 3), axis=0)} <= legal


@pytest.mark.parametrize("size", [64, 101, 512])
def test_other_sizes(size):
    photo, mask = synth.render_pair(np.random.default_rng(3), size=size)
    assert photo.shape == mask.shape == (size, size, 3)


def test_write_dataset_format(tmp_path):
    out = synth.write_dataset(tmp_path / "d", n_train=3, n_val=2, seed=5)
    assert sorted(p.name for p in (out / "train").iterdir()) == ["1.jpg", "2.jpg", "3.jpg"]
    assert sorted(p.name for p in (out / "val").iterdir()) == ["1.jpg", "2.jpg"]
    for path in [*(out / "train").iterdir(), *(out / "val").iterdir()]:
        with Image.open(path) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (512, 256))
            assert JpegImagePlugin.get_sampling(im) == 2  # 4:2:0, as the Kaggle files
    meta = json.loads((out / synth.MARKER).read_text())
    assert (meta["n_train"], meta["n_val"], meta["seed"], meta["size"]) == (3, 2, 5, 256)


def test_jpeg_quality_matches_kaggle_tables():
    """The Kaggle files use libjpeg's standard tables at quality 95; so must we."""
    with Image.open(io.BytesIO(synth.encode_pair(*synth.render_pair(np.random.default_rng(0))))) as im:
        ours = im.quantization
    ref = io.BytesIO()
    Image.new("RGB", (16, 16)).save(ref, "JPEG", quality=95)
    with Image.open(ref) as im:
        assert ours == im.quantization


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = files(synth.write_dataset(tmp_path / "a", 3, 2, seed=1))
    b = files(synth.write_dataset(tmp_path / "b", 3, 2, seed=1))
    c = files(synth.write_dataset(tmp_path / "c", 3, 2, seed=2))
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a)
    assert a["train/1.jpg"] != a["val/1.jpg"]  # the split is part of the seed


def test_written_file_equals_encode_of_render_pair(tmp_path):
    synth.write_split(tmp_path, "val", 2, seed=4)
    expected = synth.encode_pair(*synth.render_pair(synth.pair_rng(4, "val", 2)))
    assert (tmp_path / "val" / "2.jpg").read_bytes() == expected


def test_worker_count_does_not_change_output(tmp_path):
    one = files(synth.write_split(tmp_path / "one", "train", 4, seed=3, workers=1).parent)
    two = files(synth.write_split(tmp_path / "two", "train", 4, seed=3, workers=2).parent)
    assert one == two and len(one) == 4


def test_write_split_removes_stale_files_and_rejects_unknown_split(tmp_path):
    synth.write_split(tmp_path, "train", 3, seed=0)
    synth.write_split(tmp_path, "train", 2, seed=0)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["1.jpg", "2.jpg"]
    with pytest.raises(ValueError, match="split"):
        synth.write_split(tmp_path, "test", 1, seed=0)


def test_jpeg_mask_stays_near_palette_colours(scenes):
    centers = cityscapes_palette().centers.numpy()
    near = total = 0
    for _, _, decoded in scenes:
        px = decoded.reshape(-1, 1, 3).astype(np.float32)
        dist = np.sqrt(((px - centers[None]) ** 2).sum(-1)).min(1)
        near += int((dist <= 30).sum())
        total += dist.size
    assert near / total >= 0.95


def test_jpeg_mask_covers_required_classes_and_void(scenes):
    pal = cityscapes_palette()
    counts = np.zeros(256, np.int64)
    for _, _, decoded in scenes:
        ids = map_colors_reference(torch.from_numpy(decoded.copy()), pal.centers, pal.classes)
        counts += np.bincount(ids.numpy().ravel(), minlength=256)
    present = {name for k, name in enumerate(pal.names) if counts[k] >= 20}  # not just JPEG fringes
    assert set(REQUIRED) <= present, f"missing {set(REQUIRED) - present}"
    assert counts[IGNORE_INDEX] > 0


def test_photo_is_not_a_function_of_the_class(scenes):
    """Colours vary within a class (per scene and per object), and overlap between classes."""
    pal = cityscapes_palette()
    photos = np.concatenate([p.reshape(-1, 3) for p, _, _ in scenes]).astype(np.float32)
    ids = np.concatenate(
        [map_colors_reference(torch.from_numpy(m), pal.centers, pal.classes).numpy().ravel() for _, m, _ in scenes]
    )
    for name in ("road", "building", "vegetation", "car"):
        k = pal.names.index(name)
        assert photos[ids == k].std(0).mean() > 10, name
    # A nearest-mean colour classifier does poorly: the layout, not the colour, gives the class.
    classes = [k for k in range(pal.num_classes) if (ids == k).any()]
    means = np.stack([photos[ids == k].mean(0) for k in classes])
    pred = np.asarray(classes)[((photos[::7, None] - means[None]) ** 2).sum(-1).argmin(1)]
    assert (pred == ids[::7]).mean() < 0.6


def test_default_dataset_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("CITYSEG_CACHE", str(tmp_path))
    first = synth.default_dataset(n_train=2, n_val=1, seed=0)
    assert first.parent == tmp_path and (first / synth.MARKER).exists()
    assert sorted(p.name for p in (first / "train").iterdir()) == ["1.jpg", "2.jpg"]
    stamp = (first / "train" / "1.jpg").stat().st_mtime_ns
    second = synth.default_dataset(n_train=2, n_val=1, seed=0)
    assert second == first
    assert (first / "train" / "1.jpg").stat().st_mtime_ns == stamp
    assert synth.default_dataset(n_train=2, n_val=1, seed=1) != first  # the key names the folder
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_incomplete_default_dataset_is_regenerated(tmp_path, monkeypatch):
    monkeypatch.setenv("CITYSEG_CACHE", str(tmp_path))
    folder = synth.default_dataset(n_train=2, n_val=1, seed=0)
    reference = files(folder)
    (folder / synth.MARKER).unlink()  # as if the run had been killed before the marker
    (folder / "train" / "2.jpg").unlink()
    (folder / "leftover.txt").write_text("from the interrupted run")
    again = synth.default_dataset(n_train=2, n_val=1, seed=0)
    assert again == folder
    assert (again / synth.MARKER).exists() and not (again / "leftover.txt").exists()
    assert files(again) == reference


def test_explicit_cache_dir_wins_over_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CITYSEG_CACHE", str(tmp_path / "env"))
    folder = synth.default_dataset(n_train=1, n_val=1, seed=0, cache_dir=tmp_path / "arg")
    assert folder.parent == tmp_path / "arg"
