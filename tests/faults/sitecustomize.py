"""Fault injection for process tests: with this folder on PYTHONPATH, every file whose name contains
$CITYSEG_TEST_FULL_DISK opens as usual but each write to it fails as a full disk does (ENOSPC, and
no file name in the error: the OS does not give one), in this process and in any it starts."""

from __future__ import annotations

import builtins
import errno
import io
import os

MARK = os.environ.get("CITYSEG_TEST_FULL_DISK", "")
_open = io.open


class FullDisk:
    """A file object whose writes fail; everything else is the real file's."""

    def __init__(self, file) -> None:  # noqa: ANN001 - any file object
        self._file = file

    def write(self, data) -> int:  # noqa: ANN001
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def writelines(self, lines) -> None:  # noqa: ANN001
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._file, name)

    def __enter__(self) -> FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def __iter__(self):  # noqa: ANN204
        return iter(self._file)


def full_disk_open(file, mode="r", *args, **kwargs):  # noqa: ANN001, ANN201
    opened = _open(file, mode, *args, **kwargs)
    writing = any(c in mode for c in "wax+")
    if MARK and writing and isinstance(file, (str, bytes, os.PathLike)) and MARK in os.fsdecode(file):
        return FullDisk(opened)
    return opened


if MARK:
    builtins.open = io.open = full_disk_open
