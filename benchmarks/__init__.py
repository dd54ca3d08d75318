"""Benchmarks: loader, mask kernel, train step and end to end. Each script runs on its own
(`python benchmarks/NAME.py`) or through `cityseg-fast bench NAME`; results go to benchmarks/results/."""
