"""cityseg-fast: high-throughput U-Net training for Cityscapes-style street scenes.

    from cityseg import Config, DataConfig, ModelConfig, TrainConfig, Predictor, evaluate, train
    cfg = Config(data=DataConfig(data_dir="DIR", image_size=128), model=ModelConfig(width=16),
                 train=TrainConfig(epochs=2, out="runs/a"))
    summary = train(cfg)                     # quiet; train(cfg, verbose=True) shows the progress
    run = resolve_run({"data.data_dir": "DIR", "train.epochs": 2})   # as `cityseg-fast train` resolves it
    summary = train(run)                     # presets, checks, resume rules: the CLI's config
    scores = evaluate("runs/a/checkpoints/best.pt", data="DIR")
    ids = Predictor("runs/a/checkpoints/best.pt").predict_batch([photo])   # photo: (H, W, 3) uint8

The names are loaded on first use (torch and the training code only when asked for), so importing
the package, and `cityseg-fast --help`, stay fast.
"""

import logging
import os
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

# OpenMP threads that spin while waiting lose their core to DataLoader workers on small machines:
# measured on 2 cores with one busy, a U-Net step took 2.0-2.5 s with spinning, 0.08-0.14 s with
# passive waiting. Must be set before torch loads its OpenMP runtime; the user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# A library says nothing unless asked: records go to the "cityseg" logger, shown once the
# application configures logging (e.g. logging.basicConfig(level=logging.INFO)).
logging.getLogger("cityseg").addHandler(logging.NullHandler())

try:
    __version__ = version("cityseg-fast")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

# public name -> (module, attribute)
_API = {
    "Config": ("cityseg.config", "Config"),
    "DataConfig": ("cityseg.config", "DataConfig"),
    "ModelConfig": ("cityseg.config", "ModelConfig"),
    "TrainConfig": ("cityseg.config", "TrainConfig"),
    "AugmentConfig": ("cityseg.config", "AugmentConfig"),
    "train_config": ("cityseg.config", "train_config"),
    "resolve_run": ("cityseg.resolve", "resolve_run"),
    "ResolvedRun": ("cityseg.resolve", "ResolvedRun"),
    "train": ("cityseg.training", "train"),
    "evaluate": ("cityseg.inference.evaluate", "evaluate_checkpoint"),
    "Predictor": ("cityseg.inference.predict", "Predictor"),
    "load_from_checkpoint": ("cityseg.checkpoint", "load_from_checkpoint"),
    "UserError": ("cityseg.errors", "UserError"),
    "write_synth_dataset": ("cityseg.data.synth.dataset", "write_dataset"),  # `cityseg-fast synth`
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'cityseg' has no attribute {name!r}")
    module, attribute = _API[name]
    value = getattr(import_module(module), attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
