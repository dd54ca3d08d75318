"""An adversarial user, through the installed command: every bad path, checkpoint, option or number
ends in one line naming it (exit 2, no traceback), and nothing of the user's is lost — the files
they had are byte-identical afterwards."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from cityseg.checkpoint import load_checkpoint
from tests.cli_process import CliProcess, assert_one_line, run_cli, run_in_process
from tests.conftest import TINY, make_pair_dataset, write_pair


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}




@pytest.fixture(scope="module")
def data(pair_data: Path) -> Path:
    return pair_data  # tests/e2e/conftest.py: one set and one trained run for the session


@pytest.fixture(scope="module")
def run(trained_run: Path) -> Path:
    return trained_run


# -- 1. synth never writes into a folder it did not create ----------------------------------------

@pytest.mark.parametrize("extra", [[], ["--train", "1", "--val", "1"]])
def test_synth_refuses_a_real_dataset(data: Path, extra: list[str]) -> None:
    before = snapshot(data)
    done = run_cli(["synth", "--out", data, *extra])
    assert_one_line(done, str(data), "not empty and not a set written by")
    assert snapshot(data) == before


@pytest.mark.parametrize("args,fragment", [(["--train", "-3"], "--train -3"), (["--val", "0"], "--val 0"),
                                           (["--size", "7"], "--size 7"), (["--workers", "0"], "--workers 0"),
                                           (["--seed", str(2**70)], "--seed")])
def test_synth_checks_its_numbers(tmp_path: Path, args: list[str], fragment: str) -> None:
    assert_one_line(run_cli(["synth", "--out", tmp_path / "s", *args]), fragment)
    assert not (tmp_path / "s").exists()


def test_synth_rewrites_its_own_set_and_refuses_a_file(tmp_path: Path) -> None:
    out = tmp_path / "s"
    for n in (3, 2):  # the second run shrinks its own set: the third pair goes
        done = run_cli(["synth", "--out", out, "--train", str(n), "--val", "1", "--size", "32"])
        assert done.returncode == 0, done.output
    assert sorted(p.name for p in (out / "train").iterdir()) == ["1.jpg", "2.jpg"]
    (tmp_path / "f").write_text("mine")
    assert_one_line(run_cli(["synth", "--out", tmp_path / "f", "--size", "32"]), "is a file")
    assert (tmp_path / "f").read_text() == "mine"


# -- 2, 3. run folders belong to one run -----------------------------------------------------------

def test_a_run_folder_with_other_files_is_refused(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    before = snapshot(out)
    assert_one_line(run_cli(["train", "--data", data, "--out", out, *TINY]), str(out), "already holds files")
    assert snapshot(out) == before


@pytest.mark.timeout(600)
def test_two_runs_cannot_share_a_folder(tmp_path: Path) -> None:
    long_data = make_pair_dataset(tmp_path / "data", n_train=200, n_val=4)
    out = tmp_path / "run"
    first = CliProcess(["train", "--data", long_data, "--out", out, "--epochs", "2", "--log-every", "5", *TINY])
    first.wait_for_output("step 5/")
    # The first run (and its loader workers) is held stopped while the others try: it cannot finish
    # (and free the folder) before they ask, however slow their start-up on a loaded machine.
    os.killpg(first.proc.pid, signal.SIGSTOP)
    try:
        second = run_cli(["train", "--data", long_data, "--out", out, "--epochs", "1", *TINY])
        resume = run_cli(["train", "--resume", out])
    finally:
        os.killpg(first.proc.pid, signal.SIGCONT)
    assert_one_line(second, str(out))
    assert "in use by another cityseg-fast run" in second.stderr or "already holds files" in second.stderr
    assert_one_line(resume, str(out), "in use by another cityseg-fast run")
    done = first.finish(timeout=300)
    assert done.returncode == 0, done.output
    assert [json.loads(ln)["epoch"] for ln in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not (out / "error.log").exists()


def test_profile_never_deletes_an_earlier_profile(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "prof"
    done = run_cli(["profile", "--steps", "1", "--out", out, "--data", data, *TINY])
    assert done.returncode == 0, done.output
    before = snapshot(out / "run")
    assert_one_line(run_cli(["profile", "--steps", "1", "--out", out, "--data", data, *TINY]), str(out / "run"))
    assert snapshot(out / "run") == before


# -- 4. --resume applies only what it can ---------------------------------------------------------

def test_resume_refuses_options_that_would_change_the_run(run: Path) -> None:
    before = snapshot(run)
    done = run_cli(["train", "--resume", run, "--lr", "0.1", "--width", "8"])
    assert_one_line(done, "--lr", "--width", "would change the run")
    assert snapshot(run) == before


# -- 5. a relative --data is stored absolute ------------------------------------------------------

def test_relative_data_is_stored_absolute(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = run_cli(["train", "--data", "data", "--out", out, "--epochs", "1", *TINY], cwd=data.parent)
    assert done.returncode == 0, done.output
    assert json.loads((out / "config.json").read_text())["data"]["data_dir"] == str(data)
    elsewhere = run_cli(["eval", "--ckpt", out / "checkpoints" / "best.pt", "--device", "cpu"], cwd=tmp_path)
    assert elsewhere.returncode == 0, elsewhere.output


# -- 6. damaged or foreign checkpoints ------------------------------------------------------------

def damaged(run: Path, tmp_path: Path, case: str) -> Path:
    path = tmp_path / f"{case}.pt"
    if case == "zero bytes":
        path.write_bytes(b"")
        return path
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    if case == "other width":
        state["config"]["model"]["width"] = 8
    elif case == "no palette":
        del state["palette"]
    elif case == "no head weights":
        del state["model"]["head.weight"]
    elif case == "config of the wrong type":
        state["config"]["model"]["width"] = "wide"
    elif case == "config not sections":
        state["config"] = [1, 2]
    elif case == "no optimizer":
        del state["optimizer"]
    torch.save(state, path)
    return path


CKPT_CASES = {"zero bytes": "empty file", "other width": "do not fit the model",
              "no palette": "no palette", "no head weights": "do not fit the model",
              "config of the wrong type": "model.width", "config not sections": "damaged checkpoint"}


@pytest.mark.parametrize("case", sorted(CKPT_CASES))
@pytest.mark.parametrize("command", ["eval", "predict", "export"])
def test_damaged_checkpoint_is_one_line(run: Path, data: Path, tmp_path: Path, case: str, command: str) -> None:
    ckpt = damaged(run, tmp_path, case)
    args = {"eval": ["eval", "--ckpt", ckpt, "--data", data, "--device", "cpu"],
            "predict": ["predict", "--ckpt", ckpt, data / "val", "--out", tmp_path / "p", "--device", "cpu"],
            "export": ["export", "--ckpt", ckpt, "--format", "torchscript", "--out", tmp_path / "u.pt"]}[command]
    # Each command meets a damaged checkpoint once as a process (exit status, no process left); the
    # other cases go through the same app in this process, seconds cheaper each.
    invoke = run_cli if case == "zero bytes" else run_in_process
    assert_one_line(invoke(args), str(ckpt), CKPT_CASES[case])


@pytest.mark.parametrize("case", ["zero bytes", "no optimizer", "config of the wrong type"])
def test_damaged_last_pt_on_resume(run: Path, tmp_path: Path, case: str) -> None:
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    damaged(run, tmp_path, case).rename(folder / "checkpoints" / "last.pt")
    before = snapshot(folder)
    assert_one_line(run_cli(["train", "--resume", folder]), str(folder / "checkpoints" / "last.pt"))
    assert {k: v for k, v in snapshot(folder).items() if k != "error.log"} == before


# -- 7, 12. impossible sizes and numbers ----------------------------------------------------------

@pytest.mark.parametrize("args,fragment", [
    (["--depth", "12"], "--depth 12"),
    (["--image-size", "100000"], "--image-size 100000"),
    (["--image-size", "0"], "--image-size 0"),
    (["--image-size", "-5"], "--image-size -5"),
    (["--image-size", "102"], "multiple of"),
    (["--log-every", "0"], "--log-every 0"),
    (["--rotate", "nan"], "--rotate nan"),
    (["--grad-clip", "nan"], "--grad-clip nan"),
    (["--max-color-dist", "nan"], "--max-color-dist nan"),
    (["--hflip", "1.5"], "--hflip 1.5"),
    (["--jitter", "-1"], "--jitter -1"),
    (["--hue", "0.7"], "--hue 0.7"),
    (["--lr", "0"], "--lr 0"),
    (["--epochs", "0"], "--epochs 0"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--seed", str(2**70)], "--seed"),
    (["--scale", "2,1"], "--scale 2,1"),
    (["--scale", "nan,1"], "--scale nan,1"),
    (["--device", "tpu"], "--device tpu"),
    (["--loader", "foo"], "'--loader'"),
    (["--epochs", "many"], "'--epochs'"),
])
def test_train_numbers_are_checked_first(data: Path, tmp_path: Path, args: list[str], fragment: str) -> None:
    t0 = time.monotonic()
    done = run_cli(["train", "--data", data, "--out", tmp_path / "run", *TINY, *args], timeout=60)
    assert_one_line(done, fragment)
    assert not (tmp_path / "run").exists()  # refused before anything was created
    assert time.monotonic() - t0 < 60


def test_memory_need_is_checked_before_allocating(data: Path, tmp_path: Path) -> None:
    done = run_cli(["train", "--data", data, "--out", tmp_path / "run", "--device", "cpu", "--no-compile",
                    "--image-size", "8192", "--batch-size", "4096", "--width", "512", "--depth", "2"], timeout=120)
    assert_one_line(done, "needs at least", "GiB", "lower --batch-size")


@pytest.mark.parametrize("args,fragment", [
    (["eval", "--batch-size", "0"], "--batch-size 0"), (["predict", "--threads", "0"], "--threads 0"),
    (["predict", "--workers", "0"], "--threads 0"),  # the older name of --threads, for one release
    (["export", "--format", "onnx", "--image-size", "-1"], "--image-size -1"),
    (["check-data", "--threads", "-2"], "--threads -2"), (["profile", "--steps", "0"], "--steps 0"),
    (["check-data", "--far-dist", "0"], "--far-dist 0"),
])
def test_other_commands_check_their_numbers(run: Path, data: Path, tmp_path: Path, args: list[str],
                                            fragment: str) -> None:
    command, *rest = args
    where = {"eval": ["--ckpt", run / "checkpoints" / "best.pt"],
             "predict": ["--ckpt", run / "checkpoints" / "best.pt", data / "val", "--out", tmp_path / "p"],
             "export": ["--ckpt", run / "checkpoints" / "best.pt", "--out", tmp_path / "u.onnx"],
             "check-data": [data], "profile": ["--out", tmp_path / "prof"]}[command]
    assert_one_line(run_cli([command, *where, *rest], timeout=60), fragment)


# -- 8. names that look like Rich markup ----------------------------------------------------------

@pytest.mark.parametrize("name", ["[red]x[/red]", "a[/v]b", "[bold]"])
def test_markup_in_names_is_printed_as_given(tmp_path: Path, name: str) -> None:
    folder = tmp_path / name
    done = run_cli(["check-data", folder])
    assert_one_line(done, str(folder), "dataset folder not found", code=1)
    done = run_cli(["train", "--data", folder, "--out", tmp_path / "run", *TINY])
    assert_one_line(done, str(folder), "not found")


# -- 9. output paths that cannot be written -------------------------------------------------------

def test_outputs_under_a_file(run: Path, data: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    best = run / "checkpoints" / "best.pt"
    assert_one_line(run_cli(["train", "--data", data, "--out", blocker, *TINY]), str(blocker))
    assert_one_line(run_cli(["train", "--data", data, "--out", blocker / "run", *TINY]), "a file is in the way")
    assert_one_line(run_cli(["predict", "--ckpt", best, data / "val", "--out", blocker, "--device", "cpu"]),
                    str(blocker), "a file is in the way")
    assert_one_line(run_cli(["export", "--ckpt", best, "--format", "torchscript", "--out", blocker / "u.pt"]),
                    "a file is in the way")
    assert_one_line(run_cli(["eval", "--ckpt", best, "--device", "cpu", "--json", blocker / "m.json"]),
                    "a file is in the way")
    assert_one_line(run_cli(["eval", "--ckpt", best, "--device", "cpu", "--json", tmp_path]), "is a folder")
    assert blocker.read_text() == "mine"


def test_cache_folder_that_is_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("mine")
    done = run_cli(["train", "--smoke", "--device", "cpu", "--no-compile", "--out", tmp_path / "run"],
                   env={"CITYSEG_CACHE": str(blocker)})
    assert_one_line(done, str(blocker), "CITYSEG_CACHE")
    assert blocker.read_text() == "mine"


# -- 10. unicode digits in names ------------------------------------------------------------------

def test_unicode_digit_names(tmp_path: Path) -> None:
    folder = make_pair_dataset(tmp_path / "data", n_train=4, n_val=2)
    rng = torch.Generator().manual_seed(0)
    mask = (torch.randint(0, 2, (32, 32, 1), generator=rng) * torch.tensor([128, 64, 128])).to(torch.uint8).numpy()
    write_pair(folder / "train" / "².jpg", mask, mask)
    done = run_cli(["check-data", folder])
    assert done.returncode == 0 and "Traceback" not in done.output, done.output
    done = run_cli(["train", "--data", folder, "--out", tmp_path / "run", "--epochs", "1", *TINY])
    assert done.returncode == 0, done.output


# -- 11. predict never overwrites its own outputs or inputs ---------------------------------------

def test_predict_output_names_never_collide(run: Path, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    (photos / "a").mkdir(parents=True)
    image = (torch.arange(32 * 32 * 3) % 251).to(torch.uint8).reshape(32, 32, 3).numpy()
    from PIL import Image

    Image.fromarray(image).save(photos / "a" / "1.png")
    Image.fromarray(image).save(photos / "1.png")
    Image.fromarray(image).save(photos / "1-2.png")
    best = run / "checkpoints" / "best.pt"
    out = photos  # outputs beside the inputs
    done = run_cli(["predict", "--ckpt", best, photos / "a", photos, "--out", out, "--device", "cpu"])
    assert done.returncode == 0, done.output
    assert len(list(out.glob("*_overlay.png"))) == 3
    again = run_cli(["predict", "--ckpt", best, photos, "--out", out, "--device", "cpu",  # outputs are no inputs
                     "--overwrite"])  # replacing the first run's outputs is asked for
    assert again.returncode == 0 and "2 images" in again.stdout, again.output


def test_predict_refuses_to_overwrite_an_input(run: Path, tmp_path: Path) -> None:
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    image = (torch.arange(32 * 32 * 3) % 251).to(torch.uint8).reshape(32, 32, 3).numpy()
    Image.fromarray(image).save(photos / "x.png")
    Image.fromarray(image).save(photos / "x_ids.png")  # a user's file named like an output of x.png
    before = snapshot(photos)
    done = run_cli(["predict", "--ckpt", run / "checkpoints" / "best.pt", photos / "x.png", photos / "x_ids.png",
                    "--out", photos, "--device", "cpu"])
    assert_one_line(done, "x_ids.png", "would be overwritten")
    assert snapshot(photos) == before


# -- 13. val that is train ------------------------------------------------------------------------

def test_val_linked_to_train_is_warned_about(tmp_path: Path) -> None:
    folder = make_pair_dataset(tmp_path / "data", n_train=4, n_val=2)
    for f in (folder / "val").iterdir():
        f.unlink()
    (folder / "val").rmdir()
    os.symlink(folder / "train", folder / "val")
    done = run_cli(["check-data", folder])
    assert "4 of the 4 val files are also train files" in done.stderr, done.output
    done = run_cli(["train", "--data", folder, "--out", tmp_path / "run", "--epochs", "1", *TINY])
    assert done.returncode == 0 and "are also train files" in done.stdout, done.output
