"""The repository root holds only the project's layout: a stray file there (a test's leftover, a
scratch config, a symlink to /dev/zero) fails here before it is committed. Tests write into tmp_path;
tests/conftest.py also fails the session when a test leaves a new entry at the root."""

from __future__ import annotations

import subprocess

from tests.conftest import ROOT

# What the root may hold: the package, its kernels, benchmarks, tests, CI, and what packaging needs.
LAYOUT = {"cityseg", "kernels", "benchmarks", "tests", ".ci", "pyproject.toml", "README.md", ".gitignore"}


def top_level(*git_args: str) -> set[str]:
    listed = subprocess.run(["git", "ls-files", "-z", *git_args], cwd=ROOT, capture_output=True, check=True).stdout
    return {path.split("/", 1)[0] for path in listed.decode().split("\0") if path}


def test_the_root_holds_only_the_layout() -> None:
    tracked = top_level()
    untracked = top_level("--others", "--exclude-standard")  # would be committed by `git add -A`
    assert tracked - LAYOUT == set(), f"tracked files at the root outside the layout: {sorted(tracked - LAYOUT)}"
    assert untracked - LAYOUT == set(), f"untracked files at the root outside the layout: {sorted(untracked - LAYOUT)}"
    assert {"cityseg", "kernels", "tests", "pyproject.toml", "README.md"} <= tracked


def test_ci_runs_the_readmes_test_commands() -> None:
    """.ci/run's install-and-test line is the README's, both tiers: CI fails where a newcomer would."""
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == "pip install -e '.[test]' && pytest -q && pytest -q -m slow", ci
    readme = (ROOT / "README.md").read_text()
    assert "pip install -e '.[test]' && pytest -q && pytest -q -m slow" in readme
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "addopts = \"-ra -m 'not slow' " in pyproject  # `pytest -q` leaves the slow tier to `-m slow`
