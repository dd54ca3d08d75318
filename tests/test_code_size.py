"""Readable units: no class in the package over 250 lines, no function over 60 (the CLI's command
functions and the synthetic data generator excepted: long option lists and drawing recipes). Counted
from the source with `ast`, decorators and docstrings included."""

from __future__ import annotations

import ast

from tests.conftest import ROOT

MAX_CLASS, MAX_FUNCTION = 250, 60
EXCEPTED = ("cityseg/cli/", "cityseg/data/synth/")


def oversized(source: str, name: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            lines = node.end_lineno - first + 1
            limit = MAX_CLASS if isinstance(node, ast.ClassDef) else MAX_FUNCTION
            if lines > limit:
                found.append(f"{name}: {node.name} is {lines} lines (at most {limit})")
    return found


def test_no_class_over_250_lines_no_function_over_60() -> None:
    found = []
    for path in sorted((ROOT / "cityseg").rglob("*.py")):
        name = path.relative_to(ROOT).as_posix()
        if not name.startswith(EXCEPTED):
            found += oversized(path.read_text(), name)
    assert not found, "\n".join(found)


def test_the_count_sees_long_functions_and_classes() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(59))
    assert oversized(f"def f():\n{body}\n", "a.py") == []  # 60 lines
    assert oversized(f"@decorated\ndef f():\n{body}\n", "a.py") == ["a.py: f is 61 lines (at most 60)"]
    methods = "\n".join(f"    def m{i}(self):\n        return {i}\n" for i in range(84))  # 3 lines each
    assert oversized(f"class C:\n{methods}", "a.py") == ["a.py: C is 252 lines (at most 250)"]
