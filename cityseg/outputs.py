"""The one output policy of every command, and the safe way to create what a command writes.

The policy:
- a file a command writes is created exclusively: a file already at that name is refused by name
  unless the user passed `--overwrite` (`new_output_file`, `new_output_files`);
- an output inside an input is refused by name whatever `--overwrite` says: the checkpoint being
  read, a dataset split (DIR/train, DIR/val), a folder of inputs (`check_not_inside`);
- paths are resolved (symlinks included) before any such check, so a symlinked split or parent
  cannot hide what it points to;
- relative paths mean the user's working directory, also for subprocesses (`user_path`).
Problems (a file in the way, no permission, a full disk, a name too long) are one-line
`OutputError`s naming the path; run folders are claimed so that two runs can never share one.

    with claim_run_folder(Path("runs/a"), resume=False):   # refuses a folder holding anything else
        ...                                                 # the folder is locked for the run's life
    json_path = new_output_file(Path("m.json"), "metrics JSON", overwrite=False,
                                inputs=[(ckpt, "the checkpoint being read")])
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from cityseg.errors import OutputError

LOCK_NAME = ".lock"
# What a failed start leaves behind (error.log) and the lock file: a folder holding only these is free.
LEFTOVERS = {LOCK_NAME, "error.log"}


SPLITS = ("train", "val")  # a dataset's split folders (the Kaggle layout)


def cache_dir() -> Path:
    """$CITYSEG_CACHE, else ~/.cache/cityseg (an empty value too: never the current folder): the
    lookup tables and the synthetic sets live there."""
    return Path(os.environ.get("CITYSEG_CACHE") or Path.home() / ".cache" / "cityseg").absolute()


def user_path(path: str | os.PathLike) -> Path:
    """`path` as the user meant it: relative to their working directory (before any subprocess
    with another cwd sees it), `~` expanded."""
    return Path(path).expanduser().absolute()


def path_error(e: OSError) -> str | None:
    """The one line for an OSError any command may meet wherever it opens a file (a name or path
    the OS refuses as too long, a full disk), else None."""
    name = str(e.filename or "")
    shown = name if len(name) <= 120 else f"{name[:60]}...{name[-40:]} ({len(name)} characters)"
    if e.errno == errno.ENAMETOOLONG:
        return f"{shown}: path too long for the file system (a name over 255 bytes or a path over 4096)"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{shown or 'a file'}: no space left on the device (or over quota) while writing it"
    return None


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def dataset_split_of(path: Path) -> Path | None:
    """The dataset split folder (DIR/train or DIR/val of a folder holding both) that `path` is in
    or is, symlinks resolved; None if none."""
    for folder in (_real(path), *_real(path).parents):
        if folder.name in SPLITS and all((folder.parent / s).is_dir() for s in SPLITS):
            return folder
    return None


def check_not_inside(path: Path, inputs: list[tuple[Path, str]] = ()) -> None:
    """Refuse an output that is, or is inside, one of `inputs` ((path, what it is)), or inside a
    dataset split: `--overwrite` does not allow these."""
    real = _real(path)
    for source, what in inputs:
        src = _real(Path(source))
        if real == src:
            raise OutputError(f"{path}: is {what}: an output must never replace an input; choose another path")
        if src in real.parents:
            raise OutputError(f"{path}: is inside {what} {source}: an output must not be written among the inputs; "
                              "choose another path")
    split = dataset_split_of(path)
    if split is not None:
        raise OutputError(f"{path}: is inside the dataset split {split}: files written there would become "
                          "(bad) pairs of the dataset; choose another path")


def new_output_file(path: Path, what: str, *, overwrite: bool = False,
                    inputs: list[tuple[Path, str]] = ()) -> Path:
    """A file this command is about to create (see the module's policy): its folder is created; an
    existing file at that name is refused unless `overwrite`, an input always."""
    return new_output_files([path], what, overwrite=overwrite, inputs=inputs)[0]


def new_output_files(paths: list[Path], what: str, *, overwrite: bool = False,
                     inputs: list[tuple[Path, str]] = ()) -> list[Path]:
    """`new_output_file` for several files, all checked before any is written."""
    paths = [Path(p) for p in paths]
    for path in paths:
        check_not_inside(path, inputs)
        if path.is_dir():
            raise OutputError(f"{path}: is a folder; give a file name for the {what}")
        if (path.exists() or path.is_symlink()) and not overwrite:
            raise OutputError(f"{path}: already exists and would be replaced by the {what}: choose another "
                              "name, or pass --overwrite to replace it")
    for folder in {p.parent for p in paths}:
        ensure_dir(folder, f"folder of the {what}")
    return paths


def _reason(e: OSError) -> str:
    if e.errno == errno.ENAMETOOLONG:
        return "name too long for the file system"
    if e.errno in (errno.EEXIST, errno.ENOTDIR):
        return "a file is in the way (a file, not a folder, has that name or is one of its parents)"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device (or over quota)"
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
    """A file about to be written, replaced if it exists (for files of the command's own folders,
    e.g. a run's; a user-named output goes through `new_output_file`): its folder is created; a
    folder in its place is refused."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name for the {what}")
    ensure_dir(path.parent, f"folder of the {what}")
    return path


ERROR_LOG_HEADER = "# cityseg-fast: why this run ended (a new run in this folder replaces this file)\n"


def is_free(folder: Path) -> bool:
    """A folder a new run may use: missing, empty, or holding only what a failed start leaves (a
    lock, and an error.log that cityseg-fast wrote: a user's own error.log is theirs)."""
    if not folder.exists():
        return True
    return folder.is_dir() and {p.name for p in folder.iterdir()} <= LEFTOVERS and not _foreign_error_log(folder)


def _foreign_error_log(folder: Path) -> bool:
    log = folder / "error.log"
    if not (log.exists() or log.is_symlink()):
        return False
    try:
        with open(log, encoding="utf-8", errors="replace") as f:
            return f.readline(len(ERROR_LOG_HEADER) + 1) != ERROR_LOG_HEADER
    except OSError:
        return True


def write_error_log(folder: Path, message: str) -> bool:
    """FOLDER/error.log saying why the run ended (best effort, never raises); never replaces an
    error.log that cityseg-fast did not write."""
    if _foreign_error_log(folder):
        return False
    return write_text_quietly(folder / "error.log", f"{ERROR_LOG_HEADER}{message}\n")


def check_new_run_folder(folder: Path) -> None:
    """OutputError unless a new run may use `folder` (see `is_free`)."""
    split = dataset_split_of(folder)
    if split is not None:
        raise OutputError(f"{folder}: is inside the dataset split {split}: the run's pictures would become (bad) "
                          "pairs of the dataset; choose another --out")
    if not is_free(folder):
        if folder.exists() and not folder.is_dir():
            raise OutputError(f"{folder}: cannot create the run folder: a file is in the way")
        if (folder / "config.json").is_file() and not (folder / "checkpoints" / "last.pt").exists():
            check_not_in_use(folder)  # a run still starting there says "in use", not "stopped"
            raise OutputError(f"{folder}: holds a run that stopped before its first checkpoint (nothing to resume): "
                              "choose a new --out, or delete that folder and start again")
        raise OutputError(f"{folder}: already holds files (another run's?): choose a new --out, "
                          f"or continue that run with --resume {folder}")


@contextlib.contextmanager
def claim_run_folder(folder: Path, *, resume: bool) -> Iterator[Path]:
    """Hold `folder` for one run: a new run needs a free folder (see `is_free`), and a lock on
    FOLDER/.lock, held until the block ends, refuses a second run or resume in the same folder."""
    folder = Path(folder)
    if not resume:
        check_new_run_folder(folder)
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


def temp_beside(path: Path) -> Path:
    """Where an atomic write of `path` goes first: hidden, in the same folder (so the rename is
    atomic), named with the writer's pid (so `--resume` can tell a dead writer's leftovers) and
    thread: threads of one process racing to write the same file (file-check threads building the
    colour lookup table) must not share a temp file, or one renames it away under the other."""
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_native_id()}.tmp")


def temp_owner(temp: Path) -> int | None:
    """The pid that wrote a `temp_beside` file (None for a name of another form)."""
    field = temp.name.rsplit(".", 2)[-2] if temp.name.count(".") >= 3 else ""
    pid = field.split("-")[0]
    return int(pid) if pid.isdecimal() else None


@contextlib.contextmanager
def atomic_file(path: Path, fsync: bool = False) -> Iterator[BinaryIO]:
    """A binary file that replaces `path` when the block ends without error (readers never see half
    a file); on any error, a signal included, the temp file is removed and `path` left as it was.
    OSErrors pass through as they are (wrap in `writing` for a one-line error naming `path`)."""
    path = Path(path)
    tmp = temp_beside(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def writing(path: Path | str, what: str) -> Iterator[None]:
    """Turn an OSError met while writing `path` into one `OutputError` naming it: a full disk's
    write error names no file, and the user must learn which one (and why)."""
    try:
        yield
    except OSError as e:
        raise OutputError(f"{path}: cannot write the {what}: {_reason(e)}") from None


def atomic_write(path: Path, content: str | bytes, what: str) -> None:
    """Replace `path` with `content` atomically; a failure is one line naming `path`."""
    with writing(path, what), atomic_file(Path(path)) as f:
        f.write(content.encode() if isinstance(content, str) else content)


def write_text_quietly(path: Path, text: str) -> bool:
    """Best effort (e.g. error.log next to an error being reported): never raises, says if it wrote."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError:
        return False
    return True
