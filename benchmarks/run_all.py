"""Loader, mask kernel, train step and end to end with their defaults, then the report of their results.

    python -m benchmarks.run_all --data DIR                  # results and REPORT.md: see below
    python -m benchmarks.run_all --data DIR --json OUT_DIR   # results and REPORT.md in OUT_DIR
    cityseg-fast bench all --data DIR                        # the same, through the CLI

Without --json each benchmark writes where it writes on its own (common.default_folder: the
checkout's benchmarks/results/ when run from inside the checkout, else the current folder), and
the report goes beside the results. Files already there are refused unless --overwrite, except in
the checkout's benchmarks/results/, whose figures are meant to be refreshed.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from benchmarks import end_to_end, loader, mask_kernel, report, train_step
from benchmarks.common import RESULTS, default_folder, device_kind, exit_with, new_parser, pick_device
from cityseg.outputs import new_output_files, user_path


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    p = new_parser("run_all", __doc__, prog, result=False)
    p.add_argument("--data", type=Path, default=None,
                   help="Kaggle pair folder for the loader and end-to-end runs (default: synthetic pairs)")
    p.add_argument("--json", type=Path, default=None, metavar="DIR", help="folder of the result files")
    p.add_argument("--overwrite", action="store_true", help="replace result files that exist")
    args = p.parse_args(argv)
    folder = user_path(args.json) if args.json else default_folder()
    kind = device_kind(pick_device())
    data = [] if args.data is None else ["--data", str(args.data)]
    runs = {loader: data, mask_kernel: [], train_step: [], end_to_end: data}
    results = {module: folder / f"{module.__name__.rsplit('.', 1)[1]}-{kind}.json" for module in runs}
    if folder != RESULTS:  # every file checked before the first benchmark, not after an hour of them
        new_output_files([*results.values(), folder / "REPORT.md", folder / report.PNG_NAME], "benchmark result",
                         overwrite=args.overwrite)
    for module, extra in runs.items():
        argv_of = [*extra, *(["--json", str(results[module])] if args.json else []),
                   *(["--overwrite"] if args.overwrite else [])]
        print(f"$ python -m {module.__name__} {shlex.join(argv_of)}".rstrip(), flush=True)
        module.main(argv_of)
    return report.main(["--results", str(folder)])


if __name__ == "__main__":
    exit_with(main)
