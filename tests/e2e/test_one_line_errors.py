"""Every failure is one line (issue 24, cases 7, 9, 12): bad --palette values, checkpoints whose contents
are out of range, and paths over the OS limits end in exactly one `error:` line naming the option or
file, exit 2, no traceback, and leave nothing behind (no run folder, no changed file)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from cityseg.checkpoint import save_checkpoint
from cityseg.config import Config, DataConfig, ModelConfig
from cityseg.model import build_model
from cityseg.palette import cityscapes_palette
from tests.cli_process import assert_one_line, run_cli
from tests.conftest import TINY

LONG = "x" * 300  # one component over NAME_MAX (255)
DEEP = "/".join(["y" * 200] * 25)  # over PATH_MAX (4096)


def digests(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}




@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {"CITYSEG_CACHE": str(tmp_path_factory.mktemp("cache"))}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Path:
    folder = tmp_path_factory.mktemp("oneline") / "syn"
    done = run_cli(["synth", "--out", folder, "--train", "4", "--val", "2", "--size", "32"], env=env)
    assert done.returncode == 0, done.output
    return folder


def checkpoint(path: Path, model: dict | None = None, data: dict | None = None, palette: dict | None = None,
               weights=None) -> Path:
    """A checkpoint as training writes it (width 4, depth 2, 32 px), with parts replaced."""
    cfg = Config(data=DataConfig(image_size=32), model=ModelConfig(width=4, depth=2))
    torch.manual_seed(0)
    state = {"model": build_model(cfg.model).state_dict(), "config": cfg.to_dict(),
             "palette": cityscapes_palette().to_state()}
    state["config"]["model"].update(model or {})
    state["config"]["data"].update(data or {})
    state["palette"].update(palette or {})
    if weights is not None:
        state["model"] = {k: v.clone() for k, v in state["model"].items()}
        first = next(k for k, v in state["model"].items() if v.is_floating_point())
        state["model"][first].view(-1)[0] = weights
    save_checkpoint(state, path)
    return path


# -- 7. --palette ---------------------------------------------------------------------------------

def palette_file(tmp_path: Path, content) -> str:
    path = tmp_path / "p.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def good_palette(**changes) -> dict:
    p = cityscapes_palette()
    return {"centers": p.centers.tolist(), "classes": p.classes.tolist(), "names": list(p.names),
            "colors": p.colors.tolist(), "max_dist": None, **changes}


PALETTES = {
    "bogus": (lambda t: "bogus", "--palette bogus"),
    "kmeans-0": (lambda t: "kmeans:0", "--palette kmeans:0"),
    "kmeans-99": (lambda t: "kmeans:99", "--palette kmeans:99"),
    "missing": (lambda t: str(t / "missing.json"), "not found"),
    "malformed": (lambda t: palette_file(t, "{not json"), "not valid JSON"),
    "list": (lambda t: palette_file(t, [1, 2]), "got a list"),
    "300-classes": (lambda t: palette_file(t, good_palette(names=[f"c{i}" for i in range(300)],
                                                           colors=[[0, 0, 0]] * 300)), "at most 64"),
    "string-max-dist": (lambda t: palette_file(t, good_palette(max_dist="x")), "max_dist"),
    "nan-centre": (lambda t: palette_file(t, good_palette(centers=[[float("nan"), 0, 0]] * 34)), "centers"),
}


@pytest.mark.parametrize("case", PALETTES)
def test_a_bad_palette_is_one_line_before_any_run_folder(case: str, data: Path, tmp_path: Path,
                                                         env: dict[str, str]) -> None:
    make, fragment = PALETTES[case]
    out = tmp_path / "run"
    done = run_cli(["train", "--data", data, "--out", out, "--epochs", "1", "--palette", make(tmp_path), *TINY],
                   env=env)
    assert_one_line(done, fragment)
    assert not out.exists()


# -- 9. checkpoint contents -----------------------------------------------------------------------

CHECKPOINTS = {
    "width-100000": ({"model": {"width": 100_000}}, "width"),
    "width-negative": ({"model": {"width": -8}}, "width"),
    "depth-30": ({"model": {"depth": 30}}, "depth"),
    "upsample-cubic": ({"model": {"upsample": "cubic"}}, "model.upsample"),
    "image-size-0": ({"data": {"image_size": 0}}, "image-size"),
    "image-size-50": ({"data": {"image_size": 50}}, "image-size 50"),
    "100-classes": ({"model": {"num_classes": 100}}, "num_classes"),
    "palette-max-dist": ({"palette": {"max_dist": "x"}}, "max_dist"),
    "nan-centres": ({"palette": {"centers": torch.full((34, 3), float("nan"))}}, "centers"),
    "nan-weights": ({"weights": float("nan")}, "NaN or infinite"),
    "inf-weights": ({"weights": float("inf")}, "NaN or infinite"),
}


@pytest.mark.parametrize("case", CHECKPOINTS)
def test_a_checkpoint_out_of_range_is_one_line(case: str, data: Path, tmp_path: Path, env: dict[str, str]) -> None:
    parts, fragment = CHECKPOINTS[case]
    ckpt = checkpoint(tmp_path / "bad.pt", **parts)
    done = run_cli(["eval", "--ckpt", ckpt, "--data", data, "--device", "cpu"], env=env)
    assert_one_line(done, str(ckpt), fragment)


@pytest.mark.parametrize("case", ["width-100000", "nan-weights"])
def test_export_refuses_them_too(case: str, tmp_path: Path, env: dict[str, str]) -> None:
    parts, fragment = CHECKPOINTS[case]
    ckpt = checkpoint(tmp_path / "bad.pt", **parts)
    done = run_cli(["export", "--ckpt", ckpt, "--format", "torchscript", "--out", tmp_path / "m.pt"], env=env)
    assert_one_line(done, str(ckpt), fragment)
    assert not (tmp_path / "m.pt").exists()


def test_export_checks_memory_before_allocating(tmp_path: Path, env: dict[str, str]) -> None:
    ckpt = checkpoint(tmp_path / "wide.pt")
    state = torch.load(ckpt, weights_only=True)
    cfg = Config(data=DataConfig(image_size=32), model=ModelConfig(width=256, depth=2))
    state["model"], state["config"] = build_model(cfg.model).state_dict(), cfg.to_dict()
    save_checkpoint(state, ckpt)  # 2 x (3 + 5 x 256 + 19) x 8192**2 x 4 bytes: over 600 GiB
    done = run_cli(["export", "--ckpt", ckpt, "--format", "torchscript", "--out", tmp_path / "m.pt",
                    "--image-size", "8192"], env=env)
    assert_one_line(done, "--image-size 8192", "GiB")
    assert not (tmp_path / "m.pt").exists()


# -- 12. paths over the OS limits -----------------------------------------------------------------

def path_cases(tmp: Path, data: Path, ckpt: Path) -> dict[str, list]:
    return {
        "train --data": ["train", "--data", tmp / LONG, "--epochs", "1", *TINY, "--out", tmp / "r1"],
        "train --out": ["train", "--data", data, "--out", tmp / DEEP, "--epochs", "1", *TINY],
        "train --resume": ["train", "--resume", tmp / LONG],
        "train --init-from": ["train", "--data", data, "--init-from", tmp / LONG, *TINY, "--out", tmp / "r2"],
        "train --palette": ["train", "--data", data, "--palette", f"{tmp / LONG}.json", *TINY, "--out", tmp / "r3"],
        "train --config": ["train", "--config", f"{tmp / LONG}.toml"],
        "eval --ckpt": ["eval", "--ckpt", tmp / LONG, "--data", data],
        "eval --json": ["eval", "--ckpt", ckpt, "--data", data, "--json", tmp / LONG, "--device", "cpu"],
        "synth --out": ["synth", "--out", tmp / DEEP, "--size", "32"],
        "export --out": ["export", "--ckpt", ckpt, "--format", "torchscript", "--out", tmp / LONG],
        "check-data": ["check-data", tmp / LONG],
        "predict --out": ["predict", "--ckpt", ckpt, data / "val" / "1.jpg", "--out", tmp / LONG],
    }


@pytest.mark.parametrize("case", list(path_cases(Path("t"), Path("d"), Path("c"))))
def test_a_path_too_long_is_one_line(case: str, data: Path, tmp_path: Path, env: dict[str, str]) -> None:
    ckpt = checkpoint(tmp_path / "m.pt")
    before = digests(data)
    done = run_cli(path_cases(tmp_path, data, ckpt)[case], env=env)
    assert done.returncode == 2 and "Traceback" not in done.output, done.output
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and ("too long" in errors[0] or "not found" in errors[0]), done.stderr
    assert len(errors[0]) < 1100
    assert digests(data) == before
