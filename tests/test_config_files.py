"""`train --config FILE` (issue 24, case 10): size, kind and suffix are checked before reading, the text
must be UTF-8, nesting is bounded, YAML is read safely with few aliases, and every problem is one short
line naming the file: through the installed command, which must exit 2 at once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.cli_process import run_cli, run_in_process

ALIAS_BOMB = "\n".join(
    ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcde", "bcdef", strict=True)]
)  # 6 levels, 45 aliases: 9**6 strings once expanded; nesting stays within the limit


def write(tmp_path: Path, name: str, content: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


CASES = {
    "not-utf8": ("c.toml", b"[train]\nlr = 0.1\n# \xff\xfe\n", "not UTF-8"),
    "deep-toml": ("c.toml", "x = " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
    "deep-json": ("c.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "data-dir-number": ("c.toml", "[data]\ndata_dir = 5\n", "data.data_dir = 5"),
    "alias-bomb": ("c.yaml", ALIAS_BOMB, "aliases"),
    "python-tag": ("c.yaml", "train: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    "too-big": ("c.toml", "# " + "x" * (1 << 21) + "\n", "bytes, more than"),
    "suffix": ("c.txt", "[train]\n", "expected a .toml"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_bad_config_file_is_one_line(case: str, tmp_path: Path) -> None:
    name, content, fragment = CASES[case]
    path = write(tmp_path, name, content)
    # One case as the installed command (exit 2 at once, nothing left running); the others through the
    # same app in this process (tests/cli_process.run_in_process), seconds cheaper each.
    args = ["train", "--config", path, "--print-config"]
    done = run_cli(args, timeout=60) if case == "too-big" else run_in_process(args)
    assert done.returncode == 2, done.output
    assert "Traceback" not in done.output, done.output
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0] and name in errors[0], done.stderr


def test_a_huge_value_gives_a_short_line(tmp_path: Path) -> None:
    path = write(tmp_path, "c.toml", '[train]\nlr = "' + "x" * 500_000 + '"\n')
    done = run_cli(["train", "--config", path, "--print-config"], timeout=60)
    assert done.returncode == 2 and "train.lr" in done.stderr, done.output
    assert len(done.stderr) < 2000, len(done.stderr)


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_what_is_not_a_regular_file_is_refused_before_reading(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    if kind == "fifo":
        os.mkfifo(path)  # reading would block forever
    elif kind == "device":
        os.symlink("/dev/zero", path)  # reading would never end
    else:
        path.mkdir()
    done = run_cli(["train", "--config", path, "--print-config"], timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.output, done.output
    assert "c.toml" in done.stderr and ("not a regular file" in done.stderr or "folder" in done.stderr), done.stderr


def test_a_good_yaml_file_with_an_alias_still_works(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", "train:\n  lr: &lr 0.002\n  weight_decay: *lr\n")
    done = run_cli(["train", "--config", path, "--print-config", "--device", "cpu"], timeout=60)
    assert done.returncode == 0, done.output
    assert "0.002" in done.stdout
