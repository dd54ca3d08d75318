"""The plain loader: the loader contract, paired augmentation, determinism, shards and resume."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cityseg.config import AugmentConfig
from cityseg.data.contract import denormalize
from cityseg.data.pairs import list_split, read_pair
from cityseg.data.sampler import EpochSampler
from cityseg.data.torch_loader import TorchPairLoader, init_worker
from cityseg.palette import IGNORE_INDEX, cityscapes_palette, map_colors_reference
from tests.conftest import make_pair_dataset, spec


def make_loader(root: Path, augment: AugmentConfig | None, **kw) -> TorchPairLoader:
    args = dict(image_size=32, batch_size=4, augment=augment, shuffle=False, drop_last=False, workers=0, seed=0)
    args.update(kw)
    return TorchPairLoader(list_split(root, "train"), cityscapes_palette(), spec(**args))


def test_contract_shapes_dtypes_layout(pair_dataset: Path) -> None:
    image, target = next(iter(make_loader(pair_dataset, None)))
    assert image.shape == (4, 3, 32, 32) and image.dtype == torch.float32
    assert image.is_contiguous(memory_format=torch.channels_last)
    assert target.shape == (4, 32, 32) and target.dtype == torch.int64
    assert set(target.unique().tolist()) <= set(range(19)) | {IGNORE_INDEX}
    # normalised with the ImageNet statistics, channel by channel, as pretrained-style inputs expect
    photos = torch.stack([torch.from_numpy(read_pair(f)[0].copy()) for f in list_split(pair_dataset, "train")[:4]])
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    reference = ((photos.float() / 255 - mean) / std).permute(0, 3, 1, 2)
    torch.testing.assert_close(image, reference, rtol=0, atol=1e-5)


def test_unaugmented_batch_equals_direct_decode(pair_dataset: Path) -> None:
    """The loader's target is the palette mapping of the file's right half, its photo the left half."""
    image, target = next(iter(make_loader(pair_dataset, None)))
    photo, mask = read_pair(list_split(pair_dataset, "train")[0])
    p = cityscapes_palette()
    assert torch.equal(target[0], map_colors_reference(torch.from_numpy(mask.copy()), p.centers, p.classes))
    assert torch.equal(denormalize(image[:1])[0], torch.from_numpy(photo.copy()))


def photo_classes(image: torch.Tensor) -> torch.Tensor:
    p = cityscapes_palette()
    return map_colors_reference(denormalize(image), p.centers, p.classes)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_geometric_augmentation_moves_photo_and_mask_together(tmp_path: Path, seed: int) -> None:
    """Pairs whose photo *is* its mask colours: after flip + rotation + scale-crop the photo still
    maps to the mask's classes, except at fill (255) and bilinear-blended class boundaries."""
    root = make_pair_dataset(tmp_path, n_train=4, n_val=1, size=64, photo_is_mask=True)
    aug = AugmentConfig(hflip=0.5, rotate_deg=20, scale=(0.8, 1.3))
    image, target = next(iter(make_loader(root, aug, image_size=64, seed=seed)))
    plain_image, plain_target = next(iter(make_loader(root, None, image_size=64)))
    # The warp ran on every sample: each target differs from the plain one and from its mirror (a flip
    # alone, with rotation and zoom dropped, would not do).
    for t, plain in zip(target, plain_target, strict=True):
        assert not torch.equal(t, plain) and not torch.equal(t, plain.flip(-1))
    valid = interior(target)
    agree = (photo_classes(image) == target)[valid].float().mean().item()
    assert valid.float().mean() > 0.25
    assert agree >= 0.99, agree


def interior(target: torch.Tensor) -> torch.Tensor:
    """Pixels whose 5x5 neighbourhood holds one class and no fill: away from blended edges."""
    t = target.float().unsqueeze(1)
    lo = -torch.nn.functional.max_pool2d(-t, 5, stride=1, padding=2)
    hi = torch.nn.functional.max_pool2d(t, 5, stride=1, padding=2)
    return ((lo == hi) & (t != IGNORE_INDEX)).squeeze(1)


def test_colour_jitter_changes_photo_only(tmp_path: Path) -> None:
    root = make_pair_dataset(tmp_path, n_train=4, n_val=1, size=32)
    aug = AugmentConfig(hflip=0.0, brightness=0.5, contrast=0.5, saturation=0.5, hue=0.1)
    image, target = next(iter(make_loader(root, aug)))
    plain_image, plain_target = next(iter(make_loader(root, None)))
    assert torch.equal(target, plain_target)
    assert (image - plain_image).abs().mean() > 0.05


def test_same_batches_with_any_worker_count(pair_dataset: Path) -> None:
    aug = AugmentConfig(hflip=0.5, rotate_deg=10, brightness=0.2)
    batches = {}
    for workers in (0, 2):
        loader = make_loader(pair_dataset, aug, shuffle=True, workers=workers, seed=3)
        loader.set_epoch(1)
        batches[workers] = list(loader)
    for (a_img, a_tgt), (b_img, b_tgt) in zip(batches[0], batches[2], strict=True):
        assert torch.equal(a_img, b_img) and torch.equal(a_tgt, b_tgt)


def test_epochs_differ_and_repeat(pair_dataset: Path) -> None:
    loader = make_loader(pair_dataset, AugmentConfig(hflip=0.5), shuffle=True, seed=1)
    runs = []
    for epoch in (0, 1, 0):
        loader.set_epoch(epoch)
        runs.append(torch.cat([t for _, t in loader]))
    assert torch.equal(runs[0], runs[2]) and not torch.equal(runs[0], runs[1])


def test_mid_epoch_start_continues_the_same_epoch(pair_dataset: Path) -> None:
    loader = make_loader(pair_dataset, AugmentConfig(hflip=0.5), shuffle=True, batch_size=2, seed=1)
    loader.set_epoch(2)
    full = list(loader)
    loader.set_epoch(2, start_batch=1)
    tail = list(loader)
    assert len(tail) == len(full) - 1
    for (a, b), (c, d) in zip(full[1:], tail, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)


@pytest.mark.parametrize("n,batch,drop_last", [(10, 4, True), (10, 4, False), (8, 4, False), (9, 2, True)])
def test_shards_are_disjoint_cover_and_match_len(n: int, batch: int, drop_last: bool) -> None:
    seen = []
    for shard_id in range(2):
        s = EpochSampler(n, batch, shuffle=True, augment=False, seed=0, drop_last=drop_last,
                         shard_id=shard_id, num_shards=2)
        keys = [k for k, _ in s]
        assert len(keys) == len(s)
        assert len(keys) == s.num_batches() * batch if drop_last else len(keys) == -(-n // 2)
        seen.append(keys)
    if not drop_last:
        assert set(seen[0]) | set(seen[1]) == set(range(n))
        assert len(set(seen[0]) & set(seen[1])) == (2 * -(-n // 2) - n)  # only the padding repeats


def test_resize_to_image_size_uses_nearest_for_mask(tmp_path: Path) -> None:
    root = make_pair_dataset(tmp_path, n_train=2, n_val=1, size=64)
    image, target = next(iter(make_loader(root, None, image_size=32, batch_size=2)))
    assert image.shape[-2:] == (32, 32) and target.shape[-2:] == (32, 32)
    p = cityscapes_palette()
    full = map_colors_reference(torch.from_numpy(read_pair(list_split(root, "train")[0])[1].copy()),
                                p.centers, p.classes)
    assert set(target[0].unique().tolist()) <= set(full.unique().tolist())  # no blended class ids


def test_close_ends_the_worker_processes(pair_dataset: Path) -> None:
    """Workers persist across epochs until `close()` / the end of `with`; a closed loader starts afresh."""
    loader = make_loader(pair_dataset, None, workers=2)
    with loader:
        next(iter(loader))
        workers = list(loader.loader._iterator._workers)
        assert len(workers) == 2 and all(w.is_alive() for w in workers)
    assert not any(w.is_alive() for w in workers) and all(w.exitcode == 0 for w in workers)
    with loader:
        assert len(list(loader)) == len(loader)
    loader.close()  # idempotent


def _worker_then_sleep(ready) -> None:
    init_worker(0)
    ready.set()
    time.sleep(60)


def test_worker_signal_policy() -> None:
    """SIGINT (a terminal's Ctrl-C to the process group) is the main process's to handle; SIGTERM
    (multiprocessing's terminate at interpreter exit, or a whole-group SIGTERM) ends a worker at
    once with status 0, which DataLoader does not report as a crash."""
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_worker_then_sleep, args=(ready,))
    proc.start()
    try:
        assert ready.wait(timeout=30)
        os.kill(proc.pid, signal.SIGINT)
        proc.join(timeout=1.0)
        assert proc.is_alive()
        os.kill(proc.pid, signal.SIGTERM)
        proc.join(timeout=30)
        assert proc.exitcode == 0
    finally:
        proc.kill()


ORPHAN_PROBE = """
import multiprocessing, os, sys, time
from cityseg.data.torch_loader import init_worker
orphan = sys.argv[1] == "orphan"
ready_r, ready_w = os.pipe()
if os.fork():  # the training process: it waits for its worker to be set up, then dies (or lives)
    os.read(ready_r, 1)
    if orphan:
        os._exit(0)
    os.waitpid(-1, 0)
    sys.exit(0)
init_worker(0)  # the worker, set up as DataLoader sets it up
parent = os.getppid()
os.write(ready_w, b"x")
while orphan and os.getppid() == parent:  # until the kernel re-parents it
    time.sleep(0.01)
try:  # what multiprocessing's resource sharer does when the process fetching a tensor has died
    raise ConnectionResetError(104, "Connection reset by peer")
except ConnectionResetError:
    sys.excepthook(*sys.exc_info())
queue = multiprocessing.Queue()  # a result queue whose reader has gone: its feeder thread fails
queue._reader.close()
queue.put(b"batch")
queue.close()
queue.join_thread()
print("went on")
"""


@pytest.mark.parametrize("parent", ["alive", "orphan"])
def test_orphaned_worker_exits_without_tracebacks(parent: str) -> None:
    """A loader worker (set up by init_worker) whose main process was killed exits silently on the
    broken connection, in the resource sharer's thread and the queue feeder alike; while its main
    process lives, the same errors are still printed."""
    done = subprocess.run([sys.executable, "-c", ORPHAN_PROBE, parent], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    if parent == "alive":
        assert done.stderr.count("Traceback") == 2 and "ConnectionResetError" in done.stderr, done.stderr
        assert done.stderr.count("BrokenPipeError") == 1 and done.stdout == "went on\n"
    else:
        assert done.stderr == "" and done.stdout == "", done.stderr
