"""What a run trained on, cheaply: per split the file count, total bytes and a digest of the file names
and sizes (relative to the split: the same files under a new path match). Saved in last.pt; `--resume`
refuses a data folder whose files were added, removed or replaced since (its epochs, the position in
one and the LR schedule are counted in those files), naming what changed.

    saved = data_fingerprint({"train": train_files, "val": val_files})
    fingerprint_change(saved, data_fingerprint(...))   # None, or "train: 8 files then, 6 now"
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cityseg.data.formats import Sample


def data_fingerprint(splits: Mapping[str, Sequence[Path | Sample]]) -> dict[str, dict[str, Any]]:
    """{split: {"files": n, "bytes": total, "digest": sha256 of "name\\tsize" lines}}: one stat per file;
    a sample of a layout with separate labels counts as one, its photo and label files both digested."""
    out = {}
    for split, samples in splits.items():
        paths = [path for sample in samples for path in files_of(sample)]
        lines, total = [], 0
        for path in sorted(paths, key=lambda p: p.name):
            size = file_size(path)
            total += size
            lines.append(f"{path.name}\t{size}\n")
        out[split] = {"files": len(samples), "bytes": total,
                      "digest": hashlib.sha256("".join(lines).encode()).hexdigest()}
    return out


def file_size(path: Path) -> int:
    """Its size, or -1 for a file that cannot be read (a broken link with --skip-validate: the loader
    names it in one line when it meets it)."""
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def files_of(sample: Path | Sample) -> list[Path]:
    if isinstance(sample, Sample):
        return [sample.photo] + ([sample.label] if sample.label is not None else [])
    return [Path(sample)]


def fingerprint_change(saved: Mapping[str, Any], now: Mapping[str, Any]) -> str | None:
    """What differs between two fingerprints, in words; None when the files are the same."""
    changes = []
    for split, was in saved.items():
        is_ = now.get(split)
        if not isinstance(was, dict) or is_ is None or was.get("digest") == is_["digest"]:
            continue
        if was.get("files") != is_["files"]:
            changes.append(f"{split}: {was.get('files')} files then, {is_['files']} now")
        elif was.get("bytes") != is_["bytes"]:
            changes.append(f"{split}: the same number of files ({is_['files']}), {was.get('bytes'):,} bytes then, "
                           f"{is_['bytes']:,} now (files replaced)")
        else:
            changes.append(f"{split}: the same number and size of files, other names or sizes (files renamed "
                           "or replaced)")
    return "; ".join(changes) or None
