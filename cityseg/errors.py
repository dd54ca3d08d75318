"""The one base of every error the user can fix: a bad file, folder, option, checkpoint or an
impossible request. The CLI prints `str(error)` as a single line (no traceback) and exits 2 (1 for
`check-data`'s findings); any other exception is a bug and keeps its traceback.

This module imports nothing, so every layer (kernels aside) can raise these.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; str(error) is one line naming the file or option and the problem."""


class OptionError(UserError):
    """A command-line option or config value outside what it may be."""


class OutputError(UserError):
    """An output path that cannot be written, or that holds something we must not overwrite."""


MAX_LINE = 1000  # characters of an error line: a megabyte-long value in a file must not flood the terminal


def capped(text: str, limit: int = MAX_LINE) -> str:
    """`text` on one line and at most about `limit` characters (its start and end kept)."""
    text = " ".join(str(text).splitlines())
    if len(text) <= limit:
        return text
    return f"{text[: limit * 3 // 4]} ... {text[-limit // 4:]} ({len(text)} characters)"
