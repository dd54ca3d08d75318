"""Benchmarks: loader, mask kernel, train step, end to end and more. Each module runs from the
checkout's root as `python -m benchmarks.NAME ARGS`, or as `cityseg-fast bench SUBCOMMAND ARGS` with
the same ARGS; results go to benchmarks/results/ (benchmarks/common.py: where, and what they share)."""
