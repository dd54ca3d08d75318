"""The package's layers only point down, and its modules form no import cycle (every import counted,
function-local ones too): kernels (tensors in, tensors out) <- foundations <- palette <- data <-
model/metrics/checkpoint <- training | inference <- cli. Training and inference never import each other."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

# Lowest first; a module belongs to the first layer whose prefix matches its name.
LAYERS: list[tuple[str, ...]] = [
    ("kernels",),
    ("cityseg.errors",),
    ("cityseg.settings",),
    ("cityseg.config",),
    ("cityseg.options", "cityseg.outputs"),
    ("cityseg.batch_rule",),
    ("cityseg.runtime", "cityseg.distributed", "cityseg.progress", "cityseg.telemetry"),
    ("cityseg.palette", "cityseg.palette_kmeans"),
    ("cityseg.data",),
    ("cityseg.encoders", "cityseg.model", "cityseg.metrics", "cityseg.checkpoint", "cityseg.report"),
    ("cityseg.resolve",),
    ("cityseg.training", "cityseg.inference", "cityseg.profiling"),
    ("cityseg.cli", "cityseg.__main__"),
    ("cityseg",),  # the package's public API, which imports from every layer on demand
]
PEERS_APART = [("cityseg.training", "cityseg.inference")]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for top in ("cityseg", "kernels") for p in (ROOT / top).rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports (the longest known prefix of each imported name)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            for n in range(len(parts), 0, -1):
                if ".".join(parts[:n]) in known:
                    found.add(".".join(parts[:n]))
                    break
    return found


def layer(name: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{name} is in no layer: add it to LAYERS")


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, set(mods)) - {name} for name, path in mods.items()}


def test_every_module_has_a_layer() -> None:
    for name in modules():
        layer(name)


def test_imports_only_point_down() -> None:
    upward = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
              for a, deps in graph().items() for b in deps if layer(b) > layer(a)]
    assert not upward, "\n".join(upward)


def test_kernels_import_nothing_from_the_package() -> None:
    assert not [(a, b) for a, deps in graph().items() if a.startswith("kernels") for b in deps
                if b.startswith("cityseg")]


def test_training_and_inference_stay_apart() -> None:
    g = graph()
    for x, y in PEERS_APART:
        crossing = [(a, b) for a, deps in g.items() for b in deps
                    if (a.startswith(x) and b.startswith(y)) or (a.startswith(y) and b.startswith(x))]
        assert not crossing, crossing


def test_no_import_cycles() -> None:
    g = graph()
    # A package's __init__ re-exporting its own modules is not a cycle of the code's logic.
    g = {a: {b for b in deps if not a.startswith(b + ".")} for a, deps in g.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node)


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path: Path) -> None:
    """The checks above can fail: a made-up upward import is found."""
    fake = tmp_path / "m.py"
    fake.write_text("from cityseg.cli import app\nimport cityseg.palette\n")
    found = imports_of(fake, set(modules()))
    assert {"cityseg.cli", "cityseg.palette"} <= found and layer("cityseg.cli") > layer("cityseg.palette")
