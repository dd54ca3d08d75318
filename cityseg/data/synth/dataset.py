"""Dataset I/O: numbered pair files per split, the `synth.json` marker that vouches for a complete
folder, the refusal to write into folders this package did not write, and the cached default set."""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path

from cityseg.data.synth.render import GENERATOR_VERSION, JPEG_QUALITY, SPLITS, _jpeg, _pair_image, _render, pair_rng
from cityseg.errors import OutputError
from cityseg.outputs import atomic_write, ensure_dir
from cityseg.outputs import cache_dir as default_cache_dir
from cityseg.progress import Counter, stage

MARKER = "synth.json"  # written last: a folder without it is an interrupted generation
PARTIAL = "synth.partial"  # written first: a folder with it is ours, if not (yet) complete


def _write_one(split_dir: Path, split: str, seed: int, size: int, index: int) -> None:
    # The bytes of encode_pair(*render_pair(...)), without the round trip through arrays.
    data = _jpeg(_pair_image(_render(pair_rng(seed, split, index), size)), JPEG_QUALITY)
    path = split_dir / f"{index}.jpg"
    if path.is_symlink():  # replace the link, never write through it into a file elsewhere
        path.unlink()
    path.write_bytes(data)


def write_split(out_dir: Path, split: str, n: int, seed: int, size: int = 256, workers: int = 1,
                count: Counter | None = None) -> Path:
    """Write out_dir/split/1.jpg .. n.jpg; numbered files beyond n left by an earlier generation are
    removed (`write_dataset` makes sure the folder is one this module wrote)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    split_dir = ensure_dir(Path(out_dir) / split, "split folder")
    for old in split_dir.glob("*.jpg"):
        if old.stem.isascii() and old.stem.isdigit() and int(old.stem) > n:
            old.unlink()
    job = functools.partial(_write_one, split_dir, split, seed, size)
    if workers > 1 and n > 1:
        # spawn, not fork: the caller may hold threads (torch, DALI) that make fork unsafe
        with multiprocessing.get_context("spawn").Pool(min(workers, n)) as pool:
            chunk = max(1, min(16, n // (4 * workers)))
            for _ in pool.imap_unordered(job, range(1, n + 1), chunksize=chunk):
                if count is not None:
                    count.add()
    else:
        for i in range(1, n + 1):
            job(i)
            if count is not None:
                count.add()
    return split_dir


def _meta(n_train: int, n_val: int, seed: int, size: int) -> dict:
    return {
        "generator": "cityseg.data.synth",
        "version": GENERATOR_VERSION,
        "n_train": n_train,
        "n_val": n_val,
        "seed": seed,
        "size": size,
        "jpeg_quality": JPEG_QUALITY,
    }


def write_dataset(out_dir: Path, n_train: int, n_val: int, seed: int, size: int = 256, workers: int = 1,
                  count: Counter | None = None) -> Path:
    """Both splits, then the marker `synth.json` last: its presence means the folder is complete.

    `out_dir` must be new, empty, or a set this function wrote (it holds `synth.json`, or
    `synth.partial` while a generation is under way): anything else is refused untouched, so a real
    dataset (Kaggle names its files 1.jpg .. N.jpg, as this does) can never be overwritten."""
    out_dir = Path(out_dir)
    check_synth_target(out_dir)
    ensure_dir(out_dir, "output folder")
    # Ours from now on, even if interrupted: a rerun may rewrite it.
    (out_dir / PARTIAL).write_text(json.dumps(_meta(n_train, n_val, seed, size)) + "\n")
    (out_dir / MARKER).unlink(missing_ok=True)  # an old marker must not vouch for a half-rewritten folder
    write_split(out_dir, "train", n_train, seed, size, workers, count)
    write_split(out_dir, "val", n_val, seed, size, workers, count)
    atomic_write(out_dir / MARKER, json.dumps(_meta(n_train, n_val, seed, size), indent=1) + "\n", "dataset marker")
    (out_dir / PARTIAL).unlink()
    return out_dir


def check_synth_target(out_dir: Path) -> None:
    """Refuse (OutputError) a target that is a file, or a non-empty folder this module did not write."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: is a file, not a folder")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not ((out_dir / MARKER).is_file() or (out_dir / PARTIAL).is_file()):
        raise OutputError(f"{out_dir}: not empty and not a set written by `cityseg-fast synth` (no {MARKER}): "
                          "refusing to write into it; choose a new or empty folder")
    # The marker vouches for this folder only: a split that resolves elsewhere (a symlink to a real
    # dataset) is not ours, and writing through it would replace someone's pairs.
    real = Path(os.path.realpath(out_dir))
    for split in SPLITS:
        target = out_dir / split
        resolved = Path(os.path.realpath(target))
        if target.is_symlink() or (target.exists() and resolved.parent != real):
            raise OutputError(f"{target}: is a link to {resolved}, outside this synthetic set: refusing to write "
                              "through it; remove the link or choose a new folder")


def _complete(folder: Path, meta: dict) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()) == meta
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return False


def default_dataset(
    n_train: int = 2000, n_val: int = 200, seed: int = 0, size: int = 256, cache_dir: Path | None = None
) -> Path:
    """The cached synthetic set used when no data folder is given: generated once, then reused.

    Generation goes to a temporary sibling that is renamed into place, so concurrent callers (DDP
    ranks) and interrupted runs never leave a half-written folder under the final name."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()  # $CITYSEG_CACHE
    final = root / f"synth-v{GENERATOR_VERSION}-train{n_train}-val{n_val}-seed{seed}-{size}px"
    meta = _meta(n_train, n_val, seed, size)
    if _complete(final, meta):
        return final
    ensure_dir(root, "cache folder ($CITYSEG_CACHE, default ~/.cache/cityseg)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        workers = 1 if n_train + n_val < 1000 else min(os.cpu_count() or 1, 8)  # a pool takes ~1 s to start
        pairs = n_train + n_val
        with stage(f"synthetic data: generating {pairs:,} pairs of {size} px into {final}",
                   f"once: later runs reuse them; ~{pairs * 0.1 / workers:.0f} s of {workers} core(s) at 0.1 s a pair"):
            write_dataset(tmp, n_train, n_val, seed, size, workers, Counter("synthetic data: pairs", pairs))
        _move_into_place(tmp, final, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # already gone after a successful move
    return final


def _move_into_place(tmp: Path, final: Path, meta: dict) -> None:
    """Rename a finished folder to its final name; a complete one that appeared meanwhile wins."""
    if _complete(final, meta):
        return
    if final.exists():
        shutil.rmtree(final)  # an interrupted or mismatched earlier attempt
    try:
        os.replace(tmp, final)
    except OSError:
        if not _complete(final, meta):  # only acceptable if another process renamed theirs first
            raise
