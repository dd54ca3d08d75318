"""predict, eval and the validation loaders give the same class ids for the same photo at sizes other
than the training size (larger, smaller, odd): the photo is shrunk the same way (antialiased bilinear),
the logits brought back to the mask's size the same way (bilinear, then argmax).

The check is exact and needs no reference of its own: predict's ids, drawn in the palette's colours,
become the mask of a lossless pair; eval and every validation loader must then score that pair at
pixel accuracy 1.0 at its native size, which holds only if their ids equal predict's at every pixel.

    pytest tests/test_sizes_agree.py
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cityseg.checkpoint import save_checkpoint
from cityseg.config import Config, DataConfig, ModelConfig
from cityseg.data.loaders import build_loader, split_files
from cityseg.inference.evaluate import evaluate_checkpoint
from cityseg.inference.predict import Predictor
from cityseg.metrics import evaluate_model
from cityseg.model import build_model
from cityseg.palette import cityscapes_palette, colorize
from tests.conftest import block_mask, write_pair

TRAIN_SIZE = 32
SIZES = [48, 20, 37]  # larger, smaller, odd: never the training size


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model of the training size whose ids vary over a photo (an untrained one, seeded)."""
    cfg = Config(data=DataConfig(image_size=TRAIN_SIZE), model=ModelConfig(width=8, depth=2))
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("ckpt") / "m.pt"
    save_checkpoint({"model": build_model(cfg.model).state_dict(), "config": cfg.to_dict(),
                     "palette": cityscapes_palette().to_state()}, path)
    return path


def photo_of(size: int) -> np.ndarray:
    rng = np.random.default_rng(size)
    return np.clip(block_mask(rng, size, blocks=5) * 0.8 + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module", params=SIZES)
def pair(request: pytest.FixtureRequest, ckpt: Path,
         tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """(dataset folder, predict's ids) for a pair at one size whose mask is predict's ids."""
    size = request.param
    photo = photo_of(size)
    ids = Predictor(ckpt, device="cpu").predict_batch([photo])[0]
    assert ids.shape == (size, size)
    counts = np.sort(np.unique(ids, return_counts=True)[1])
    assert len(counts) >= 3 and counts[-2] >= size, counts  # class boundaries to get wrong
    mask = colorize(torch.from_numpy(ids.astype(np.int64)), cityscapes_palette()).numpy()
    root = tmp_path_factory.mktemp(f"pair{size}")
    write_pair(root / "val" / "1.png", photo, mask, fmt="PNG")
    write_pair(root / "train" / "1.png", photo, mask, fmt="PNG")
    return root, ids


def test_eval_gives_predicts_ids(ckpt: Path, pair: tuple[Path, np.ndarray]) -> None:
    root, ids = pair
    result = evaluate_checkpoint(ckpt, root, device="cpu", workers=0, batch_size=1, native=True)
    assert result["scored_at_px"] == ids.shape[0]
    assert result["pixel_acc"] == 1.0


@pytest.mark.parametrize("kind", ["torch", "dali", "cache"])
def test_validation_loaders_give_predicts_ids(kind: str, ckpt: Path, pair: tuple[Path, np.ndarray]) -> None:
    """What training's validation runs (`build_loader(train=False)` + `evaluate_model`) for each loader."""
    root, ids = pair
    predictor = Predictor(ckpt, device="cpu")
    cfg = replace(predictor.cfg.data, data_dir=str(root), workers=0, batch_size=1, val_native=True)
    files, _ = split_files(root, "val", validate=True, palette=predictor.palette)
    with build_loader(kind, files, predictor.palette, cfg, train=False, device=torch.device("cpu"),
                      dtype=torch.float32, seed=0) as loader:
        assert loader.spec.label_hw == ids.shape
        metrics, _ = evaluate_model(predictor.model, loader, predictor.runtime, predictor.palette.num_classes)
    # DALI resizes photos with its own antialiased filter (within a level or two of Pillow's/torchvision's):
    # a pixel on a near-tie between two classes may flip.
    least = 1.0 if kind != "dali" else 0.99
    assert metrics.pixel_acc >= least, metrics.pixel_acc
