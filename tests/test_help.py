"""Every command's `--help`, rendered as a user sees it at 80 columns: `-h` works everywhere, no help
text loses its `[brackets]` to Rich markup, no on/off flag or list shows a Python type placeholder,
and no choice list breaks mid-word.

The help is rendered in this process (typer's CliRunner through the same group class as the
installed script); `-h` on the installed script itself is checked as a process once.
"""

from __future__ import annotations

import re

import pytest
import typer.main
from typer.testing import CliRunner

from cityseg.cli import app
from cityseg.config import SETTINGS
from tests.cli_process import run_cli

WIDTH = 80


def command_paths() -> list[list[str]]:
    """Every command and group, as the words a user types: [], ["train"], ["bench", "loader"], ..."""
    paths: list[list[str]] = []

    def walk(command, prefix: list[str]) -> None:
        paths.append(prefix)
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*prefix, name])

    walk(typer.main.get_command(app), [])
    return paths


def render_help(words: list[str], flag: str = "--help") -> str:
    result = CliRunner().invoke(app, [*words, flag], env={"COLUMNS": str(WIDTH), "TERMINAL_WIDTH": str(WIDTH)},
                                terminal_width=WIDTH)
    assert result.exit_code == 0, result.output
    return result.output


def help_texts(words: list[str]) -> list[str]:
    """The help strings of the command's options and its own description, as written in the code."""
    command = typer.main.get_command(app)
    for word in words:
        command = command.commands[word]
    params = [p for p in command.params if getattr(p, "help", None)]
    return [p.help for p in params] + ([command.help] if command.help else [])


PATHS = command_paths()


@pytest.mark.parametrize("words", PATHS, ids=[" ".join(w) or "cityseg-fast" for w in PATHS])
def test_help_reads_right(words: list[str]) -> None:
    text = render_help(words)
    assert text == render_help(words, "-h")  # -h is --help on every command
    assert "<bool>" not in text and "list[" not in text and "<list" not in text, text
    # Every bracketed word a help text holds (e.g. "[data]") reaches the screen.
    flat = " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())
    for written in help_texts(words):
        for tag in re.findall(r"\[[a-z.]+\]", written.replace("\\[", "[")):
            assert tag in flat, f"{tag} of {written!r} is missing from the help of {' '.join(words)}"
    # No type placeholder is cut in two (`<auto|torch|dali|ca` / `che>`): each opens and closes on one line.
    for line in text.splitlines():
        assert not re.search(r"<[\w|+.=-]+(\s|$)", line), f"a placeholder broken across lines: {line!r}"
        assert not re.search(r"(^|\s)[\w|+.=-]*[a-z]>", line), f"a placeholder broken across lines: {line!r}"


def test_train_help_shows_its_config_sections_and_fits_80_columns() -> None:
    text = render_help(["train"])
    flat = " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())
    assert "[data], [model], [train]" in flat
    assert all(len(line) <= WIDTH for line in text.splitlines())
    assert len(text.splitlines()) <= 170  # was 210 lines; the choice lists now read in the help text
    for values in ("auto, torch, dali, cache", "default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs"):
        assert values in flat
    # What the help promises about --resume and --init-from is what the command does.
    resumable = [s.option for s in SETTINGS.values() if s.resume]
    assert f"only these apply: {', '.join(resumable)}." in flat and "--epochs" in resumable
    assert "architecture (its flags are refused)" in flat


def test_dash_h_on_the_installed_command() -> None:
    # `bench loader -h` is the benchmark module's argparse help ("usage: cityseg-fast bench loader ...").
    for args in (["-h"], ["eval", "-h"], ["bench", "loader", "-h"]):
        done = run_cli(args, env={"COLUMNS": str(WIDTH)})
        assert done.returncode == 0 and "usage: cityseg-fast" in done.stdout.lower(), done.output


def test_the_command_exits_with_an_idle_thread_pool_left_open() -> None:
    """An idle ThreadPoolExecutor left open (inductor's compile pool is one) must not keep the command from
    exiting: the exit runs threading's shutdown hooks, which wake its workers, before joining threads."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import concurrent.futures, sys
        pool = concurrent.futures.ThreadPoolExecutor(2)
        pool.submit(lambda: 1).result()
        sys.argv = ["cityseg-fast", "--help"]
        from cityseg.cli import main
        main()
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
