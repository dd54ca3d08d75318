"""What every loader promises, and the explicit lifetime of the processes and threads behind it.

A loader yields `(image, target)` batches: image float (B, 3, S, S), normalised, channels-last
strides, on its device; target int64 (B, S, S) class ids, 255 = ignore. Worker processes (plain
loader), decode threads (DALI) or decode workers (device cache) belong to the loader that started
them: `close()` ends them, and `with loader:` closes it on every way out of the block. Leaving them
to garbage collection is what made `cityseg-fast train` hang at exit: a persistent DataLoader worker
still alive when the interpreter ends is terminated and then joined without a timeout.
"""

from __future__ import annotations

from types import TracebackType


class ClosingLoader:
    """`with loader: ...` closes the loader on the way out, success or error. Subclasses implement
    `close()`: idempotent, and a closed loader may be iterated again (it starts afresh)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
