"""Pretrained timm backbones as U-Net encoders: building one, and its weights from a file or the hub.

`--encoder NAME` is any timm model that has `features_only` (tf_efficientnet_lite0, resnet18, convnext_nano,
...). `--encoder-weights` is `imagenet` (timm's hub weights for NAME, through the standard caches: HF_HOME
for the Hugging Face hub, TORCH_HOME for plain URLs), `none` (random initialisation) or a local file (a
.safetensors file, or a state dict `torch.load` reads with weights_only). Every file, downloaded or given,
is checked strictly against NAME's own classifier model before anything loads it: a missing or unexpected
key or a shape that differs is one line naming the file (a renamed layer must never load silently as
random weights). The hub is asked only after a short connectivity probe, so a machine without network
fails in seconds with what to do instead, never after minutes of DNS retries.

timm is imported here only when an encoder is used: `--encoder unet` (ours) never pays for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from cityseg.errors import UserError

OURS = "unet"  # --encoder: our own U-Net encoder, no timm
HUB_PROBE_TIMEOUT_S = 4.0  # a reachable hub answers a TCP connect in well under a second


class EncoderError(UserError):
    """An encoder or its weights that cannot be used; the message is one line."""


@dataclass(frozen=True)
class WeightsRecord:
    """Where an encoder's starting weights came from, as a checkpoint records it."""

    source: str  # "none", "imagenet" or the file's absolute path
    sha256: str | None
    licence: str | None


def _timm() -> Any:
    try:
        import timm
    except ImportError as e:  # a dependency, but a broken torch/torchvision pair breaks its import
        raise EncoderError(f"--encoder needs timm, which does not import here ({str(e).splitlines()[0][:160]}); "
                           "reinstall cityseg-fast, with torchvision matching torch") from None
    return timm


def check_encoder_name(name: str) -> None:
    """One line unless `name` is a timm model (with the closest names as a hint)."""
    timm = _timm()
    if timm.is_model(name):
        return
    import difflib

    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else " (see timm.list_models())"
    raise EncoderError(f"--encoder {name}: not a timm model{hint}; or --encoder {OURS} for ours")


def pretrained_cfg(name: str) -> dict[str, Any]:
    """timm's default pretrained config of model `name` (mean, std, hub id, url, licence)."""
    check_encoder_name(name)
    cfg = _timm().models.get_pretrained_cfg(name)
    return cfg.to_dict() if cfg is not None else {}


def input_norm(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the encoder's pretrained weights expect, on 0..1 RGB."""
    cfg = pretrained_cfg(name)
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))


def build_encoder(name: str, weights_file: Path | None = None) -> nn.Module:
    """timm's `features_only` model `name`, random or with the (already checked) weights file."""
    check_encoder_name(name)
    kwargs: dict[str, Any] = {"features_only": True, "pretrained": weights_file is not None}
    if weights_file is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights_file), "hf_hub_id": None, "url": None}
    try:
        # timm logs the classifier keys a feature extractor leaves out (the file was checked already).
        with quiet_logger("timm.models._builder"):
            return _timm().create_model(name, **kwargs)
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
        raise EncoderError(f"--encoder {name}: timm cannot build it as a feature extractor "
                           f"({str(e).splitlines()[0][:160]})") from None


@contextlib.contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# -- weights files ---------------------------------------------------------------------------------


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file or a weights-only state dict; one line if it is neither."""
    if not path.is_file():
        raise EncoderError(f"--encoder-weights {path}: file not found (or pass imagenet or none)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader error is the file's problem: name it in one line
        raise EncoderError(f"--encoder-weights {path}: not a readable weights file "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # the common {"state_dict": ...} wrapping
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EncoderError(f"--encoder-weights {path}: not a state dict of tensors")
    return state


def fit_problems(state: dict[str, torch.Tensor], expected: dict[str, torch.Size]) -> list[str]:
    """Every way `state` does not fit a model whose state dict has `expected` names and shapes."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k!r} is {tuple(state[k].shape)} in the file but {tuple(s)} in the model"
              for k, s in expected.items() if k in state and tuple(state[k].shape) != tuple(s)]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            problems.append(f"{label} key {keys[0]!r}{more}")
    if shapes:
        problems.append(shapes[0] + (f" (and {len(shapes) - 1} more shapes)" if len(shapes) > 1 else ""))
    return problems


def expected_shapes(name: str) -> dict[str, torch.Size]:
    """Names and shapes of the state dict of timm's classifier model `name` (built on the meta device:
    no memory, no initialisation)."""
    with torch.device("meta"):
        model = _timm().create_model(name, pretrained=False)
    return {k: v.shape for k, v in model.state_dict().items()}


def check_weights_file(name: str, path: Path) -> None:
    """One line unless the file at `path` holds exactly the state dict of timm's model `name`."""
    problems = fit_problems(read_weights(path), expected_shapes(name))
    if problems:
        raise EncoderError(f"--encoder-weights {path}: does not fit --encoder {name}: {'; '.join(problems)}")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_licence(path: Path) -> str | None:
    """The licence a safetensors file's metadata names (the conversion script writes one), else None."""
    if path.suffix != ".safetensors":
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("license")
    except Exception:  # noqa: BLE001 - metadata is a nicety; the weights were read already
        return None


# -- the hub -----------------------------------------------------------------------------------------


def reachable(url: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to `url`'s host opens within `timeout` seconds. The name lookup runs
    in a daemon thread so that a resolver stuck in retries cannot hold the caller for minutes."""
    parsed = urlparse(url)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    if not host:
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True, name="hub-probe")
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_cache() -> str:
    """The Hugging Face hub cache as the environment says now (HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME),
    not as it said when huggingface_hub was imported."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cached_or_downloaded(name: str) -> Path:
    """The local file of timm's ImageNet weights for `name`: from the cache (HF_HOME, TORCH_HOME), else
    downloaded into it when the hub answers; one line saying what to do when it does not."""
    cfg = pretrained_cfg(name)
    repo, url = cfg.get("hf_hub_id"), cfg.get("url")
    if not repo and not url:
        raise EncoderError(f"--encoder-weights imagenet: timm has no pretrained weights for {name}; pass a file "
                           "or --encoder-weights none")
    if repo:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        filenames = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors",
                                                                                 "pytorch_model.bin"]
        cache_dir = hub_cache()
        for filename in filenames:
            hit = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
            if isinstance(hit, str):
                return Path(hit)
        where, fetch = hub_endpoint(), lambda: Path(hf_hub_download(repo, filenames[0], cache_dir=cache_dir))
        what, cache = repo, "HF_HOME (`hf download " + repo + " " + filenames[0] + "` where there is network)"
    else:
        file = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
        if file.is_file():
            return file

        def fetch() -> Path:
            file.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(file), progress=False)
            return file

        where, what, cache = url, url, f"TORCH_HOME (copy the file to {file})"
    if offline() or not reachable(where):
        why = "HF_HUB_OFFLINE is set" if offline() and repo else f"cannot reach {where}"
        raise EncoderError(f"--encoder-weights imagenet: {why} to fetch {what} for --encoder {name}: pre-fill "
                           f"the cache {cache}, or pass a weights file (--encoder-weights FILE), or "
                           "--encoder-weights none")
    try:
        return fetch()
    except Exception as e:  # noqa: BLE001 - a download that fails half-way: one line, not a traceback
        raise EncoderError(f"--encoder-weights imagenet: fetching {what} failed "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None


def resolve_weights(name: str, weights: str) -> tuple[Path | None, WeightsRecord]:
    """(the checked file to load, or None for random weights; what the checkpoint records) for
    `--encoder name --encoder-weights weights` (imagenet, none, or a file path)."""
    if weights == "none":
        check_encoder_name(name)
        return None, WeightsRecord("none", None, None)
    if weights == "imagenet":
        path = cached_or_downloaded(name)
        licence = pretrained_cfg(name).get("license")
    else:
        path = Path(weights).expanduser().absolute()
        licence = None
    check_encoder_name(name)
    check_weights_file(name, path)
    source = "imagenet" if weights == "imagenet" else str(path)
    return path, WeightsRecord(source, sha256_of(path), licence or file_licence(path) or "unknown")
