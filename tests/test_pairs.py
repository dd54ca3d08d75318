"""The pair validator on a corpus of bad files built here, and the pair split itself."""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cityseg.data.pairs import PairError, list_split, read_pair, validate_pair
from tests.conftest import block_mask, write_pair


def good_pair_bytes(w: int = 64, h: int = 32, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def png16_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 64), dtype=np.uint16) + 1000).save(buf, "PNG")
    return buf.getvalue()


def huge_jpeg_header() -> bytes:
    """A JPEG whose SOF0 header claims 20000 x 10000 pixels (no real data behind it)."""
    data = bytearray(good_pair_bytes())
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 10000, 20000)  # height, width
    return bytes(data)


# name -> (file name, bytes or builder, fragment the one-line message must contain)
BAD_FILES = {
    "zero bytes": ("a.jpg", b"", "empty file"),
    "truncated jpeg": ("b.jpg", good_pair_bytes()[:400], "truncated"),
    "random bytes": ("c.jpg", np.random.default_rng(1).bytes(2000), "not an image"),
    "png named jpg": ("d.jpg", good_pair_bytes(fmt="PNG"), "PNG data"),
    "grayscale": ("e.jpg", good_pair_bytes(mode="L"), "grayscale"),
    "cmyk": ("f.jpg", good_pair_bytes(mode="CMYK"), "CMYK"),
    "16-bit png": ("g.png", png16_bytes(), "16-bit"),
    "wrong aspect": ("h.jpg", good_pair_bytes(300, 200), "wrong shape 300x200"),
    "odd width": ("i.jpg", good_pair_bytes(513, 256), "wrong shape 513x256"),
    "huge header": ("j.jpg", huge_jpeg_header(), "too large"),
    "text file": ("k.jpg", b"this is not a picture\n" * 20, "not an image"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_gives_one_line_error_naming_it(tmp_path: Path, case: str) -> None:
    name, content, fragment = BAD_FILES[case]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(PairError) as err:
        validate_pair(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ")
    assert fragment in message
    assert "\n" not in message


def test_directory_named_like_an_image(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").mkdir()
    with pytest.raises(PairError, match="is a directory"):
        validate_pair(tmp_path / "x.jpg")


def test_broken_symlink(tmp_path: Path) -> None:
    (tmp_path / "y.jpg").symlink_to(tmp_path / "missing.jpg")
    with pytest.raises(PairError, match="broken symbolic link"):
        validate_pair(tmp_path / "y.jpg")


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "z.jpg"
    path.write_bytes(good_pair_bytes())
    # Root ignores chmod 000, so simulate the permission check failing.
    monkeypatch.setattr(os, "access", lambda p, mode: False)
    with pytest.raises(PairError, match="permission denied"):
        validate_pair(path)


def test_missing_and_empty_split(tmp_path: Path) -> None:
    with pytest.raises(PairError, match="dataset folder not found"):
        list_split(tmp_path / "nope", "train")
    (tmp_path / "train").mkdir()
    with pytest.raises(PairError, match="empty split"):
        list_split(tmp_path, "train")
    with pytest.raises(PairError, match="missing split folder"):
        list_split(tmp_path, "val")


def test_list_split_natural_order_and_image_suffixes(tmp_path: Path) -> None:
    for name in ("10.jpg", "2.jpg", "1.jpg", "notes.txt", "b.png"):
        (tmp_path / "train").mkdir(exist_ok=True)
        (tmp_path / "train" / name).write_bytes(b"x")
    assert [p.name for p in list_split(tmp_path, "train")] == ["1.jpg", "2.jpg", "10.jpg", "b.png"]


@pytest.mark.parametrize("fmt,suffix", [("JPEG", "jpg"), ("PNG", "png")])
def test_read_pair_splits_halves(tmp_path: Path, fmt: str, suffix: str) -> None:
    rng = np.random.default_rng(0)
    mask = block_mask(rng, 32)
    photo = np.full_like(mask, 17)
    path = write_pair(tmp_path / f"1.{suffix}", photo, mask, fmt=fmt)
    got_photo, got_mask = read_pair(path)
    assert got_photo.shape == got_mask.shape == (32, 32, 3)
    if fmt == "PNG":  # lossless: exact halves
        np.testing.assert_array_equal(got_photo, photo)
        np.testing.assert_array_equal(got_mask, mask)
    else:
        assert np.abs(got_photo[:, :-8].astype(int) - 17).max() <= 3  # JPEG rings near the seam
    assert validate_pair(path).width == 64


def test_other_square_sizes_are_accepted(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = write_pair(tmp_path / "1.jpg", block_mask(rng, 96), block_mask(rng, 96))
    info = validate_pair(path)
    assert (info.width, info.height) == (192, 96)
