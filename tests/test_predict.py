"""predict / eval / export: photos of odd sizes, pairs scored like validation, flip TTA, export parity, CLI.

One tiny checkpoint is trained per module (32 px, width 4, a few seconds on 2 cores).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from cityseg.checkpoint import load_checkpoint, load_from_checkpoint
from cityseg.config import NO_AUGMENT, Config, DataConfig, ModelConfig, TrainConfig
from cityseg.data.loaders import build_loader
from cityseg.data.pairs import PairError, list_split, read_pair
from cityseg.inference.evaluate import evaluate_checkpoint
from cityseg.inference.export import ExportError, check_parity, export_model, load_export_model, read_metadata
from cityseg.inference.inputs import list_inputs, output_names, read_photo
from cityseg.inference.predict import Predictor, preprocess, run_predict
from cityseg.inference.tta import FlipTTA
from cityseg.metrics import evaluate_model as evaluate
from cityseg.palette import IGNORE_INDEX, cityscapes_palette, map_colors_reference
from cityseg.report import plot_confusion
from cityseg.runtime import resolve_runtime
from cityseg.training import train
from tests.conftest import make_pair_dataset

SIZE = 32  # training size = pair photo size, so --pairs scores exactly what validation scores


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data folder, last.pt) of a tiny model trained for one epoch of 4 steps."""
    root = tmp_path_factory.mktemp("predict")
    data = make_pair_dataset(root / "data", n_train=8, n_val=4, size=SIZE)
    cfg = Config(
        data=DataConfig(data_dir=str(data), image_size=SIZE, batch_size=2, workers=0, augment=NO_AUGMENT),
        model=ModelConfig(width=4, depth=2),
        train=TrainConfig(epochs=1, lr=2e-2, warmup_steps=1, device="cpu", precision="32", compile=False,
                          log_every=1, out=str(root / "run")),
    )
    train(cfg)
    return data, root / "run" / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def predictor(trained: tuple[Path, Path]) -> Predictor:
    return Predictor(trained[1], device="cpu", batch_size=16)


@pytest.fixture(scope="module")
def photos_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Odd sizes and the accepted modes: 37x53 JPEG, 100x64 PNG, grayscale PNG, RGBA PNG."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (53, 37, 3), dtype=np.uint8)).save(root / "a.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (64, 100, 3), dtype=np.uint8)).save(root / "b.png")
    Image.fromarray(rng.integers(0, 256, (30, 45), dtype=np.uint8)).save(root / "gray.png")
    Image.fromarray(rng.integers(0, 256, (20, 70, 4), dtype=np.uint8)).save(root / "rgba.png")
    return root


PHOTO_SIZES = {"a": (37, 53), "b": (100, 64), "gray": (45, 30), "rgba": (70, 20)}  # (W, H)


def palette_colors() -> set[tuple[int, int, int]]:
    return {tuple(c) for c in cityscapes_palette().colors.tolist()} | {(0, 0, 0)}


def test_predict_photos_of_odd_sizes(predictor: Predictor, photos_dir: Path, tmp_path: Path) -> None:
    result = run_predict(predictor, [photos_dir], tmp_path, workers=2)
    assert result["images"] == 4 and "metrics" not in result
    colors = palette_colors()
    for name, (w, h) in PHOTO_SIZES.items():
        ids = np.asarray(Image.open(tmp_path / f"{name}_ids.png"))
        color = Image.open(tmp_path / f"{name}_color.png")
        overlay = Image.open(tmp_path / f"{name}_overlay.png")
        assert Image.open(tmp_path / f"{name}_ids.png").mode == "L"
        assert ids.shape == (h, w) and color.size == (w, h)
        assert set(np.unique(ids).tolist()) <= set(range(19)) | {255}
        rgb = np.asarray(color.convert("RGB")).reshape(-1, 3)
        assert {tuple(c) for c in np.unique(rgb, axis=0).tolist()} <= colors
        np.testing.assert_array_equal(rgb, cityscapes_palette().colors.numpy()[ids.reshape(-1)])
        assert overlay.width == w and overlay.height > h  # legend strip below the blended photo
        photo = read_photo(photos_dir / f"{name}{'.jpg' if name == 'a' else '.png'}").astype(np.uint16)
        blend = (photo + np.asarray(color.convert("RGB")) + 1) // 2
        np.testing.assert_array_equal(np.asarray(overlay)[:h], blend.astype(np.uint8))


def test_pairs_metrics_equal_eval_and_training_validation(trained: tuple[Path, Path], predictor: Predictor,
                                                          tmp_path: Path) -> None:
    data, ckpt = trained
    result = run_predict(predictor, [data / "val"], tmp_path / "pred", pairs=True, workers=2)
    saved = json.loads((tmp_path / "pred" / "metrics.json").read_text())
    assert (tmp_path / "pred" / "confusion.png").is_file()
    evaluated = evaluate_checkpoint(ckpt, data, split="val", workers=0, json_out=tmp_path / "eval.json")
    for key in ("pixel_acc", "miou", "per_class_iou", "confusion"):
        assert saved[key] == evaluated[key] == result["metrics"][key], key
    # eval == training's own last validation of this checkpoint (history and metrics.jsonl)
    last = load_checkpoint(ckpt)["history"][-1]
    logged = json.loads((ckpt.parents[1] / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("pixel_acc", "miou", "per_class_iou"):
        assert evaluated[key] == last[key] == logged[key], key
    for i in range(1, 5):
        ids = np.asarray(Image.open(tmp_path / "pred" / f"{i}_ids.png"))
        assert ids.shape == (SIZE, SIZE)  # the photo half's size


def test_flip_tta_is_flip_equivariant_and_runs_in_eval(trained: tuple[Path, Path]) -> None:
    data, ckpt = trained
    model, cfg, palette, _ = load_from_checkpoint(ckpt, "cpu")
    x = preprocess([read_pair(f)[0] for f in list_split(data, "val")], SIZE, torch.device("cpu"))
    tta = FlipTTA(model).eval()
    with torch.no_grad():
        torch.testing.assert_close(tta(x.flip(-1)), tta(x).flip(-1))
        torch.testing.assert_close(tta(x), (model(x) + model(x.flip(-1)).flip(-1)) / 2)
    # the wrapper drops into engine.evaluate unchanged (what `eval --tta flip` does)
    rt = resolve_runtime("cpu", "32", compile=False)
    with build_loader("torch", list_split(data, "val"), palette, cfg.data, train=False, device=rt.device,
                      dtype=torch.float32, seed=0) as loader:
        metrics, loss = evaluate(tta, loader, rt, palette.num_classes)
    # The same score counted here by hand: TTA logits' argmax against the masks' reference mapping.
    with torch.no_grad():
        pred = tta(x).argmax(1)
    truth = torch.stack([map_colors_reference(torch.from_numpy(read_pair(f)[1].copy()), palette.centers,
                                              palette.classes) for f in list_split(data, "val")])
    keep = truth != IGNORE_INDEX
    assert metrics.pixel_acc == pytest.approx((pred[keep] == truth[keep]).double().mean().item())
    assert np.isfinite(loss)

    flip = Predictor(ckpt, device="cpu", tta="flip")
    photo = np.random.default_rng(2).integers(0, 256, (41, 29, 3), dtype=np.uint8)
    (ids,) = flip.predict_batch([photo])
    (mirrored,) = flip.predict_batch([photo[:, ::-1]])
    assert ids.shape == (41, 29) and ids.dtype == np.uint8 and ids.max() < 19
    assert (ids[:, ::-1] == mirrored).mean() > 0.99  # equivariant up to argmax ties after resizing


def test_bad_inputs_give_one_line_errors(predictor: Predictor, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (8, 8), dtype=np.uint16)).save(tmp_path / "deep.png")
    (tmp_path / "text.jpg").write_text("not an image")
    good = tmp_path / "good.jpg"
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(good, quality=90)
    (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[:200])
    for name, problem in (("cmyk.jpg", "CMYK"), ("deep.png", "16-bit"), ("text.jpg", "not an image"),
                          ("cut.jpg", "truncated")):
        with pytest.raises(PairError, match=problem) as err:
            read_photo(tmp_path / name)
        assert str(err.value).startswith(str(tmp_path / name)) and "\n" not in str(err.value)
    with pytest.raises(PairError, match="no such file"):
        list_inputs([tmp_path / "missing.jpg"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(PairError, match="no .jpg"):
        list_inputs([tmp_path / "empty"])
    with pytest.raises(PairError, match="wrong shape"):  # a plain photo is not a pair
        run_predict(predictor, [good], tmp_path / "out", pairs=True)
    result = run_predict(predictor, [tmp_path], tmp_path / "out", skip_bad=True)
    assert result["images"] == 1 and len(result["skipped"]) == 4


def test_output_names_are_unique(tmp_path: Path) -> None:
    assert output_names([Path("a/1.jpg"), Path("b/1.jpg"), Path("c/2.png"), Path("d/1.png")]) == \
        ["1", "1-2", "2", "1-3"]


def test_plot_confusion_writes_png(tmp_path: Path) -> None:
    m = torch.randint(0, 100, (5, 5))
    m[3] = 0  # a class absent from the truth: its row stays empty, not NaN
    plot_confusion(m, cityscapes_palette().names[:5], tmp_path / "cm.png", log=True)
    assert Image.open(tmp_path / "cm.png").size[0] > 300


def cli_app() -> typer.Typer:
    from cityseg.cli import app

    return app


def test_torchscript_export_parity_via_cli(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data, ckpt = trained
    path = tmp_path / "unet.pt"
    exported = CliRunner().invoke(cli_app(), ["export", "--ckpt", str(ckpt), "--format", "torchscript",
                                              "--out", str(path)])
    assert exported.exit_code == 0 and "100.00 %" in exported.output, exported.output  # random inputs
    model, _, _ = load_export_model(ckpt)
    photos = [read_pair(f)[0] for f in list_split(data, "val")]
    x = preprocess(photos + photos[:1], SIZE, torch.device("cpu"))  # batch 5: not the traced batch of 2
    assert check_parity(model, path, "torchscript", x) == 1.0
    meta = read_metadata(path, "torchscript")
    assert meta["image_size"] == SIZE and len(meta["class_names"]) == 19


def test_onnx_export_parity(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data, ckpt = trained
    path = export_model(ckpt, "onnx", tmp_path / "unet.onnx")
    model, _, _ = load_export_model(ckpt)
    photos = [read_pair(f)[0] for f in list_split(data, "val")]
    x = preprocess(photos + photos[:1], SIZE, torch.device("cpu"))
    assert check_parity(model, path, "onnx", x) == 1.0
    assert read_metadata(path, "onnx")["class_colors"][0] == [128, 64, 128]  # road


def test_onnx_export_without_packages_says_what_to_install(trained: tuple[Path, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    for absent in ("onnxscript", "onnxruntime"):  # one message names the whole extra, whichever is missing
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, gone=absent: None if name == gone
                            else real(name, *a))
        with pytest.raises(ExportError, match=rf"missing: {absent}\): pip install 'cityseg-fast\[export\]'"):
            export_model(trained[1], "onnx", tmp_path / "unet.onnx")
    assert not (tmp_path / "unet.onnx").exists()


def test_cli_predict_and_export(trained: tuple[Path, Path], photos_dir: Path, tmp_path: Path) -> None:
    data, ckpt = trained
    runner, app = CliRunner(), cli_app()
    ok = runner.invoke(app, ["predict", "--ckpt", str(ckpt), str(photos_dir / "a.jpg"), str(data / "val" / "1.jpg"),
                             "--out", str(tmp_path / "out"), "--device", "cpu", "--tta", "flip"])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "out" / "a_overlay.png").is_file() and (tmp_path / "out" / "1_ids.png").is_file()

    missing = runner.invoke(app, ["predict", "--ckpt", str(tmp_path / "nope.pt"), str(photos_dir),
                                  "--out", str(tmp_path / "o2")])
    assert missing.exit_code == 2 and "checkpoint not found" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1

    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    bad = runner.invoke(app, ["predict", "--ckpt", str(ckpt), str(tmp_path / "bad.png"), "--out", str(tmp_path / "o3"),
                              "--device", "cpu"])
    assert bad.exit_code == 2 and "bad.png" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1

    tta = runner.invoke(app, ["predict", "--ckpt", str(ckpt), str(photos_dir), "--out", str(tmp_path / "o4"),
                              "--tta", "rotate"])
    assert tta.exit_code == 2 and "'--tta'" in tta.stderr and "'rotate' is not one of 'none', 'flip'" in tta.stderr

    no_ckpt = runner.invoke(app, ["export", "--ckpt", str(tmp_path / "nope.pt"), "--format", "onnx",
                                  "--out", str(tmp_path / "m.onnx")])
    assert no_ckpt.exit_code == 2 and "checkpoint not found" in no_ckpt.stderr
    wrong = runner.invoke(app, ["export", "--ckpt", str(ckpt), "--format", "tflite", "--out", str(tmp_path / "m")])
    assert wrong.exit_code == 2 and "'--format'" in wrong.stderr and "not one of 'onnx', 'torchscript'" in wrong.stderr
