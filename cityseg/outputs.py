"""The one safe way to create what a command writes: folders and files whose problems (a file in the
way, no permission, a full disk) are one-line `OutputError`s naming the path, and run folders that
two runs can never share.

    with claim_run_folder(Path("runs/a"), resume=False):   # refuses a folder holding anything else
        ...                                                 # the folder is locked for the run's life
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from cityseg.errors import OutputError

LOCK_NAME = ".lock"
# What a failed start leaves behind (error.log) and the lock file: a folder holding only these is free.
LEFTOVERS = {LOCK_NAME, "error.log"}


def cache_dir() -> Path:
    """$CITYSEG_CACHE, else ~/.cache/cityseg: the lookup tables and the synthetic sets live there."""
    return Path(os.environ.get("CITYSEG_CACHE", Path.home() / ".cache" / "cityseg"))


def _reason(e: OSError) -> str:
    if e.errno in (errno.EEXIST, errno.ENOTDIR):
        return "a file is in the way (a file, not a folder, has that name or is one of its parents)"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied"
    if e.errno == errno.ENOSPC:
        return "no space left on the device"
    return e.strerror or str(e)


def ensure_dir(path: Path, what: str) -> Path:
    """Create folder `path` with its parents (fine if it exists); OutputError if that cannot be."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{path}: cannot create the {what}: {_reason(e)}") from None
    if not path.is_dir():  # mkdir(exist_ok) accepts an existing file on some platforms
        raise OutputError(f"{path}: cannot create the {what}: a file is in the way")
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write into the {what}: permission denied")
    return path


def output_file(path: Path, what: str) -> Path:
    """A file about to be written: its folder is created; a folder in its place is refused."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name for the {what}")
    ensure_dir(path.parent, f"folder of the {what}")
    return path


def is_free(folder: Path) -> bool:
    """A folder a new run may use: missing, empty, or holding only what a failed start leaves."""
    if not folder.exists():
        return True
    return folder.is_dir() and {p.name for p in folder.iterdir()} <= LEFTOVERS


@contextlib.contextmanager
def claim_run_folder(folder: Path, *, resume: bool) -> Iterator[Path]:
    """Hold `folder` for one run: a new run needs a free folder (see `is_free`), and a lock on
    FOLDER/.lock, held until the block ends, refuses a second run or resume in the same folder."""
    folder = Path(folder)
    if not resume and not is_free(folder):
        if folder.exists() and not folder.is_dir():
            raise OutputError(f"{folder}: cannot create the run folder: a file is in the way")
        raise OutputError(f"{folder}: already holds files (another run's?): choose a new --out, "
                          f"or continue that run with --resume {folder}")
    ensure_dir(folder, "run folder")
    fd = _lock(folder / LOCK_NAME, folder)
    try:
        yield folder
    finally:
        os.unlink(folder / LOCK_NAME)  # while still locked: a claimant that opened it re-checks the inode
        os.close(fd)


def check_not_in_use(folder: Path) -> None:
    """OutputError if a run holds `folder` now (e.g. before --resume reads its last.pt)."""
    if (folder / LOCK_NAME).exists():
        os.close(_lock(folder / LOCK_NAME, folder))  # raises when held; else released at once


def _lock(lock_path: Path, folder: Path) -> int:
    """Open and exclusively lock `lock_path`; its pid inside names the owner for a refused claimant."""
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"{lock_path}: cannot create the run's lock file: {_reason(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputError(f"{folder}: in use by another cityseg-fast run (pid {owner}); "
                              "wait for it to end or choose another --out") from None
        try:
            current = os.stat(lock_path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:  # still the file at that name: ours
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)  # its owner removed it as we opened it: take the new one


def write_text_quietly(path: Path, text: str) -> bool:
    """Best effort (e.g. error.log next to an error being reported): never raises, says if it wrote."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError:
        return False
    return True
