"""Nothing of the user's is ever overwritten (issue 24, cases 1-5): every command creates its outputs
exclusively unless `--overwrite`, refuses an output inside an input (the checkpoint it reads, a dataset
split, the --pairs folder) by name, and resolves relative paths and symlinks before deciding. Each case
runs the installed command and compares the digest of every file that existed before with after."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.cli_process import assert_one_line, run_cli
from tests.conftest import ROOT, TINY


def digests(*folders: Path) -> dict[str, str]:
    """sha256 of every file under `folders` (symlinks followed), by path."""
    out = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out




@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {"CITYSEG_CACHE": str(tmp_path_factory.mktemp("cache"))}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Path:
    folder = tmp_path_factory.mktemp("policy") / "syn"
    done = run_cli(["synth", "--out", folder, "--train", "8", "--val", "4", "--size", "64"], env=env)
    assert done.returncode == 0, done.output
    return folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, data: Path, env: dict[str, str]) -> Path:
    run = tmp_path_factory.mktemp("policy") / "run1"
    done = run_cli(["train", "--data", data, "--out", run, "--epochs", "1", *TINY], env=env, timeout=600)
    assert done.returncode == 0, done.output
    return run / "checkpoints" / "best.pt"


# -- 1. eval --json -------------------------------------------------------------------------------

def test_eval_json_never_replaces_the_checkpoint(ckpt: Path, data: Path, env: dict[str, str]) -> None:
    before = digests(ckpt.parent, data)
    for extra in ([], ["--overwrite"]):  # an input is refused even with --overwrite
        done = run_cli(["eval", "--ckpt", ckpt, "--data", data, "--json", ckpt, "--device", "cpu", *extra], env=env)
        assert_one_line(done, str(ckpt), "checkpoint being read")
    assert digests(ckpt.parent, data) == before


def test_eval_json_refuses_a_dataset_split(ckpt: Path, data: Path, env: dict[str, str]) -> None:
    before = digests(data)
    done = run_cli(["eval", "--ckpt", ckpt, "--data", data, "--json", data / "val" / "m.json", "--device", "cpu"],
                   env=env)
    assert_one_line(done, "m.json", "dataset")
    assert digests(data) == before


def test_eval_json_is_created_once_then_replaced_only_with_overwrite(ckpt: Path, data: Path, tmp_path: Path,
                                                                      env: dict[str, str]) -> None:
    args = ["eval", "--ckpt", ckpt, "--data", data, "--json", "m.json", "--device", "cpu"]
    (tmp_path / "m.confusion.png").write_bytes(b"the user's picture")  # the heat map's name: also refused
    before = digests(tmp_path)
    assert_one_line(run_cli(args, cwd=tmp_path, env=env), "m.confusion.png", "--overwrite")
    assert digests(tmp_path) == before and not (tmp_path / "m.json").exists()
    (tmp_path / "m.confusion.png").unlink()
    assert run_cli(args, cwd=tmp_path, env=env).returncode == 0  # relative to the user's folder
    first = digests(tmp_path)
    assert_one_line(run_cli(args, cwd=tmp_path, env=env), "m.json", "already exists")
    assert digests(tmp_path) == first
    done = run_cli([*args, "--overwrite"], cwd=tmp_path, env=env)
    assert done.returncode == 0, done.output


# -- 2. export --out ------------------------------------------------------------------------------

def test_export_never_replaces_its_checkpoint_nor_an_existing_file(ckpt: Path, tmp_path: Path,
                                                                   env: dict[str, str]) -> None:
    before = digests(ckpt.parent)
    for extra in ([], ["--overwrite"]):
        done = run_cli(["export", "--ckpt", ckpt, "--format", "torchscript", "--out", ckpt, "--no-check", *extra],
                       env=env)
        assert_one_line(done, str(ckpt), "checkpoint being read")
    assert digests(ckpt.parent) == before
    mine = tmp_path / "unet.pt"
    mine.write_bytes(b"the user's model")
    args = ["export", "--ckpt", ckpt, "--format", "torchscript", "--out", mine, "--no-check"]
    assert_one_line(run_cli(args, env=env), str(mine), "already exists")
    assert mine.read_bytes() == b"the user's model"
    assert run_cli([*args, "--overwrite"], env=env).returncode == 0
    assert mine.read_bytes() != b"the user's model"


# -- 3. predict --out -----------------------------------------------------------------------------

def test_predict_out_inside_the_pairs_folder_is_refused(ckpt: Path, data: Path, env: dict[str, str]) -> None:
    (data / "val" / "confusion.png").write_bytes(b"the user's")
    try:
        before = digests(data)
        for extra in ([], ["--overwrite"]):
            done = run_cli(["predict", "--ckpt", ckpt, data / "val", "--pairs", "--out", data / "val", "--device",
                            "cpu", *extra], env=env)
            assert_one_line(done, "--pairs input folder")
        assert digests(data) == before
    finally:
        (data / "val" / "confusion.png").unlink()


def test_predict_out_inside_a_dataset_split_is_refused(ckpt: Path, data: Path, env: dict[str, str]) -> None:
    before = digests(data)
    done = run_cli(["predict", "--ckpt", ckpt, data / "val" / "1.jpg", "--out", data / "train" / "preds",
                    "--device", "cpu"], env=env)
    assert_one_line(done, "dataset split")
    assert digests(data) == before


def test_a_second_predict_replaces_nothing_without_overwrite(ckpt: Path, data: Path, tmp_path: Path,
                                                             env: dict[str, str]) -> None:
    out = tmp_path / "preds"
    args = ["predict", "--ckpt", ckpt, data / "val", "--pairs", "--out", out, "--device", "cpu"]
    assert run_cli(args, env=env).returncode == 0
    (out / "metrics.json").write_text("the user's notes")
    first = digests(out)
    assert_one_line(run_cli(args, env=env), "already exists", "--overwrite")
    assert digests(out) == first
    assert run_cli([*args, "--overwrite"], env=env).returncode == 0
    assert (out / "metrics.json").read_text() != "the user's notes"


# -- 4. synth through a symlinked split -----------------------------------------------------------

def test_synth_never_writes_through_a_symlinked_split(data: Path, tmp_path: Path, env: dict[str, str]) -> None:
    own = tmp_path / "own"
    assert run_cli(["synth", "--out", own, "--train", "2", "--val", "1", "--size", "32"], env=env).returncode == 0
    for f in (own / "train").iterdir():
        f.unlink()
    (own / "train").rmdir()
    os.symlink(data / "train", own / "train")  # the marker vouches for own/, not for what train/ points to
    before = digests(data)
    done = run_cli(["synth", "--out", own, "--train", "2", "--val", "1", "--size", "32"], env=env)
    assert_one_line(done, "train", "link")
    assert digests(data) == before


# -- 5. bench kernel, profile, a user's error.log -------------------------------------------------

def test_bench_kernel_json_is_relative_to_the_users_folder(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("the user's readme")
    checkout = digests(ROOT / "benchmarks" / "results") | {"README.md": hashlib.sha256(
        (ROOT / "README.md").read_bytes()).hexdigest()}
    done = run_cli(["bench", "kernel", "--json", "README.md"], cwd=tmp_path)
    assert_one_line(done, str(tmp_path / "README.md"), "already exists")
    (tmp_path / "mask_kernel-cpu.json").write_text("the user's figures")
    done = run_cli(["bench", "kernel", "--cpu"], cwd=tmp_path)  # no --json, outside the checkout: here
    assert_one_line(done, str(tmp_path / "mask_kernel-cpu.json"), "already exists")
    assert (tmp_path / "README.md").read_text() == "the user's readme"
    assert digests(ROOT / "benchmarks" / "results") | {"README.md": hashlib.sha256(
        (ROOT / "README.md").read_bytes()).hexdigest()} == checkout


def test_profile_never_replaces_a_users_trace(data: Path, tmp_path: Path, env: dict[str, str]) -> None:
    (tmp_path / "trace.json").write_text("the user's trace")
    before = digests(tmp_path)
    done = run_cli(["profile", "--out", tmp_path, "--steps", "1", "--data", data, *TINY], env=env)
    assert_one_line(done, "trace.json", "already exists")
    assert digests(tmp_path) == before


def test_a_users_error_log_is_not_a_failed_runs_leftover(data: Path, tmp_path: Path, env: dict[str, str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "error.log").write_text("the user's log\n")
    done = run_cli(["train", "--data", data, "--out", out, "--epochs", "1", *TINY], env=env)
    assert_one_line(done, str(out), "already holds files")
    assert (out / "error.log").read_text() == "the user's log\n"
