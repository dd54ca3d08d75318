"""Shared fixtures: tiny pair datasets written in the Kaggle format, the real sample (skipped when
absent), and the session's cache folder (below: never ~/.cache)."""

from __future__ import annotations

import hashlib
import os
import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The code that writes into $CITYSEG_CACHE (lookup tables, synthetic sets): the cache folder is keyed by it.
CACHE_PRODUCERS = ("kernels", "cityseg/palette.py", "cityseg/outputs.py", "cityseg/data/synth")


def cache_key() -> str:
    """A hash of the source of every cache producer, and of the interpreter and packages that ran it."""
    digest = hashlib.sha256(f"{sys.version} torch {version('torch')} numpy {version('numpy')}".encode())
    for name in CACHE_PRODUCERS:
        path = ROOT / name
        for source in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(str(source.relative_to(ROOT)).encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:16]


# Set before anything imports cityseg (pytest imports this module before every test module): the tests'
# caches live under .pytest_cache in a folder keyed by the code that fills it, never in ~/.cache. A
# table built by other code (an older checkout, a planted bug's undo) is never read, and a session
# after no change to that code reuses the tables (a table is ~35 CPU-seconds to build on 2 cores).
# Subprocess tests inherit these variables.
# The lookup tables and compile caches a caller set are kept (the GPU suite shares one between its
# steps: the tables verify themselves on load), unless under ~/.cache.
SESSION_CACHE = ROOT / ".pytest_cache" / "cityseg" / cache_key()
KEPT_CACHES = {"CITYSEG_CACHE": "cityseg", "TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}
for _var, _name in KEPT_CACHES.items():  # else ~/.cache/cityseg, /tmp/torchinductor_$USER, ~/.triton/cache
    if not os.environ.get(_var) or Path(os.environ[_var]).expanduser().resolve().is_relative_to(
            (Path.home() / ".cache").resolve()):
        os.environ[_var] = str(SESSION_CACHE / _name)
os.environ["XDG_CACHE_HOME"] = str(SESSION_CACHE / "xdg")  # pip, torch hub, fontconfig, ...
os.environ["MPLCONFIGDIR"] = str(SESSION_CACHE / "matplotlib")  # else ~/.cache/matplotlib or ~/.matplotlib
os.environ["TORCH_HOME"] = str(SESSION_CACHE / "torch")  # else ~/.cache/torch
# Under pytest-xdist (addopts: one worker per core) every worker and every command it starts uses one
# torch / OpenMP thread: two workers with two spinning threads each on two cores make CPU ops many
# times slower, not faster. Set before anything imports torch; subprocesses inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = "1"

from typing import TYPE_CHECKING  # noqa: E402

import pytest  # noqa: E402

# torch, numpy and the package are imported by the fixtures and helpers that use them, not here: pytest
# imports this file before its clock starts, and PyTorch alone takes 2-15 s to load on 2 cores, which
# the printed suite time would leave out.
if TYPE_CHECKING:
    import numpy as np

    from cityseg.data.contract import LoaderSpec


@pytest.fixture(scope="session", autouse=True)
def lookup_tables() -> None:
    """The lookup table every training run uses, built (or read from the session cache) once, before
    the first test that needs it, inside pytest's clock: the printed time is the suite's wall time, and
    subprocess tests read the table from the cache instead of each building its own."""
    from cityseg.palette import cityscapes_palette, lookup_table

    lookup_table(cityscapes_palette())


ROOT_AT_START: set[str] = set()


def pytest_sessionstart(session) -> None:
    ROOT_AT_START.update(p.name for p in ROOT.iterdir())


def pytest_sessionfinish(session, exitstatus) -> None:
    """A test that leaves a file at the repository root fails the session (tests write into tmp_path).
    Checked once, by the process that started the session (not by each xdist worker)."""
    if hasattr(session.config, "workerinput"):
        return
    left = sorted({p.name for p in ROOT.iterdir()} - ROOT_AT_START - {".pytest_cache", ".hypothesis", ".ruff_cache"})
    if left:
        print(f"\nerror: the tests left these at the repository root: {left}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# The flags of a tiny CPU run, in one place: 32 px, width 4, depth 2, batch 2, eager (loader workers at
# their default, as users run it). TINY_FP32 also turns autocast off.
TINY = ["--device", "cpu", "--no-compile", "--image-size", "32", "--width", "4", "--depth", "2", "--batch-size", "2"]
TINY_FP32 = [*TINY, "--no-amp"]


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
    import numpy as np

    from cityseg.palette import cityscapes_palette

    colors = cityscapes_palette().colors.numpy()
    ids = rng.integers(0, len(colors), (blocks, blocks))
    cells = np.kron(ids, np.ones((size // blocks + 1, size // blocks + 1), dtype=np.int64))[:size, :size]
    return colors[cells]


def write_pair(path: Path, photo: np.ndarray, mask: np.ndarray, fmt: str = "JPEG", quality: int = 95) -> Path:
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate([photo, mask], axis=1)).save(path, fmt, quality=quality)
    return path


def make_pair_dataset(root: Path, n_train: int = 8, n_val: int = 4, size: int = 32, seed: int = 0,
                      photo_is_mask: bool = False) -> Path:
    """Learnable toy pairs: the photo is the mask's colours darkened, plus noise (or exactly the mask)."""
    import numpy as np

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
    import torch

    from cityseg.data.contract import LoaderSpec

    if "device" in kw:
        kw["device"] = torch.device(kw["device"])
    return LoaderSpec(**kw)
