"""`predict --overwrite` replaces earlier predictions, never an input nor a file predict did not write
(issue 35, item 6): checksums of every user file before and after, through the installed command."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cityseg.config import NO_AUGMENT, Config, DataConfig, ModelConfig, TrainConfig
from cityseg.training import train
from tests.cli_process import assert_one_line, run_cli
from tests.conftest import make_pair_dataset


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ow")
    data = make_pair_dataset(root / "data", n_train=4, n_val=2)
    train(Config(data=DataConfig(data_dir=str(data), image_size=32, batch_size=2, workers=0, augment=NO_AUGMENT),
                 model=ModelConfig(width=8, depth=2),
                 train=TrainConfig(epochs=1, device="cpu", precision="32", compile=False, out=str(root / "run"))))
    return root / "run" / "checkpoints" / "best.pt"


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_overwrite_never_replaces_a_file_predict_did_not_write(ckpt: Path, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(photos / "street.jpg")
    # A photo of the user's, named like an output of street.jpg: skipped as an input for its name.
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(photos / "street_color.png")
    mine = digests(photos)
    args = ["predict", "--ckpt", ckpt, photos, "--out", photos, "--device", "cpu", "--overwrite"]
    assert_one_line(run_cli(args, timeout=120), str(photos / "street_color.png"), "not written by an earlier predict")
    assert digests(photos) == mine  # before the fix: street_color.png replaced by a prediction

    out = tmp_path / "preds"
    first = run_cli(["predict", "--ckpt", ckpt, photos / "street.jpg", "--out", out, "--device", "cpu"], timeout=120)
    assert first.returncode == 0, first.output
    again = run_cli(["predict", "--ckpt", ckpt, photos / "street.jpg", "--out", out, "--device", "cpu",
                     "--overwrite"], timeout=120)
    assert again.returncode == 0, again.output  # its own earlier outputs: replaced as asked
    assert digests(photos) == mine
